"""Draft proposers for speculative decoding: cheap guesses at a request's next tokens.

A proposer never decides what a request emits; `verification.verify` does, against the
target model's logits. A bad draft therefore costs only wasted verify positions, never a
wrong token, which is why proposers may be heuristics.

`NgramProposer` (prompt lookup) finds the sequence's last few tokens earlier in the
sequence and proposes what followed them there. It pays off when the output repeats its
input: code edits, extraction, summaries that quote.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import torch

from pdserve.runtime.request import Request


class Draft(NamedTuple):
    """Up to k proposed tokens continuing one request, and how they were drawn.

    token_ids: the k >= 0 proposed tokens; empty means "do not speculate for this request
    this step" (it decodes one token as usual).
    probs: [k, V] float32, row i the proposer's distribution q_i that token_ids[i] was
    drawn from (given the sequence plus token_ids[:i]); None when every proposal is a
    point mass (a deterministic proposer), so q_i is 1 at token_ids[i] and 0 elsewhere.
    """

    token_ids: tuple[int, ...]
    probs: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        # Not len(draft): a NamedTuple's len counts its fields.
        return len(self.token_ids)


EMPTY_DRAFT = Draft((), None)


class Proposer(ABC):
    """Proposes draft tokens for a batch of decoding requests, once per engine step.

    Requests belong to the scheduler: a proposer reads their tokens and never mutates a
    request (tokens, counters, generator). It may keep its own per-request state keyed by
    request id, which `on_finished` releases.
    """

    @abstractmethod
    def propose(self, requests: Sequence[Request], num_tokens: Sequence[int]) -> list[Draft]:
        """One draft per request: at most num_tokens[i] tokens continuing
        `requests[i].token_ids(0, requests[i].num_tokens)` (prompt + output so far).

        num_tokens[i] <= 0 asks for nothing (an empty draft). Safe to call for a request the
        proposer has not seen before, or one that was preempted and recomputed.
        """

    def on_accepted(self, request_id: str, num_accepted: int) -> None:
        """Verification kept `num_accepted` tokens of the request's last draft.

        A proposer with its own KV cache (a draft model) discards the rest here; the
        default keeps nothing and does nothing.
        """

    def on_finished(self, request_id: str) -> None:
        """The request finished or was aborted: drop its state. Safe for unknown ids."""


class _NgramIndex:
    """The most recent start of every n-gram (min_n <= n <= max_n) of one sequence that
    ends before the sequence's last token:

        t[0] ... t[L-2] | t[L-1]
        indexed n-grams | each n-gram ending here is a suffix to look up, not a match: a
                          match needs at least one token after it to propose

    Invariant: `last_start` holds exactly the n-grams ending at index <= num_tokens - 2,
    each mapped to its largest start. Sequences only grow (Request.output_ids is
    append-only), so `catch_up` indexes just the n-grams that new tokens made eligible.
    """

    def __init__(self, request: Request) -> None:
        # The request this index describes: a reused request id is a different sequence.
        self.owner = weakref.ref(request)
        self.num_tokens = 0
        self.last_start: dict[tuple[int, ...], int] = {}

    def describes(self, request: Request) -> bool:
        return self.owner() is request and self.num_tokens <= request.num_tokens

    def catch_up(self, request: Request, min_n: int, max_n: int) -> None:
        length = request.num_tokens
        # n-grams [end - n, end) with end in [self.num_tokens, length - 1] became eligible.
        first_end = max(self.num_tokens, min_n)
        if first_end < length:
            base = max(0, first_end - max_n)
            window = request.token_ids(base, length - 1)
            for end in range(first_end, length):
                for n in range(min_n, min(max_n, end) + 1):
                    # Later ends overwrite earlier ones: the most recent start wins.
                    self.last_start[tuple(window[end - n - base:end - base])] = end - n
        self.num_tokens = length


class NgramProposer(Proposer):
    """Prompt lookup: propose what followed the most recent earlier occurrence of the
    sequence's last n tokens, trying n = max_n down to min_n; no occurrence, no draft.

    Defaults: min_n=2 because a single token (a comma, "the") recurs by chance so often
    that 1-gram matches mostly propose drafts the target rejects, wasting verify work;
    max_n=4 because a 4-token match already pins down the context well, while each extra n
    adds one index entry per token of every request.

    Cost: per request an index of (max_n - min_n + 1) entries per token, built on first
    sight in O(L) and then extended by the new tokens only, so a step costs a few dict
    operations per request whatever the sequence length.
    """

    def __init__(self, max_n: int = 4, min_n: int = 2) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"NgramProposer needs 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n = max_n
        self.min_n = min_n
        self._indexes: dict[str, _NgramIndex] = {}

    @property
    def num_tracked(self) -> int:
        """Requests whose index is held (until `on_finished`)."""
        return len(self._indexes)

    def propose(self, requests: Sequence[Request], num_tokens: Sequence[int]) -> list[Draft]:
        """See `Proposer.propose`; also indexes each request's new tokens."""
        if len(requests) != len(num_tokens):
            raise ValueError(f"got {len(requests)} requests but {len(num_tokens)} draft lengths")
        return [self._propose_one(request, k) for request, k in zip(requests, num_tokens)]

    def on_finished(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)

    def _propose_one(self, request: Request, k: int) -> Draft:
        if k <= 0:
            return EMPTY_DRAFT
        index = self._indexes.get(request.request_id)
        if index is None or not index.describes(request):
            index = self._indexes[request.request_id] = _NgramIndex(request)
        index.catch_up(request, self.min_n, self.max_n)

        length = request.num_tokens
        longest = min(self.max_n, length - 1)  # a match must end before the suffix's end
        tail = request.token_ids(length - longest, length) if longest > 0 else []
        for n in range(longest, self.min_n - 1, -1):
            start = index.last_start.get(tuple(tail[longest - n:]))
            if start is not None:
                # start + n <= length - 1 (index invariant), so at least one token follows.
                return Draft(tuple(request.token_ids(start + n, min(start + n + k, length))), None)
        return EMPTY_DRAFT
