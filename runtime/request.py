"""`Request`: one generation, tracked by a few counters; everything else is derived.

    prompt_ids + output_ids          all tokens of the sequence
    [0, num_computed_tokens)         tokens whose K/V are in the cache
    block_table                      blocks covering at least the computed tokens

There is no prefill or decode phase, only how far `num_computed_tokens` lags behind
`num_tokens`: a prompt being prefilled lags by many, a decoding sequence by one, and a
preempted sequence (recomputed from scratch) by all of its tokens.

Prompt logprobs (`SamplingParams.prompt_logprobs`) are read off the prompt's logits as it is
computed, chunk by chunk, into `Request.prompt_logprobs`, and travel on the request's first
`TokenDelta`. The logits after prompt token i score token i + 1:

    prompt tokens          p0      p1      ...   p(P-2)      p(P-1)
    their logits score     p1      p2      ...   p(P-1)      the first output token
    prompt_logprobs        [0]     [1]     ...   [P-2]       (sampled instead)
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
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


class PromptLogprob(NamedTuple):
    """One prompt token's log-probability given the tokens before it, under the model's raw
    distribution (log_softmax of the unmodified logits, as sampled tokens' logprobs)."""

    logprob: float
    rank: int  # 1 + the number of tokens more likely than it there
    top: tuple[tuple[int, float], ...]  # the k most likely (token id, logprob) there, best first


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
    # When its prompt falls due on the worker's prompt clock, set by the scheduler at `add`:
    # prompts get compute in (prompt_due, arrival) order (0 for all: first come, first served).
    prompt_due: float = 0.0
    # Output tokens generated before this request started here (a migrated request carries
    # them at the end of its prompt): its own outputs continue from that position.
    output_offset: int = 0
    # Where the output stands in `params.structured_output`'s grammar: it has consumed
    # exactly the output tokens (carried ones included). None without structured output.
    grammar: GrammarMatcher | None = None
    # Entry j - 1 belongs to prompt token j (see the module docstring); filled while the
    # prompt is computed here (`record_prompt_logprobs`) or from the prefill worker's message.
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)

    @property
    def is_resumed(self) -> bool:
        return self.arrival < 0

    @property
    def asked_prompt_logprobs(self) -> bool:
        """Its first delta carries prompt logprobs: the client asked for them, and this request
        starts the client's output (a migrated request that carries output tokens continues a
        stream whose first delta had them already)."""
        return self.params.prompt_logprobs is not None and self.output_offset == 0

    @property
    def wants_prompt_logprobs(self) -> bool:
        """The prompt's logits must be read as it is computed: asked for, and the first delta,
        which carries them, is still to come. Such a prompt reuses no cached prefix (a cached
        page has no logits)."""
        return self.asked_prompt_logprobs and not self.output_ids

    def record_prompt_logprobs(self, start: int, entries: Sequence[PromptLogprob]) -> None:
        """`entries` belong to prompt tokens start + 1, start + 2, ...: the logits of positions
        [start, start + len(entries)). Entries recorded before for those tokens or later
        ones (a prompt recomputed after preemption) are replaced, never duplicated."""
        del self.prompt_logprobs[start:]
        self.prompt_logprobs.extend(entries)

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
    # On the first delta of a request that asked for them: prompt tokens 1 .. P - 1's
    # logprobs (the first prompt token has none: nothing precedes it). None otherwise.
    prompt_logprobs: tuple[PromptLogprob, ...] | None = None
