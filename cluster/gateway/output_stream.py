"""One request's stream of output: the backend's token deltas turned into text.

    stream = await frontend.open(prepared)        (admission; see `Frontend`)
    async for delta in stream: OutputDelta(text, token ids, logprobs, finish, usage,
                                           the prompt on the first)
    await stream.aclose()                         (aborts it on the workers if still running)

`OutputStream` detokenizes incrementally and applies stop strings (`TextStream`), enforces
the request's timeout, and keeps the frontend's in-flight count and finish metrics. The
types a stream yields and a prepared request are here too, so that the APIs' body builders
import no request path.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NamedTuple

from pdserve.cluster.gateway.errors import ErrorKind, RequestError
from pdserve.cluster.gateway.request_record import RequestRecord, log_request
from pdserve.runtime.request import PromptLogprob, TokenDelta
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason
from pdserve.runtime.text_stream import TextStream
from pdserve.runtime.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pdserve.cluster.gateway.frontend import Frontend


class Usage(NamedTuple):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from a prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class PromptOutput:
    """The request's prompt as its first delta reports it: the token ids, their logprobs
    when the request asked for them (`SamplingParams.prompt_logprobs`: entry j - 1 is token
    j's; the first token has none), and its text, decoded the first time it is read (only an
    echo reads it)."""

    def __init__(self, tokenizer: Tokenizer, token_ids: list[int],
                 logprobs: tuple[PromptLogprob, ...] | None) -> None:
        self.token_ids = token_ids
        self.logprobs = logprobs
        self._tokenizer = tokenizer

    @functools.cached_property
    def text(self) -> str:
        return self._tokenizer.decode(self.token_ids, skip_special_tokens=False)


class OutputDelta(NamedTuple):
    """New output of one request. `text` is final (never retracted); the last delta has a
    finish reason ("stop", "length" or "abort"). `usage` holds the totals so far. The
    first delta also reports the prompt (`prompt`; None on the others)."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None
    finish_reason: str | None
    usage: Usage
    prompt: PromptOutput | None = None


class PreparedRequest(NamedTuple):
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    timeout: float | None  # seconds from `open` until the request must have ended
    api: str = ""  # completions, chat, grpc
    traceparent: str | None = None  # the client's W3C trace context


