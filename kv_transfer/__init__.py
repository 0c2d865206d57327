"""KV transfer: the only code that turns KV pages into bytes and back, and its transports."""
