"""Prefill worker: batched, chunked prefill that hands finished KV to kv_transfer."""