class OutputStream:
    """One request's deltas. Iterate it to the end, or `aclose()` it to abort."""

    def __init__(self, frontend: Frontend, request: PreparedRequest,
                 token_deltas: AsyncIterator[TokenDelta] | None = None, record: RequestRecord | None = None) -> None:
        self.request = request
        self._frontend = frontend
        # What happened to it; closed (logged, traced) once, when the stream ends.
        self.record = record or frontend.open_record(request)
        self._record_closed = False
        # The backend's stream of this request (given: one sequence of a group).
        self._token_deltas: AsyncIterator[TokenDelta] = token_deltas or frontend.backend.generate(
            request.request_id, request.prompt_ids, request.params, self.record)
        self._text = TextStream(frontend.tokenizer, request.params, frontend.eos_token_ids)
        self._started = time.monotonic()
        self._deadline = None if request.timeout is None else self._started + request.timeout
        self._first: OutputDelta | None = None
        self._num_tokens = 0
        self._first_token_at: float | None = None
        self._done = False
        self._counted = False
        self._recorded = False  # its finish went into the metrics
        self._prompt_reported = False  # a delta carried the prompt

    async def prefetch(self) -> None:
        self._frontend.num_in_flight += 1
        self._counted = True
        self._first = await self._next_or_close()

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> OutputDelta:
        if self._first is not None:
            delta, self._first = self._first, None
            return delta
        if self._done:
            raise StopAsyncIteration
        return await self._next_or_close()

    async def aclose(self) -> None:
        """End the request (abort it if it is still running); safe to call twice."""
        self._done = True
        if self._counted and not self._recorded and self._first_token_at is not None:
            self._record_finish(FinishReason.ABORT, time.monotonic())  # the client left early
        self._close_record()
        try:
            await self._token_deltas.aclose()  # hands the abort to the backend
        finally:
            # Counted in flight until the backend has the abort: nothing in flight means
            # nothing left for the gateway to tell the workers.
            if self._counted:
                self._counted = False
                self._frontend.num_in_flight -= 1

    async def _next_or_close(self) -> OutputDelta:
        try:
            return await self._next()
        except BaseException as exc:
            if isinstance(exc, RequestError):
                self._frontend.metrics.error(exc.kind)
                self._recorded = True  # counted as an error, not as a finish
                self.record.finish_reason, self.record.error = exc.kind.name.lower(), exc.message
            await self.aclose()
            raise

    async def _next(self) -> OutputDelta:
        token_delta = await self._next_token_delta()
        if token_delta is None:  # the backend ended without a finish reason: a broken worker
            raise RequestError(ErrorKind.INTERNAL, "the worker serving this request ended its stream "
                               "without finishing it; retry the request")
        if token_delta.finish_reason is FinishReason.ERROR:
            raise RequestError(ErrorKind.INTERNAL, "the request failed on its worker (see the server log); "
                               "retry it")
        now = time.monotonic()
        if token_delta.token_ids and self._first_token_at is None:
            self._first_token_at = self.record.first_token_at = now
        if token_delta.token_ids:
            self.record.decode_steps += 1
        self.record.num_cached_tokens = token_delta.num_cached_tokens
        text, num_new, finish = self._text.take(token_delta.token_ids, token_delta.finish_reason)
        self._num_tokens += num_new
        usage = Usage(token_delta.num_prompt_tokens, self._num_tokens, token_delta.num_cached_tokens)
        prompt = None
        if not self._prompt_reported:  # the first delta: the engine's first carries the prompt logprobs
            self._prompt_reported = True
            prompt = PromptOutput(self._frontend.tokenizer, self.request.prompt_ids, token_delta.prompt_logprobs)
        delta = OutputDelta(text, token_delta.token_ids[:num_new], token_delta.logprobs[:num_new],
                            token_delta.top_logprobs[:num_new] if token_delta.top_logprobs else None,
                            finish.value if finish is not None else None, usage, prompt)
        if finish is not None:
            self._record_finish(finish, now)
            await self.aclose()  # a stop string: the workers still hold the request
        return delta

    async def _next_token_delta(self) -> TokenDelta | None:
        remaining = None if self._deadline is None else self._deadline - time.monotonic()
        try:
            if remaining is not None and remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(anext(self._token_deltas, None), remaining)
        except asyncio.TimeoutError:
            raise RequestError(ErrorKind.TIMEOUT, f"the request did not finish within its timeout of "
                               f"{self.request.timeout:g} s ({self._num_tokens} tokens were generated); "
                               f"raise the timeout or lower max_tokens") from None

    def _close_record(self) -> None:
        """The record's end: one access log line, and the trace when tracing."""
        if self._record_closed:
            return
        self._record_closed = True
        record = self.record
        record.num_output_tokens = self._num_tokens
        if record.finished_at is None:
            record.finished_at = time.monotonic()
        if not record.finish_reason:
            record.finish_reason = FinishReason.ABORT.value  # it ended before any finish or error
        log_request(record, self._frontend.log_format)
        self._frontend.tracer.close(record)

    def _record_finish(self, reason: FinishReason, now: float) -> None:
        self.record.finished_at, self.record.finish_reason = now, reason.value
        self._recorded = True
        ttft = None if self._first_token_at is None else self._first_token_at - self._started
        tpot = None
        if self._first_token_at is not None and self._num_tokens > 1:
            tpot = (now - self._first_token_at) / (self._num_tokens - 1)
        self._frontend.metrics.finished(reason.value, now - self._started, ttft, tpot, self._num_tokens)
