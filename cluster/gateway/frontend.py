"""The one request path behind both APIs: validate, tokenize, admit, stream, detokenize.

    HTTP / gRPC layer
      -> Frontend.prepare(prompt or messages, sampling fields, timeout) -> PreparedRequest
      -> await Frontend.open(prepared) -> OutputStream   (admission; errors before any output)
      -> async for delta in stream: OutputDelta(text, token ids, logprobs, finish, usage)

The backend (`backend.Backend`) streams token ids; this module turns them into text with
`TextStream` (incremental detokenization and stop strings), so the APIs only format.
Leaving a stream early (client disconnect, stop string, deadline) closes the backend's
stream, which aborts the request on every worker that holds it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Collection
from typing import NamedTuple

from pdserve.cluster.gateway.backend import Backend
from pdserve.cluster.gateway.errors import ErrorKind, RequestError, invalid
from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.runtime.request import TokenDelta
from pdserve.runtime.sampling_params import SAMPLING_FIELDS, SamplingParams
from pdserve.runtime.stopping import FinishReason
from pdserve.runtime.text_stream import TextStream
from pdserve.runtime.tokenizer import Tokenizer

DEFAULT_COMPLETION_MAX_TOKENS = 16  # as the OpenAI completions API and vLLM
# The largest request either API reads (an HTTP body, a gRPC message): far above any
# prompt the default models take (128K tokens of text is ~0.5 MB), far below what would
# stall the gateway's event loop.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


class Usage(NamedTuple):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from a prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class OutputDelta(NamedTuple):
    """New output of one request. `text` is final (never retracted); the last delta has a
    finish reason ("stop", "length" or "abort"). `usage` holds the totals so far."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None
    finish_reason: str | None
    usage: Usage


class PreparedRequest(NamedTuple):
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    timeout: float | None  # seconds from `open` until the request must have ended


class ModelCard(NamedTuple):
    name: str
    max_model_len: int
    created: int  # unix time the gateway started serving it


