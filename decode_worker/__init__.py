"""Decode worker: admission, continuous batching, preemption, speculation, streaming."""
