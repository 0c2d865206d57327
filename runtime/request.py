"""`Request`: one generation, tracked by a few counters; everything else is derived.

    prompt_ids + output_ids          all tokens of the sequence
    [0, num_computed_tokens)         tokens whose K/V are in the cache
    block_table                      blocks covering at least the computed tokens

There is no prefill or decode phase, only how far `num_computed_tokens` lags behind
`num_tokens`: a prompt being prefilled lags by many, a decoding sequence by one, and a
preempted sequence (recomputed from scratch) by all of its tokens.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason
from pdserve.runtime.structured_output import GrammarMatcher

_arrival_counter = itertools.count()
# Resumed requests (migrated from a lost worker) count as older than any new arrival.
_resumed_counter = itertools.count(-(1 << 62))


def resumed_arrival() -> int:
    """An arrival for a request continued from another worker: ahead of every new one,
    behind requests resumed before it."""
    return next(_resumed_counter)


class RequestState(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    prefix_handle: Any = None  # lock on the prefix-cache path this request reuses
    state: RequestState = RequestState.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # Arrival order: lower is older. Scheduling priority and preemption order use it.
    arrival: int = field(default_factory=lambda: next(_arrival_counter))
    # Output tokens generated before this request started here (a migrated request carries
    # them at the end of its prompt): its own outputs continue from that position.
    output_offset: int = 0
    # Where the output stands in `params.structured_output`'s grammar: it has consumed
    # exactly the output tokens (carried ones included). None without structured output.
    grammar: GrammarMatcher | None = None

    @property
    def is_resumed(self) -> bool:
        return self.arrival < 0

    def generator_for_next_token(self) -> torch.Generator | None:
        """The request's generator, seeded for the output position it samples next
        (`SamplingParams.seed_at`), or None when unseeded."""
        if self.generator is not None:
            self.generator.manual_seed(self.params.seed_at(self.output_offset + self.num_output_tokens))
        return self.generator

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than the last sampled token is missing from the cache."""
        return self.num_uncomputed_tokens > 1

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence."""
        n_prompt = len(self.prompt_ids)
        if end <= n_prompt:
            return self.prompt_ids[start:end]
        if start >= n_prompt:
            return self.output_ids[start - n_prompt:end - n_prompt]
        return self.prompt_ids[start:] + self.output_ids[:end - n_prompt]


class TokenDelta(NamedTuple):
    """What one engine step produced for one request; streamed to whoever waits on it."""

    request_id: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None  # per token, best first
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    # On the first delta of a remote request: seconds from reserving its
    # blocks to having all its KV (prefill queue + compute + transfer, seen from decode).
    kv_wait_seconds: float | None = None
