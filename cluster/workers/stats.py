"""`WorkerStats`: what a worker reports about itself, read by the controller, the router,
the autoscaler and `/metrics` alike. Counters only grow over a worker's life; gauges are
the values at the time of the snapshot."""

from __future__ import annotations

from typing import NamedTuple


class WorkerStats(NamedTuple):
    role: str  # "prefill" or "decode"
    worker_id: str
    num_waiting: int  # requests queued, not yet running
    num_waiting_tokens: int  # prompt tokens those requests still need computed
    num_running: int
    num_waiting_for_kv: int  # decode: admitted, KV still arriving from a prefill worker
    kv_usage: float  # fraction of the KV pool held by live requests (cached-only pages excluded)
    prefix_hit_tokens: int
    prefix_query_tokens: int
    transfer_bytes: int
    transfer_seconds: float  # prefill: sending KV; decode: a transfer's first page received .. settled
    transfer_outcomes: dict[str, int]
    num_steps: int
    step_seconds: float
    # what the steps computed (the SLO planner fits its models from these counters' growth)
    prompt_tokens_computed: int = 0  # tokens of prefill chunks (prompts; on a decode worker, local prefills)
    batch_requests_stepped: int = 0  # sum over steps of the requests in the step
    requests_finished: int = 0  # requests that ended here (done, aborted or failed)
    # prefill: over transfers sent, seconds from the prompt's last step to the decode
    # worker's acceptance (the part of the hop that layer-by-layer sending did not hide)
    kv_tail_seconds: float = 0.0
    # speculative decoding (decode workers that run it; zeros otherwise)
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verify_steps: int = 0  # request-steps that verified a draft
    spec_accepted_at: tuple[tuple[int, int], ...] = ()  # per draft position: (proposed, accepted)
    # KV held outside the pool's requests: tickets a decode worker issued and has not
    # settled, blocks a draft model holds (decode workers with one; 0 otherwise)
    kv_wait_seconds: float = 0.0  # decode: remote requests' ticket issued .. transfer settled (queue, compute included)
    kv_tickets_live: int = 0
    draft_kv_blocks: int = 0
    kv_rejected: dict[str, int] | None = None  # decode: KV-plane frames and links refused, by reason
    # the engine thread, read when the stats are asked for (not from the snapshot)
    engine_alive: bool = True
    engine_heartbeat_age: float = 0.0  # seconds since the engine loop last beat
    engine_failure: str | None = None  # why the engine thread ended, if it did
    engine_errors: int = 0  # steps and commands that failed (their requests ended with an error; the loop went on)
