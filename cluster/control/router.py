"""Which decode worker serves a request, and whether a prefill worker computes its prompt.

    route(prompt ids, decode views, prefill views) -> Route(decode, prefill or None)

Decode choice is a policy (strategy object, chosen by `--router`):
    round_robin   cycle through the decode workers
    least_load    power of two choices: two random workers, the less loaded one
    prefix_aware  the most cached prompt tokens on the worker, minus a cost per request
                  already running there (`load_cost_tokens`), so a hot prefix does not pile
                  every request onto one worker

Cached tokens are exact: each worker's radix cache reports stored/removed pages with
chain hashes (`runtime.radix_cache.page_hashes`); `PrefixIndex` mirrors them, and a
prompt's own chain hashes are looked up page by page.

Conditional disaggregation: the decode worker prefills locally (prefill=None) when the
uncached part of the prompt is at most `local_prefill_tokens`, when no prefill worker is
up, or when every prefill worker already has `prefill_saturation_tokens` in flight. It
also prefills locally when the prompt would wait less there (spill): once the chosen
prefill worker has `spill_backlog_tokens` or more queued, a prompt goes to the decode
worker if `local_prefill_slowdown` x (its own local backlog + the prompt) is below the
prefill worker's backlog + the prompt. Local prefill runs in chunks between decode steps,
hence the slowdown factor (`local_prefill_slowdown`: from the decode worker's prompt-token
budget per step); the backlog floor keeps light loads fully disaggregated. So a
short prompt no longer queues behind long ones, and two long prompts run side by side.
With `spill_max_tokens` set, a prompt spills only while the decode worker's own backlog
plus the prompt stays within it (what its running requests' TPOT can absorb).

With the SLO planner, `local_prefill_tokens`, the spill backlog and `spill_max_tokens`
follow its plan, and `decode_batch_cap` (None otherwise) keeps new requests off decode workers that hold that many while another holds
fewer (`slo_control`).
"""

from __future__ import annotations

import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

from pdserve.cluster.workers.cache_events import CacheSnapshot, EventBatch
from pdserve.runtime.config import SchedulerConfig
from pdserve.runtime.radix_cache import CacheEvent, page_hashes


class WorkerView(NamedTuple):
    """What the router knows about one worker at routing time."""

    worker_id: str
    in_flight: int  # requests this gateway has on the worker now (fresh, unlike stats)
    in_flight_tokens: int  # prompt tokens of those still to prefill there
    kv_usage: float  # from the worker's latest stats


class Route(NamedTuple):
    decode: str
    prefill: str | None  # None: the decode worker prefills the prompt itself
    cached_tokens: int  # prompt tokens the decode worker holds already
    # Uncached prompt tokens that should have gone to a prefill worker but found none up
    # (or all saturated): demand the autoscaler's prefill signal counts, even at 0 workers.
    unmet_prefill_tokens: int = 0


class PrefixIndex:
    """Per worker, the chain hashes of the pages in its radix cache. Exact as long as
    every event is applied in order: numbered batches (`apply_batch`) are checked for
    gaps, and a worker with a gap is `reset` from a snapshot of its cache."""

    def __init__(self) -> None:
        self._pages: dict[str, set[int]] = {}
        self._seq: dict[str, int] = {}  # worker -> the last event seq applied
        self.num_resyncs = 0  # gaps found and repaired from a snapshot

    def seq(self, worker_id: str) -> int:
        """The last event seq applied for the worker (0: none yet)."""
        return self._seq.get(worker_id, 0)

    def apply_batch(self, worker_id: str, batch: EventBatch) -> bool:
        """Apply a worker's numbered events. False (nothing applied) when they do not
        follow the last ones applied: some were lost; `reset` the worker."""
        if batch.first_seq != self.seq(worker_id) + 1:
            return False
        self.apply(worker_id, batch.events)
        self._seq[worker_id] = batch.last_seq
        return True

    def reset(self, worker_id: str, snapshot: CacheSnapshot) -> None:
        """Start the worker over from a snapshot of its whole cache."""
        self._pages[worker_id] = set(snapshot.pages)
        self._seq[worker_id] = snapshot.seq
        self.num_resyncs += 1

    def apply(self, worker_id: str, events: Sequence[CacheEvent]) -> None:
        """Apply events in order (unnumbered: the caller vouches that none was lost)."""
        pages = self._pages.setdefault(worker_id, set())
        for event in events:
            if event.kind == "stored":
                pages.update(event.page_hashes)
            else:
                pages.difference_update(event.page_hashes)

    def pages(self, worker_id: str) -> frozenset[int]:
        return frozenset(self._pages.get(worker_id, ()))

    def forget(self, worker_id: str) -> None:
        self._pages.pop(worker_id, None)
        self._seq.pop(worker_id, None)

    def num_cached_pages(self, worker_id: str, hashes: Sequence[int]) -> int:
        """How many leading pages of a prompt (given as its chain hashes) the worker holds."""
        pages = self._pages.get(worker_id, ())
        for i, h in enumerate(hashes):
            if h not in pages:
                return i
        return len(hashes)


class DecodePolicy(ABC):
    @abstractmethod
    def choose(self, workers: Sequence[WorkerView], cached_tokens: Sequence[int]) -> int:
        """Index of the chosen worker; `cached_tokens[i]` is what worker i holds of the prompt."""


class RoundRobin(DecodePolicy):
    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, workers, cached_tokens):
        return next(self._turn) % len(workers)


