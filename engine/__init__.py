"""The engine: `EngineCore` (continuous batching, preemption, speculative decoding) serves a
decode worker, colocated mode, the offline `LLM` and `pdserve generate`."""