class Frontend:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, card: ModelCard,
                 eos_token_ids: Collection[int], metrics: GatewayMetrics,
                 max_in_flight: int = 1024) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.card = card
        self.eos_token_ids = frozenset(eos_token_ids)
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.num_in_flight = 0
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]

    # ---------------------------------------------------------------- validation

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.card.name:
            raise RequestError(ErrorKind.NOT_FOUND, f"The model {name!r} does not exist; this server "
                               f"serves {self.card.name!r} (see /v1/models).", "model")

    def prepare(self, *, prompt: str | list[int] | None = None, messages: list[dict] | None = None,
                sampling: dict, default_max_tokens: int | None = DEFAULT_COMPLETION_MAX_TOKENS,
                timeout: float | None = None, request_id: str | None = None) -> PreparedRequest:
        """Tokenize and validate one request; raises RequestError(INVALID_ARGUMENT) saying
        what is wrong. Exactly one of `prompt` (text or token ids) and `messages` (chat,
        rendered with the model's template). `sampling` holds SamplingParams fields (None
        values mean "default"). Without max_tokens the request may use
        `default_max_tokens`, or the rest of the context if that is None."""
        prompt_ids = self._tokenize(prompt, messages)
        fields = {k: v for k, v in sampling.items() if v is not None}
        unknown = set(fields).difference(SAMPLING_FIELDS)
        if unknown:
            raise invalid(f"unknown sampling parameters: {', '.join(sorted(unknown))}")
        room = self.card.max_model_len - len(prompt_ids)
        if room < 1:
            raise invalid(f"This model's maximum context length is {self.card.max_model_len} tokens. "
                          f"However, your prompt has {len(prompt_ids)} tokens (prompt + at least one "
                          f"output token must fit). Please shorten your prompt.", "messages" if
                          messages is not None else "prompt")
        if "max_tokens" in fields:
            requested = fields["max_tokens"]
            if isinstance(requested, int) and not isinstance(requested, bool) and requested > room:
                raise invalid(f"This model's maximum context length is {self.card.max_model_len} tokens. "
                              f"However, you requested {len(prompt_ids) + requested} tokens "
                              f"({len(prompt_ids)} in the prompt, {requested} in the completion). "
                              f"Please reduce the prompt or max_tokens.", "max_tokens")
        else:
            fields["max_tokens"] = room if default_max_tokens is None else min(default_max_tokens, room)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout < float("inf")):
            raise invalid(f"timeout must be a positive number of seconds, got {timeout!r}", "timeout")
        try:
            params = SamplingParams(**fields)
        except (ValueError, TypeError) as exc:
            raise invalid(str(exc)) from None
        request_id = request_id or f"{self._prefix}-{next(self._ids)}"
        return PreparedRequest(request_id, prompt_ids, params, timeout)

    def _tokenize(self, prompt: str | list[int] | None, messages: list[dict] | None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise invalid("give exactly one of a prompt and chat messages")
        if messages is not None:
            if not messages:
                raise invalid("messages must contain at least one message", "messages")
            try:
                ids = self.tokenizer.encode_chat(messages)
            except Exception as exc:  # noqa: BLE001 - a template may raise anything on odd input
                raise invalid(f"the chat template cannot render these messages: {exc}", "messages") from None
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            vocab = self.tokenizer.vocab_size
            bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise invalid(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]!r}", "prompt")
            ids = list(prompt)
        if not ids:
            raise invalid("the prompt is empty", "messages" if messages is not None else "prompt")
        return ids

    def token_text(self, token_id: int) -> str:
        """The text of one token, as OpenAI logprobs report it."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ---------------------------------------------------------------- streaming

    async def open(self, request: PreparedRequest) -> OutputStream:
        """Admit the request and wait for its first output, so that every refusal
        (overload, no worker, a worker's own validation) is raised here, before a
        response has started. Raises RequestError."""
        if self.num_in_flight >= self.max_in_flight:
            self.metrics.error(ErrorKind.OVERLOADED)
            raise RequestError(ErrorKind.OVERLOADED, f"the server is at its limit of {self.max_in_flight} "
                               "requests in flight; retry shortly", retry_after=1)
        stream = OutputStream(self, request)
        await stream.prefetch()
        return stream


class OutputStream:
    """One request's deltas. Iterate it to the end, or `aclose()` it to abort."""

    def __init__(self, frontend: Frontend, request: PreparedRequest) -> None:
        self.request = request
        self._frontend = frontend
        self._token_deltas: AsyncIterator[TokenDelta] = frontend.backend.generate(
            request.request_id, request.prompt_ids, request.params)
        self._text = TextStream(frontend.tokenizer, request.params, frontend.eos_token_ids)
        self._started = time.monotonic()
        self._deadline = None if request.timeout is None else self._started + request.timeout
        self._first: OutputDelta | None = None
        self._num_tokens = 0
        self._first_token_at: float | None = None
        self._done = False
        self._counted = False
        self._recorded = False  # its finish went into the metrics

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
        if self._counted:
            self._counted = False
            self._frontend.num_in_flight -= 1
        await self._token_deltas.aclose()

    async def _next_or_close(self) -> OutputDelta:
        try:
            return await self._next()
        except BaseException as exc:
            if isinstance(exc, RequestError):
                self._frontend.metrics.error(exc.kind)
                self._recorded = True  # counted as an error, not as a finish
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
            self._first_token_at = now
        text, num_new, finish = self._text.take(token_delta.token_ids, token_delta.finish_reason)
        self._num_tokens += num_new
        usage = Usage(token_delta.num_prompt_tokens, self._num_tokens, token_delta.num_cached_tokens)
        delta = OutputDelta(text, token_delta.token_ids[:num_new], token_delta.logprobs[:num_new],
                            token_delta.top_logprobs[:num_new] if token_delta.top_logprobs else None,
                            finish.value if finish is not None else None, usage)
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

    def _record_finish(self, reason: FinishReason, now: float) -> None:
        self._recorded = True
        ttft = None if self._first_token_at is None else self._first_token_at - self._started
        tpot = None
        if self._first_token_at is not None and self._num_tokens > 1:
            tpot = (now - self._first_token_at) / (self._num_tokens - 1)
        self._frontend.metrics.finished(reason.value, now - self._started, ttft, tpot, self._num_tokens)
