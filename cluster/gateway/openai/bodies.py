"""Building a request's response bodies from its `OutputDelta`s.

`CompletionBodies` and `ChatBodies` turn the deltas into the models of `responses`,
as stream chunks or as one response (`merge_deltas` folds a whole request's deltas first);
they only format, and never fail.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from pdserve.cluster.gateway.frontend import OutputDelta, Usage
from pdserve.cluster.gateway.openai.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)


def merge_deltas(deltas: list[OutputDelta]) -> OutputDelta:
    """One request's deltas as one: texts and tokens concatenated, the last finish and usage."""
    return OutputDelta("".join(d.text for d in deltas), tuple(t for d in deltas for t in d.token_ids),
                       tuple(lp for d in deltas for lp in d.logprobs),
                       tuple(top for d in deltas for top in _top_logprobs(d)),
                       deltas[-1].finish_reason, deltas[-1].usage)


def _top_logprobs(delta: OutputDelta) -> tuple[tuple[tuple[int, float], ...], ...]:
    """Per token, its (token id, logprob) alternatives; () where none were asked for."""
    return delta.top_logprobs or ((),) * len(delta.token_ids)


class _Bodies(ABC):
    """Builds one request's response bodies from its deltas. Streams: build each chunk
    once, in order (subclasses carry state from chunk to chunk)."""

    def __init__(self, response_id: str, model: str, created: int, token_text: Callable[[int], str],
                 *, logprobs: bool, token_ids: bool) -> None:
        self.head = {"id": response_id, "model": model, "created": created}
        self._token_text = token_text
        self._logprobs = logprobs
        self._token_ids = token_ids

    def wants_chunk(self, delta: OutputDelta) -> bool:
        """False for a delta with nothing to tell (text held back, no token data asked for)."""
        return bool(delta.text or delta.finish_reason
                    or (delta.token_ids and (self._logprobs or self._token_ids)))

    @abstractmethod
    def chunk(self, delta: OutputDelta) -> BaseModel:
        """The stream chunk of one delta."""

    @abstractmethod
    def usage_chunk(self, usage: Usage) -> BaseModel:
        """The stream's last chunk when the client asked for usage: no choices."""

    @abstractmethod
    def response(self, delta: OutputDelta, prompt_ids: list[int]) -> BaseModel:
        """The whole (non-stream) response, from `merge_deltas` of every delta."""

    def _token_ids_of(self, ids: tuple[int, ...] | list[int]) -> list[int] | None:
        return list(ids) if self._token_ids else None

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self._token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


class CompletionBodies(_Bodies):
    # Characters of completion text before the next token, counting each token as its own
    # decoding (OpenAI's `text_offset`; exact except inside multi-token characters).
    _text_offset = 0

    def chunk(self, delta: OutputDelta) -> CompletionResponse:
        return CompletionResponse(**self.head, choices=[self._choice(delta)])

    def usage_chunk(self, usage: Usage) -> CompletionResponse:
        return CompletionResponse(**self.head, choices=[], usage=UsageInfo.of(usage))

    def response(self, delta: OutputDelta, prompt_ids: list[int]) -> CompletionResponse:
        return CompletionResponse(**self.head, choices=[self._choice(delta)], usage=UsageInfo.of(delta.usage),
                                  prompt_token_ids=self._token_ids_of(prompt_ids))

    def _choice(self, delta: OutputDelta) -> CompletionChoice:
        return CompletionChoice(text=delta.text, logprobs=self._logprobs_of(delta),
                                finish_reason=delta.finish_reason,
                                token_ids=self._token_ids_of(delta.token_ids))

    def _logprobs_of(self, delta: OutputDelta) -> CompletionLogprobs | None:
        if not self._logprobs:
            return None
        tokens, tops, offsets = [], [], []
        for token_id, logprob, top in zip(delta.token_ids, delta.logprobs, _top_logprobs(delta)):
            text = self._token_text(token_id)
            alternatives: dict[str, float] = {}
            for alternative, alternative_logprob in top:  # best first: a text keeps its best
                alternatives.setdefault(self._token_text(alternative), alternative_logprob)
            alternatives.setdefault(text, logprob)  # OpenAI always lists the sampled token
            tokens.append(text)
            tops.append(alternatives)
            offsets.append(self._text_offset)
            self._text_offset += len(text)
        return CompletionLogprobs(tokens=tokens, token_logprobs=list(delta.logprobs), top_logprobs=tops,
                                  text_offset=offsets)


class ChatBodies(_Bodies):
    _role_sent = False  # the first chunk sent carries the role

    def chunk(self, delta: OutputDelta) -> ChatCompletionChunk:
        role = None if self._role_sent else "assistant"
        self._role_sent = True
        choice = ChatChunkChoice(delta=ChatDelta(role=role, content=delta.text or None),
                                 logprobs=self._logprobs_of(delta), finish_reason=delta.finish_reason,
                                 token_ids=self._token_ids_of(delta.token_ids))
        return ChatCompletionChunk(**self.head, choices=[choice])

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.head, choices=[], usage=UsageInfo.of(usage))

    def response(self, delta: OutputDelta, prompt_ids: list[int]) -> ChatCompletionResponse:
        choice = ChatChoice(message=AssistantMessage(content=delta.text), logprobs=self._logprobs_of(delta),
                            finish_reason=delta.finish_reason, token_ids=self._token_ids_of(delta.token_ids))
        return ChatCompletionResponse(**self.head, choices=[choice], usage=UsageInfo.of(delta.usage),
                                      prompt_token_ids=self._token_ids_of(prompt_ids))

    def _logprobs_of(self, delta: OutputDelta) -> ChatLogprobs | None:
        if not self._logprobs:
            return None
        return ChatLogprobs(content=[
            TokenLogprob(**self._entry(token_id, logprob),
                         top_logprobs=[TopLogprob(**self._entry(t, lp)) for t, lp in top])
            for token_id, logprob, top in zip(delta.token_ids, delta.logprobs, _top_logprobs(delta))])
