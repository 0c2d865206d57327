"""The one request path behind both APIs: validate, tokenize, admit, stream, detokenize.

    HTTP / gRPC layer
      -> await Frontend.prepare(prompt or messages, sampling fields, timeout) -> PreparedRequest
                                  (cheap checks on the loop, tokenizing in worker threads)
      -> await Frontend.open(prepared) -> OutputStream   (admission; errors before any output)
      -> async for delta in stream: OutputDelta(text, token ids, logprobs, finish, usage,
                                                the prompt on the first)

The backend (`backend.Backend`) streams token ids; `output_stream.OutputStream` turns them
into text (incremental detokenization and stop strings), so the APIs only format.
Leaving a stream early (client disconnect, stop string, deadline) closes the backend's
stream, which aborts the request on every worker that holds it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import uuid
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, TypeVar

from pdserve.cluster.gateway.backend import Backend
from pdserve.cluster.gateway.errors import ErrorKind, RequestError, invalid, shown
from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.cluster.gateway.output_stream import OutputStream, PreparedRequest
from pdserve.cluster.gateway.prompt_tokens import PromptTokens
from pdserve.cluster.gateway.request_record import RequestRecord
from pdserve.cluster.gateway.tools import family_for
from pdserve.cluster.gateway.tracing import RequestTracer
from pdserve.runtime.sampling_params import SAMPLING_FIELDS, SamplingParams
from pdserve.runtime.tokenizer import Tokenizer

DEFAULT_COMPLETION_MAX_TOKENS = 16  # as the OpenAI completions API and vLLM
# The largest request either API reads (an HTTP body, a gRPC message): far above any
# prompt the default models take (128K tokens of text is ~0.5 MB), far below what would
# stall the gateway's event loop.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Threads that tokenize prompts and render chat templates beside the event loop. The Rust
# tokenizer releases the GIL, so each keeps a core busy without stalling the loop; prompts
# are bounded by the context before they get here, so a few threads drain any queue.
DEFAULT_TOKENIZER_THREADS = 2

T = TypeVar("T")


class ModelCard(NamedTuple):
    name: str
    max_model_len: int
    created: int  # unix time the gateway started serving it


class _Checks(NamedTuple):
    """The context-length checks of one request, made before tokenizing (on a lower bound
    of the prompt's tokens) and after (on their exact number)."""

    context: int  # the model's maximum context length
    names: Mapping[str, str]  # SamplingParams field -> the API's name for it
    prompt_param: str  # the request field that holds the prompt

    def fits(self, num_prompt_tokens: int, requested: int | None, *, exact: bool) -> None:
        """Raise INVALID_ARGUMENT unless a prompt of `num_prompt_tokens` tokens (or at
        least that many, unless `exact`) leaves room for one output token, and for
        `requested` ones when max_tokens is set."""
        at_least = "" if exact else "at least "
        if num_prompt_tokens >= self.context:
            raise invalid(f"This model's maximum context length is {self.context} tokens. However, your "
                          f"prompt has {at_least}{num_prompt_tokens} tokens (prompt + at least one output "
                          "token must fit). Please shorten your prompt.", self.prompt_param)
        if requested is not None and num_prompt_tokens + requested > self.context:
            name = self.names.get("max_tokens", "max_tokens")
            raise invalid(f"This model's maximum context length is {self.context} tokens. However, you "
                          f"requested {at_least}{num_prompt_tokens + requested} tokens ({at_least}"
                          f"{num_prompt_tokens} in the prompt, {requested} in the completion). Please "
                          f"reduce the prompt or {name}.", name)


def _sampling_params(fields: dict, names: Mapping[str, str]) -> SamplingParams:
    """SamplingParams(**fields), its ValueError as INVALID_ARGUMENT naming the field as the
    client spells it (SamplingParams' messages start with the field's name)."""
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        if field not in SAMPLING_FIELDS:
            raise invalid(str(exc)) from None
        name = names.get(field, field)
        raise invalid(f"{name} {rest}", name) from None


def _check_structured_output(params: SamplingParams, names: Mapping[str, str]) -> None:
    """Raise INVALID_ARGUMENT naming what the request's grammar gets wrong or what its schema
    uses that is not supported (the workers compile it the same way)."""
    try:
        params.structured_output.check()
    except ValueError as exc:
        name = names.get("structured_output", "structured_output")
        raise invalid(f"{name}: {exc}", name) from None


class Frontend:
    """The request path of both APIs over one backend. Lives on one event loop (its
    counters are touched only there); only tokenizing runs in its worker threads."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, card: ModelCard,
                 eos_token_ids: Collection[int], metrics: GatewayMetrics,
                 max_in_flight: int = 1024, tokenizer_threads: int = DEFAULT_TOKENIZER_THREADS,
                 tool_call_parser: str | None = None, tracer: RequestTracer | None = None,
                 log_format: str = "plain") -> None:
        self.backend = backend
        # Each request's record ends in one access log line (`log_format`) and, when
        # tracing, one trace (request_record.py, tracing.py).
        self.tracer = tracer or RequestTracer()
        self.log_format = log_format
        self.tokenizer = tokenizer
        # The format tool calls are described to the model in and parsed from its output:
        # `tool_call_parser` when given, else what the chat template writes.
        self.tool_family = family_for(tokenizer.chat_template, tool_call_parser)
        self.prompt_tokens = PromptTokens(tokenizer)
        self.card = card
        self.eos_token_ids = frozenset(eos_token_ids)
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.num_in_flight = 0  # requests between open() and the end of their stream
        self.num_preparing = 0  # requests waiting for or in a tokenizer thread
        self._tokenizer_threads = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="pdserve-tokenizer")
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]

    # ---------------------------------------------------------------- validation

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.card.name:
            raise RequestError(ErrorKind.NOT_FOUND, f"The model {shown(name)} does not exist; this server "
                               f"serves {self.card.name!r} (see /v1/models).", "model")

    async def prepare(self, *, prompt: str | list[int] | None = None, messages: list[dict] | None = None,
                      tools: list[dict] | None = None, sampling: dict, default_max_tokens: int | None = DEFAULT_COMPLETION_MAX_TOKENS,
                      timeout: float | None = None, request_id: str | None = None,
                      field_names: Mapping[str, str] | None = None, api: str = "",
                      traceparent: str | None = None) -> PreparedRequest:
        """Validate and tokenize one request; raises RequestError(INVALID_ARGUMENT) saying
        what is wrong, or OVERLOADED past `max_in_flight` requests being prepared or run.
        Exactly one of `prompt` (text or token ids) and `messages` (chat, rendered with the
        model's template, with `tools` in its context). `sampling` holds SamplingParams fields (None values mean
        "default"); `field_names` maps those the API spells differently to its names, for
        the errors. Without max_tokens the request may use `default_max_tokens`, or the
        rest of the context if that is None.

        Everything but tokenizing runs first, on the event loop, and costs at most one
        look at the prompt's length: a prompt whose lower bound on tokens (`PromptTokens`)
        is over the context is refused untokenized. Tokenizing runs in the frontend's
        worker threads, so a long prompt never stalls the other requests' streams."""
        names = dict(field_names or {})
        checks = _Checks(self.card.max_model_len, names, "messages" if messages is not None else "prompt")
        fields = {k: v for k, v in sampling.items() if v is not None}
        unknown = set(fields).difference(SAMPLING_FIELDS)
        if unknown:
            raise invalid(f"unknown sampling parameters: {', '.join(sorted(unknown))}")
        # Validated now with a stand-in max_tokens when it is unset; the real one needs the prompt.
        params = _sampling_params({"max_tokens": 1, **fields}, names)
        requested = fields.get("max_tokens")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout < float("inf")):
            raise invalid(f"timeout must be a positive number of seconds, got {shown(timeout)}", "timeout")
        if (prompt is None) == (messages is None):
            raise invalid("give exactly one of a prompt and chat messages")
        if messages is not None and not messages:
            raise invalid("messages must contain at least one message", "messages")
        # An accepted prompt has at least one token; token ids are counted exactly.
        if isinstance(prompt, list):
            checks.fits(len(prompt), requested, exact=True)
        else:
            at_least = self.prompt_tokens.min_tokens(prompt) if isinstance(prompt, str) else 0
            checks.fits(max(1, at_least), requested, exact=False)
        prompt_ids = await self._off_loop(self._tokenize, prompt, messages, tools, checks, requested)
        if params.structured_output is not None:
            # Parsing a schema or grammar is the client's input too: checked off the loop.
            await self._off_loop(_check_structured_output, params, names)
        checks.fits(len(prompt_ids), requested, exact=True)
        if requested is None:
            room = self.card.max_model_len - len(prompt_ids)
            default = room if default_max_tokens is None else min(default_max_tokens, room)
            params = dataclasses.replace(params, max_tokens=default)
        request_id = request_id or f"{self._prefix}-{next(self._ids)}"
        return PreparedRequest(request_id, prompt_ids, params, timeout, api, traceparent)

    async def _off_loop(self, work: Callable[..., T], *args: object) -> T:
        """`work(*args)` in a tokenizer thread; refused with OVERLOADED when the requests
        being prepared and those in flight already reach `max_in_flight`, which bounds the
        work queued for the threads. (A cancelled caller stops counting at once, though a
        thread may still finish its work: at most `tokenizer_threads` such jobs run.)"""
        if self.num_in_flight + self.num_preparing >= self.max_in_flight:
            raise RequestError(ErrorKind.OVERLOADED, f"the server is at its limit of {self.max_in_flight} "
                               "requests in flight; retry shortly", retry_after=1)
        self.num_preparing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._tokenizer_threads, work, *args)
        finally:
            self.num_preparing -= 1

    def _tokenize(self, prompt: str | list[int] | None, messages: list[dict] | None, tools: list[dict] | None,
                  checks: _Checks, requested: int | None) -> list[int]:
        """The prompt's token ids. Runs in a tokenizer thread; touches no mutable state."""
        if messages is not None:
            try:
                text = self.prompt_tokens.render_chat(messages, tools)
            except Exception as exc:  # noqa: BLE001 - a template may raise anything on odd input
                raise invalid(f"the chat template cannot render these messages: {exc}", "messages") from None
            # The bound holds for the rendered text, the exact input of the tokenizer (a
            # template may add text, and may also leave some of the messages out).
            checks.fits(max(1, self.prompt_tokens.min_tokens(text)), requested, exact=False)
            ids = self.prompt_tokens.encode(text, add_special_tokens=False)
        elif isinstance(prompt, str):
            ids = self.prompt_tokens.encode(prompt, add_special_tokens=True)
        else:
            vocab = self.tokenizer.vocab_size
            bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise invalid(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]!r}", "prompt")
            ids = list(prompt)
        if not ids:
            raise invalid("the prompt is empty", checks.prompt_param)
        return ids

    async def tokenize(self, *, prompt: str | None = None, messages: list[dict] | None = None,
                       add_special_tokens: bool = True) -> list[int]:
        """The token ids of a text, or of a conversation rendered with the chat template
        (and a generation prompt), as generation would see them; in a tokenizer thread."""
        def encode() -> list[int]:
            if messages is None:
                return self.prompt_tokens.encode(prompt, add_special_tokens=add_special_tokens)
            try:
                text = self.prompt_tokens.render_chat(messages)
            except Exception as exc:  # noqa: BLE001 - a template may raise anything on odd input
                raise invalid(f"the chat template cannot render these messages: {exc}", "messages") from None
            return self.prompt_tokens.encode(text, add_special_tokens=False)

        return await self._off_loop(encode)

    def detokenize(self, token_ids: list[int]) -> str:
        vocab = self.tokenizer.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise invalid(f"token ids must be in [0, {vocab}); got {bad[:5]!r}", "tokens")
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """The text of one token, as OpenAI logprobs report it."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def close(self) -> None:
        """Stop the tokenizer threads (work already queued is dropped). Call it once the
        servers in front of this frontend have stopped."""
        self._tokenizer_threads.shutdown(wait=False, cancel_futures=True)

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

    def open_record(self, request: PreparedRequest) -> RequestRecord:
        """The record of a request being admitted now; its trace starts here."""
        record = RequestRecord(request.request_id, len(request.prompt_ids), api=request.api)
        self.tracer.open(record, request.traceparent)
        return record

    async def open_group(self, request: PreparedRequest, n: int) -> list[OutputStream]:
        """`open` for n sequences of one prompt (OpenAI's `n`, completions' `best_of`): the
        backend computes the prompt's KV once and the sequences share it
        (`Backend.generate_group`). Sequence i is request `<id>-<i>` on the workers; a
        seeded request gives each sequence its own seed stream (sequence 0 keeps the
        request's seed, so it is the n = 1 output). Each sequence counts against
        `max_in_flight`. Raises RequestError as `open` does, after closing every sequence."""
        if self.num_in_flight + n > self.max_in_flight:
            self.metrics.error(ErrorKind.OVERLOADED)
            raise RequestError(ErrorKind.OVERLOADED, f"the server is at its limit of {self.max_in_flight} "
                               f"requests in flight ({n} sequences asked); retry shortly", retry_after=1)
        ids = [f"{request.request_id}-{i}" for i in range(n)]
        params = [sequence_params(request.params, i) for i in range(n)]
        records = [self.open_record(request._replace(request_id=i)) for i in ids]
        deltas = self.backend.generate_group(ids, request.prompt_ids, params, records)
        streams = [OutputStream(self, request._replace(request_id=i, params=p), d, r)
                   for i, p, d, r in zip(ids, params, deltas, records)]
        try:
            await asyncio.gather(*(stream.prefetch() for stream in streams))
        except BaseException:
            await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)
            raise
        return streams


def sequence_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of sequence `index` of an n > 1 request: its own seed stream when seeded
    (a pure function of the seed and the index), the request's own for sequence 0."""
    if index == 0 or params.seed is None:
        return params
    digest = hashlib.blake2b(f"{params.seed}:{index}".encode(), digest_size=8).digest()
    return dataclasses.replace(params, seed=int.from_bytes(digest, "little") >> 1)
