"""Finish checks run after each sampled token: stop tokens, length, and stop strings.

Token checks are stateless (`check_stop_token`). Stop strings need state, because a stop
string can span several detokenised deltas: one `StopStringMatcher` per request holds back
the tail that might still become a stop string and releases it once it cannot.
"""

from __future__ import annotations

import enum
from collections.abc import Collection

from pdserve.runtime.sampling_params import SamplingParams


class FinishReason(str, enum.Enum):
    """Why a sequence ended; the values are the OpenAI API's `finish_reason` strings,
    except PREFILLED, which never reaches a client."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"
    # A prefill worker's request: its prompt is computed and its first token sampled;
    # the decode worker that holds its KV continues it.
    PREFILLED = "prefilled"


def check_stop_token(
    token_id: int,
    num_output_tokens: int,
    params: SamplingParams,
    eos_token_ids: Collection[int],
    output_offset: int = 0,
) -> FinishReason | None:
    """Whether the sequence ends with `token_id`, just appended as output token number
    `num_output_tokens` (counting it) of this worker's. None means keep generating.

    EOS (unless `params.ignore_eos`) and `params.stop_token_ids` give STOP once
    `params.min_tokens` output tokens came before this one, counting the `output_offset`
    tokens a migrated request generated before it started here. The sampler's min_tokens
    mask draws the same line (as vLLM's does): the earliest stop token is output token
    number min_tokens + 1. The stop token counts as an output token but the caller leaves
    it out of the text. Otherwise reaching `params.max_tokens` (this worker's count: a
    migration lowers max_tokens by what was carried) gives LENGTH. STOP wins when both
    apply.
    """
    if output_offset + num_output_tokens - 1 >= params.min_tokens:
        if not params.ignore_eos and token_id in eos_token_ids:
            return FinishReason.STOP
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
    if num_output_tokens >= params.max_tokens:
        return FinishReason.LENGTH
    return None


class StopStringMatcher:
    """Streams text through, cutting it at the first stop string.

    "First" is the stop string that completes earliest in the text; among those that
    complete at the same character, the longest (earliest starting) one. That is the one
    a streaming check sees first, so the result does not depend on how the text was split
    into deltas. The output is the text before it, plus the stop string itself when
    `include_stop_str_in_output`.

    Invariant: the held-back text `_pending` contains no complete stop string, and is
    the longest suffix of what was pushed that is a proper prefix of some stop string.
    So everything emitted is final: no later delta can turn it into part of a stop string.
    """

    def __init__(self, stop: tuple[str, ...], include_stop_str_in_output: bool = False):
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {stop!r}")
        self._stop = tuple(stop)
        self._include = include_stop_str_in_output
        self._max_hold = max((len(s) for s in stop), default=1) - 1
        self._pending = ""
        self._stopped = False

    @classmethod
    def from_params(cls, params: SamplingParams) -> StopStringMatcher:
        return cls(params.stop, params.include_stop_str_in_output)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def push(self, text_delta: str) -> tuple[str, bool]:
        """Add the next detokenised text; return (text safe to emit now, stop string hit).

        After a hit the sequence is over: the returned text is the last, and further
        pushes raise RuntimeError.
        """
        if self._stopped:
            raise RuntimeError("StopStringMatcher.push called after a stop string was hit")
        text = self._pending + text_delta
        hit = self._first_stop(text)
        if hit is not None:
            start, end = hit
            self._stopped = True
            self._pending = ""
            return text[: end if self._include else start], True
        held = self._held_tail_len(text)
        self._pending = text[len(text) - held:]
        return text[: len(text) - held], False

    def flush(self) -> str:
        """Release the held-back text; call once when the sequence ends for another reason."""
        text, self._pending = self._pending, ""
        return text

    def _first_stop(self, text: str) -> tuple[int, int] | None:
        """(start, end) of the stop string completing first in `text`, or None."""
        best: tuple[int, int] | None = None
        for s in self._stop:
            start = text.find(s)
            if start < 0:
                continue
            # Order by end, then by start: the first to complete, longest among equals.
            if best is None or (start + len(s), start) < (best[1], best[0]):
                best = (start, start + len(s))
        return best

    def _held_tail_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for n in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
