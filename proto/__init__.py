"""Protocol buffer sources and generated stubs for the client API and KV transfer."""