class LeastLoad(DecodePolicy):
    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def choose(self, workers, cached_tokens):
        if len(workers) == 1:
            return 0
        a, b = self._random.sample(range(len(workers)), 2)
        return min((a, b), key=lambda i: _load(workers[i]))


class PrefixAware(DecodePolicy):
    def __init__(self, load_cost_tokens: int = 256) -> None:
        self.load_cost_tokens = load_cost_tokens

    def choose(self, workers, cached_tokens):
        def score(i: int) -> tuple[float, float]:
            return (cached_tokens[i] - self.load_cost_tokens * _load(workers[i]), -_load(workers[i]))

        return max(range(len(workers)), key=score)


def _load(worker: WorkerView) -> float:
    # A nearly full KV pool counts like a few more requests: new ones there would preempt.
    return worker.in_flight + (4.0 if worker.kv_usage > 0.9 else 0.0)


POLICIES = {"round_robin": RoundRobin, "least_load": LeastLoad, "prefix_aware": PrefixAware}

# A decode step's own work in prompt tokens of prefill compute: a batch-8 decode step of
# SmolLM2 on one core (~40 ms) against ~2.7 ms a prompt token of a 1,500-token prefill,
# measured with bench/step_profile.py --threads 1 on this project's 2-core machine.
DECODE_STEP_PROMPT_TOKENS = 16


def local_prefill_slowdown(prompt_tokens_per_step: int | None) -> float:
    """How much longer a prompt takes on a decode worker that computes at most
    `prompt_tokens_per_step` prompt tokens beside each decode step (None: no limit) than
    on an idle prefill worker: every budget's worth of prompt also waits one decode step."""
    if prompt_tokens_per_step is None:  # one decode step per prefill chunk
        return 1.0 + DECODE_STEP_PROMPT_TOKENS / SchedulerConfig.max_prefill_chunk
    return 1.0 + DECODE_STEP_PROMPT_TOKENS / max(1, prompt_tokens_per_step)


class Router:
    def __init__(self, policy: DecodePolicy, block_size: int, index: PrefixIndex | None = None,
                 local_prefill_tokens: int = 32, prefill_saturation_tokens: int = 16384,
                 spill_backlog_tokens: int = 1024, local_prefill_slowdown: float = 2.0) -> None:
        self.policy = policy
        self.block_size = block_size
        self.index = index or PrefixIndex()
        self.local_prefill_tokens = local_prefill_tokens
        self.prefill_saturation_tokens = prefill_saturation_tokens
        self.spill_backlog_tokens = spill_backlog_tokens
        self.local_prefill_slowdown = local_prefill_slowdown
        # Prefer decode workers holding fewer requests than this (None: no cap; see `tune`).
        self.decode_batch_cap: int | None = None
        # Spill only while the decode worker's prompt backlog stays within this (None: no limit).
        self.spill_max_tokens: int | None = None

    def tune(self, local_prefill_tokens: int, spill_backlog_tokens: int, spill_max_tokens: int | None,
             decode_batch_cap: int | None) -> None:
        """New thresholds for the routes that follow (the SLO planner's, `slo_control`)."""
        self.local_prefill_tokens = local_prefill_tokens
        self.spill_backlog_tokens = spill_backlog_tokens
        self.spill_max_tokens = spill_max_tokens
        self.decode_batch_cap = decode_batch_cap

    def route(self, prompt_ids: Sequence[int], decode: Sequence[WorkerView],
              prefill: Sequence[WorkerView]) -> Route | None:
        """None when no decode worker is up."""
        if not decode:
            return None
        if self.decode_batch_cap is not None:  # a soft cap: all at it, the usual choice
            decode = [w for w in decode if w.in_flight < self.decode_batch_cap] or decode
        hashes = page_hashes(prompt_ids, self.block_size)
        cached = [self._cached_tokens(w.worker_id, hashes, len(prompt_ids)) for w in decode]
        chosen = self.policy.choose(decode, cached)
        uncached = len(prompt_ids) - cached[chosen]
        open_prefill = [w for w in prefill if w.in_flight_tokens < self.prefill_saturation_tokens]
        if uncached <= self.local_prefill_tokens:
            return Route(decode[chosen].worker_id, None, cached[chosen])
        if not open_prefill:
            return Route(decode[chosen].worker_id, None, cached[chosen], unmet_prefill_tokens=uncached)
        # The prefill worker: most of the prompt cached there, then least work in flight.
        best = max(open_prefill, key=lambda w: (self._cached_tokens(w.worker_id, hashes, len(prompt_ids))
                                                - w.in_flight_tokens, -w.in_flight))
        if self._waits_less_locally(uncached, decode[chosen], best):
            return Route(decode[chosen].worker_id, None, cached[chosen])
        return Route(decode[chosen].worker_id, best.worker_id, cached[chosen])

    def _waits_less_locally(self, uncached: int, decode: WorkerView, prefill: WorkerView) -> bool:
        """The spill rule (module docstring), in prompt tokens ahead of this one plus its own."""
        if prefill.in_flight_tokens < self.spill_backlog_tokens:
            return False
        if self.spill_max_tokens is not None and decode.in_flight_tokens + uncached > self.spill_max_tokens:
            return False
        local = self.local_prefill_slowdown * (decode.in_flight_tokens + uncached)
        return local < prefill.in_flight_tokens + uncached

    def _cached_tokens(self, worker_id: str, hashes: Sequence[int], prompt_len: int) -> int:
        # A worker computes at least the last prompt token itself, as its scheduler does.
        return min(self.index.num_cached_pages(worker_id, hashes) * self.block_size, prompt_len - 1)
