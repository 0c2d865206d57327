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
    FunctionCallDelta,
    FunctionCallOut,
    PromptLogprobs,
    PromptTokenLogprob,
    TokenLogprob,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    UsageInfo,
)
from pdserve.cluster.gateway.output_stream import OutputDelta, PromptOutput, Usage
from pdserve.cluster.gateway.tools import (
    ArgumentsDelta,
    ContentDelta,
    ToolCallStart,
    ToolCallStream,
    ToolEvent,
    parse_tool_calls,
)


def merge_deltas(deltas: list[OutputDelta]) -> OutputDelta:
    """One request's deltas as one: texts and tokens concatenated, the last finish and usage,
    the first's prompt."""
    return OutputDelta("".join(d.text for d in deltas), tuple(t for d in deltas for t in d.token_ids),
                       tuple(lp for d in deltas for lp in d.logprobs),
                       tuple(top for d in deltas for top in _top_logprobs(d)),
                       deltas[-1].finish_reason, deltas[-1].usage, deltas[0].prompt)


def _top_logprobs(delta: OutputDelta) -> tuple[tuple[tuple[int, float], ...], ...]:
    """Per token, its (token id, logprob) alternatives; () where none were asked for."""
    return delta.top_logprobs or ((),) * len(delta.token_ids)


class _Bodies(ABC):
    """Builds one request's response bodies from its deltas. Streams: build each chunk
    once, in order (subclasses carry state from chunk to chunk)."""

    def __init__(self, response_id: str, model: str, created: int, token_text: Callable[[int], str],
                 *, logprobs: bool, token_ids: bool, index: int = 0) -> None:
        self.head = {"id": response_id, "model": model, "created": created}
        self.index = index  # the choice this builder writes (n > 1: one builder per choice)
        self._token_text = token_text
        self._logprobs = logprobs
        self._token_ids = token_ids

    def wants_chunk(self, delta: OutputDelta) -> bool:
        """False for a delta with nothing to tell (text held back, no token data asked for)."""
        return bool(delta.text or delta.finish_reason
                    or (delta.token_ids and (self._logprobs or self._token_ids)))

    @abstractmethod
    def chunk(self, delta: OutputDelta) -> BaseModel | None:
        """The stream chunk of one delta, or None when it has nothing to tell."""

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
    """Completion bodies. With `echo`, the choice's text and logprobs start with the
    prompt's (in a stream: in the first chunk). A delta whose prompt has logprobs also
    gets vLLM's top-level `prompt_logprobs` (`prompt_logprobs_body`)."""

    # Characters of the choice's text before the next token, counting each token as its own
    # decoding (OpenAI's `text_offset`; exact except inside multi-token characters).
    _text_offset = 0

    def __init__(self, *args: Any, echo: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._echo = echo

    def chunk(self, delta: OutputDelta) -> CompletionResponse | None:
        reports_prompt = delta.prompt is not None and (self._echo or delta.prompt.logprobs is not None)
        if not (reports_prompt or self.wants_chunk(delta)):
            return None
        return CompletionResponse(**self.head, choices=[self._choice(delta)],
                                  prompt_logprobs=prompt_logprobs_body(delta.prompt, self._token_text))

    def usage_chunk(self, usage: Usage) -> CompletionResponse:
        return CompletionResponse(**self.head, choices=[], usage=UsageInfo.of(usage))

    def response(self, delta: OutputDelta, prompt_ids: list[int]) -> CompletionResponse:
        return CompletionResponse(**self.head, choices=[self._choice(delta)], usage=UsageInfo.of(delta.usage),
                                  prompt_token_ids=self._token_ids_of(prompt_ids),
                                  prompt_logprobs=prompt_logprobs_body(delta.prompt, self._token_text))

    def _choice(self, delta: OutputDelta) -> CompletionChoice:
        echoed = delta.prompt if self._echo else None  # goes before the delta's text
        return CompletionChoice(index=self.index, text=delta.text if echoed is None else echoed.text + delta.text,
                                logprobs=self._logprobs_of(delta, echoed), finish_reason=delta.finish_reason,
                                token_ids=self._token_ids_of(delta.token_ids))

    def _logprobs_of(self, delta: OutputDelta, echoed: PromptOutput | None) -> CompletionLogprobs | None:
        if not self._logprobs:
            return None
        lists = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        if echoed is not None:
            entries = echoed.logprobs or ()
            for j, token_id in enumerate(echoed.token_ids):
                if 0 < j <= len(entries):
                    self._append(lists, token_id, entries[j - 1].logprob, entries[j - 1].top)
                else:  # the first token: nothing precedes it
                    self._append(lists, token_id, None, None)
            self._text_offset = len(echoed.text)  # the completion starts after the prompt's text
        for token_id, logprob, top in zip(delta.token_ids, delta.logprobs, _top_logprobs(delta)):
            self._append(lists, token_id, logprob, top)
        return lists

    def _append(self, lists: CompletionLogprobs, token_id: int, logprob: float | None,
                top: tuple[tuple[int, float], ...] | None) -> None:
        text = self._token_text(token_id)
        lists.tokens.append(text)
        lists.token_logprobs.append(logprob)
        lists.top_logprobs.append(None if logprob is None else self._alternatives(text, logprob, top))
        lists.text_offset.append(self._text_offset)
        self._text_offset += len(text)

    def _alternatives(self, text: str, logprob: float, top: tuple[tuple[int, float], ...]) -> dict[str, float]:
        """A token's most likely alternatives by text, best first (a text keeps its best),
        and the token itself, which OpenAI always lists."""
        alternatives: dict[str, float] = {}
        for alternative, alternative_logprob in top:
            alternatives.setdefault(self._token_text(alternative), alternative_logprob)
        alternatives.setdefault(text, logprob)
        return alternatives


def prompt_logprobs_body(prompt: PromptOutput | None, token_text: Callable[[int], str]) -> PromptLogprobs | None:
    """vLLM's `prompt_logprobs` of a delta's prompt: null for the first token, then per
    token its own logprob and rank and those of the most likely tokens at its position, by
    token id; None when the delta has no prompt logprobs."""
    if prompt is None or prompt.logprobs is None:
        return None
    texts: dict[int, str] = {}  # a prompt repeats tokens: decode each once

    def entry(token_id: int, logprob: float, rank: int) -> PromptTokenLogprob:
        if token_id not in texts:
            texts[token_id] = token_text(token_id)
        return PromptTokenLogprob(logprob=logprob, rank=rank, decoded_token=texts[token_id])

    body: PromptLogprobs = [None]
    for token_id, logprobs in zip(prompt.token_ids[1:], prompt.logprobs):
        ranked = {str(token_id): entry(token_id, logprobs.logprob, logprobs.rank)}
        for rank, (alternative, logprob) in enumerate(logprobs.top, 1):
            ranked.setdefault(str(alternative), entry(alternative, logprob, rank))
        body.append(ranked)
    return body


class ChatBodies(_Bodies):
    """Chat bodies. With `tool_family` (the request offers tools), the output is read for
    tool calls in that format: parsed whole for a response, and through a ToolCallStream
    for a stream (`forced_tools`: a grammar guarantees the calls are well formed, so their
    arguments stream in pieces). A reply that made calls finishes with "tool_calls"."""

    _role_sent = False  # the first chunk sent carries the role
    _called = False  # the stream has sent a tool call

    def __init__(self, *args: Any, tool_family: str | None = None, forced_tools: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tool_family = tool_family
        self._tool_stream = ToolCallStream(tool_family, forced=forced_tools) if tool_family else None

    def chunk(self, delta: OutputDelta) -> ChatCompletionChunk | None:
        content, calls = delta.text or None, None
        if self._tool_stream is not None:
            events = self._tool_stream.feed(delta.text)
            if delta.finish_reason is not None:
                events += self._tool_stream.finish()
            content, calls = _content_and_call_deltas(events)
            self._called = self._called or bool(calls)
        wanted = content or calls or delta.finish_reason or (delta.token_ids and (self._logprobs or self._token_ids))
        if not wanted:
            return None
        role = None if self._role_sent else "assistant"
        self._role_sent = True
        choice = ChatChunkChoice(index=self.index, delta=ChatDelta(role=role, content=content, tool_calls=calls),
                                 logprobs=self._logprobs_of(delta), finish_reason=self._finish(delta.finish_reason,
                                                                                               self._called),
                                 token_ids=self._token_ids_of(delta.token_ids))
        return ChatCompletionChunk(**self.head, choices=[choice])

    @staticmethod
    def _finish(reason: str | None, called: bool) -> str | None:
        return "tool_calls" if reason == "stop" and called else reason

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.head, choices=[], usage=UsageInfo.of(usage))

    def response(self, delta: OutputDelta, prompt_ids: list[int]) -> ChatCompletionResponse:
        content, calls = delta.text, []
        if self._tool_family is not None:
            content, calls = parse_tool_calls(self._tool_family, delta.text)
        message = AssistantMessage(content=content, tool_calls=[
            ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))
            for call in calls] or None)
        choice = ChatChoice(index=self.index, message=message, logprobs=self._logprobs_of(delta),
                            finish_reason=self._finish(delta.finish_reason, bool(calls)),
                            token_ids=self._token_ids_of(delta.token_ids))
        return ChatCompletionResponse(**self.head, choices=[choice], usage=UsageInfo.of(delta.usage),
                                      prompt_token_ids=self._token_ids_of(prompt_ids),
                                      prompt_logprobs=prompt_logprobs_body(delta.prompt, self._token_text))

    def _logprobs_of(self, delta: OutputDelta) -> ChatLogprobs | None:
        if not self._logprobs:
            return None
        return ChatLogprobs(content=[
            TokenLogprob(**self._entry(token_id, logprob),
                         top_logprobs=[TopLogprob(**self._entry(t, lp)) for t, lp in top])
            for token_id, logprob, top in zip(delta.token_ids, delta.logprobs, _top_logprobs(delta))])


