"""Per-request text output: generated ids in, final text deltas out.

Combines incremental detokenization (never a broken UTF-8 character) with stop strings
(never text that later turns out to belong to one). The gateway, the offline `LLM` and
the CLI (through `LLM`) all turn an engine's token deltas into text through `take`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason, StopStringMatcher
from pdserve.runtime.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, eos_token_ids: Collection[int]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._matcher = StopStringMatcher.from_params(params)
        self._params = params
        self._eos = eos_token_ids
        self.text = ""

    @property
    def stopped(self) -> bool:
        """A stop string was hit: the caller should finish the request with reason STOP."""
        return self._matcher.stopped

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became final. After a stop string,
        nothing more is accepted."""
        if self._is_stop_token(token_id):
            return ""  # stop tokens end the sequence but are not part of its text
        delta, _ = self._matcher.push(self._detokenizer.push(token_id))
        self.text += delta
        return delta

    def take(self, token_ids: Sequence[int], finish_reason: FinishReason | None) -> tuple[str, int, FinishReason | None]:
        """One engine delta: push its ids until a stop string is hit. Returns the text that
        became final, how many ids were taken (the one completing a stop string included)
        and why the sequence ends: STOP on a stop string (the caller must then finish the
        request if `finish_reason` is None), else `finish_reason`, with the held-back
        text released when that is set."""
        parts, taken = [], 0
        for token_id in token_ids:
            parts.append(self.push(token_id))
            taken += 1
            if self.stopped:
                return "".join(parts), taken, FinishReason.STOP
        if finish_reason is not None:
            parts.append(self.finish())
        return "".join(parts), taken, finish_reason

    def finish(self) -> str:
        """The sequence ended for a reason other than a stop string: release held text."""
        if self._matcher.stopped:
            return ""
        delta, _ = self._matcher.push(self._detokenizer.flush())
        if not self._matcher.stopped:
            delta += self._matcher.flush()
        self.text += delta
        return delta

    def _is_stop_token(self, token_id: int) -> bool:
        if token_id in self._params.stop_token_ids:
            return True
        return not self._params.ignore_eos and token_id in self._eos