def _content_and_call_deltas(events: list[ToolEvent]) -> tuple[str | None, list[ToolCallDelta] | None]:
    """A chunk's content and tool-call deltas from a ToolCallStream's events; a call's
    start and the arguments right after it travel as one delta."""
    content = "".join(e.text for e in events if isinstance(e, ContentDelta)) or None
    calls: list[ToolCallDelta] = []
    for event in events:
        if isinstance(event, ToolCallStart):
            calls.append(ToolCallDelta(index=event.index, id=event.id, type="function",
                                       function=FunctionCallDelta(name=event.name, arguments="")))
        elif isinstance(event, ArgumentsDelta):
            if calls and calls[-1].index == event.index:
                calls[-1].function.arguments += event.text
            else:
                calls.append(ToolCallDelta(index=event.index, function=FunctionCallDelta(arguments=event.text)))
    return content, calls or None


def merge_responses(responses: list[Any], usages: list[Usage]) -> Any:
    """One response of n choices from the n single-choice responses of an n > 1 request
    (in choice order): their choices, and usage counting the prompt once and every
    sequence's completion tokens."""
    usage = Usage(usages[0].prompt_tokens, sum(u.completion_tokens for u in usages), usages[0].cached_tokens)
    return responses[0].model_copy(update={"choices": [c for r in responses for c in r.choices],
                                           "usage": UsageInfo.of(usage)})
