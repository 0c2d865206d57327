"""The gateway's gRPC API: `pdserve.serving.v1.Generation` (proto/serving.proto), the
standard `grpc.health.v1.Health` service and server reflection, on one grpc.aio server.

    Generate(request) -> Frontend.prepare -> Frontend.open -> one GenerateResponse per delta
    Abort(request_id) -> the open Generate call with that id ends with finish_reason "abort"

Requests take the same path as HTTP ones (`frontend.Frontend`): the same validation, and
every `RequestError` becomes the status code its `ErrorKind` names; bytes that do not
parse as the request message are INVALID_ARGUMENT as well. However a Generate call
ends (finished, failed, aborted, cancelled by its client, past its deadline), its
`OutputStream` is closed, which aborts the request on the workers and frees its KV.
"""

from __future__ import annotations

import asyncio
import hmac
import math
from collections.abc import Awaitable, Callable
from typing import NamedTuple, NoReturn, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.cluster.gateway.errors import ErrorKind, RequestError, invalid, shown
from pdserve.cluster.gateway.frontend import DEFAULT_MAX_REQUEST_BYTES, Frontend
from pdserve.cluster.gateway.output_stream import (
    OutputDelta,
    OutputStream,
    PreparedRequest,
    PromptOutput,
    Usage,
)
from pdserve.proto import serving_pb2, serving_pb2_grpc
from pdserve.runtime.sampling_params import REPEATED_SAMPLING_FIELDS, SCALAR_SAMPLING_FIELDS
from pdserve.runtime.structured_output import StructuredOutput

GENERATION = serving_pb2.DESCRIPTOR.services_by_name["Generation"]
GENERATION_SERVICE = GENERATION.full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

T = TypeVar("T")


async def start_grpc_server(frontend: Frontend, address: str = "127.0.0.1:0", api_key: str | None = None,
                            max_message_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> tuple[grpc.aio.Server, int]:
    """Serve Generation, Health and reflection on `address` (port 0: any free port) and
    return the started server and its port. Call it inside the event loop that will run
    the server; stop it with `await server.stop(grace)`, which ends open calls (and so
    their requests). With `api_key`, Generation calls must send `authorization: Bearer
    <api_key>`; Health and reflection stay open for probes. A request message over
    `max_message_bytes` is refused by gRPC itself (RESOURCE_EXHAUSTED) before it is parsed,
    the HTTP API's body limit."""
    # No SO_REUSEPORT: a second gateway on a taken port must fail, not share its traffic.
    server = grpc.aio.server(options=(("grpc.so_reuseport", 0),
                                      ("grpc.max_receive_message_length", max_message_bytes)))
    _add_servicer(server, GENERATION, GenerationService(frontend, api_key))
    health_pb2_grpc.add_HealthServicer_to_server(HealthService(frontend.backend.ready), server)
    reflection.enable_server_reflection((GENERATION_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen for gRPC on {address!r} ({exc}); the port may be in use: "
                      "choose another address or port") from None
    await server.start()
    return server, port


class MalformedRequest(NamedTuple):
    """What a method receives in place of a request message whose bytes do not parse."""

    message_type: str
    reason: str

    def error(self) -> RequestError:
        return invalid(f"the request is not a valid {self.message_type} message ({self.reason}); build "
                       "it from proto/serving.proto")


def _lenient_parser(message_class: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return MalformedRequest(message_class.DESCRIPTOR.full_name, str(exc).rpartition(": ")[2])
    return parse


def _add_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """What the generated add_*Servicer_to_server does, except that a request that does not
    parse reaches its method as a MalformedRequest, to be refused with INVALID_ARGUMENT
    (gRPC answers a deserializer's exception with UNKNOWN, which tells the client nothing)."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client-streaming methods are not served")
        make_handler = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                        else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make_handler(
            getattr(servicer, method.name), request_deserializer=_lenient_parser(GetMessageClass(method.input_type)),
            response_serializer=GetMessageClass(method.output_type).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class _Aborted:
    """Marks a wait that an Abort call interrupted."""


_ABORTED = _Aborted()


class _OpenCall:
    """One Generate call past its preparation."""

    def __init__(self, request: PreparedRequest, aborted: asyncio.Event) -> None:
        self.request = request
        self.aborted = aborted  # set by Abort
        # Set the moment Frontend.open returns, so no path can leave it unclosed.
        self.stream: OutputStream | None = None
        # The totals of the last delta sent; the abort message repeats them.
        self.usage = Usage(len(request.prompt_ids), 0, 0)


class GenerationService(serving_pb2_grpc.GenerationServicer):
    """`pdserve.serving.v1.Generation` over one Frontend. Lives on one event loop: the
    table of running calls is touched only by its handlers."""

    def __init__(self, frontend: Frontend, api_key: str | None = None) -> None:
        self._frontend = frontend
        self._expected_auth = None if api_key is None else f"Bearer {api_key}".encode()
        # Request id -> the abort switch of its running Generate call. A client's own id is
        # in from before its prompt is tokenized, so that Abort finds the call meanwhile.
        self._running: dict[str, asyncio.Event] = {}

    async def Generate(self, request: serving_pb2.GenerateRequest | MalformedRequest,
                       context: grpc.aio.ServicerContext) -> None:
        await self._authorize(context)
        aborted = asyncio.Event()
        request_id = None  # this call's key in self._running, once it has one
        try:
            try:
                if isinstance(request, MalformedRequest):
                    raise request.error()
                request_id = self._claim_client_id(request, aborted)
                prepared = await self._prepare(request, context)
            except RequestError as exc:
                # Refusals before admission; the Frontend counts those from open() onwards.
                self._frontend.metrics.error(exc.kind)
                await _abort(context, exc)
            if request_id is None:  # the frontend named it
                request_id = prepared.request_id
                self._running[request_id] = aborted
            await self._serve(_OpenCall(prepared, aborted), context)
        finally:
            # Runs on every exit, client cancellation and deadline included.
            if request_id is not None:
                del self._running[request_id]

    async def Abort(self, request: serving_pb2.AbortRequest | MalformedRequest,
                    context: grpc.aio.ServicerContext) -> serving_pb2.AbortResponse:
        await self._authorize(context)
        if isinstance(request, MalformedRequest):
            await _abort(context, request.error())
        if not request.request_id:
            await _abort(context, invalid("request_id is empty; give the id of the Generate call to abort",
                                          "request_id"))
        aborted = self._running.get(request.request_id)
        if aborted is not None:
            aborted.set()
        return serving_pb2.AbortResponse(found=aborted is not None)

    # ---------------------------------------------------------------- Generate's parts

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self._expected_auth is None:
            return
        sent = next((v for k, v in context.invocation_metadata() if k == "authorization"), "")
        sent = sent.encode() if isinstance(sent, str) else sent
        if not hmac.compare_digest(sent, self._expected_auth):
            self._frontend.metrics.error(ErrorKind.UNAUTHENTICATED)
            await _abort(context, RequestError(ErrorKind.UNAUTHENTICATED, "missing or wrong API key; send "
                                               "the metadata `authorization: Bearer <your key>`"))

    def _claim_client_id(self, request: serving_pb2.GenerateRequest, aborted: asyncio.Event) -> str | None:
        """Enter the client's request id, if it chose one, in the table of running calls;
        raises INVALID_ARGUMENT when a running call has it."""
        if not request.HasField("request_id"):
            return None
        if request.request_id in self._running:
            raise invalid(f"request_id {shown(request.request_id)} is in use by a running request; choose "
                          "another or leave it unset", "request_id")
        self._running[request.request_id] = aborted
        return request.request_id

    async def _prepare(self, request: serving_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> PreparedRequest:
        """Validate and tokenize; raises RequestError saying what is wrong."""
        self._frontend.check_model(request.model if request.HasField("model") else None)
        request_id = request.request_id if request.HasField("request_id") else None
        # GenerateRequest names its sampling fields as SamplingParams does; scalars are proto3
        # `optional`, so an unset field means "the default".
        sampling = {name: getattr(request, name) if request.HasField(name) else None
                    for name in SCALAR_SAMPLING_FIELDS}
        sampling.update({name: tuple(getattr(request, name)) or None for name in REPEATED_SAMPLING_FIELDS})
        sampling["logit_bias"] = tuple(sorted(request.logit_bias.items())) or None  # a map: its pairs
        sampling["structured_output"] = _structured_output(request)
        source = request.WhichOneof("input")
        if source is None:
            raise invalid("the request has no input; set one of text, token_ids or chat", "input")
        traced = {"api": "grpc", "traceparent": _metadata_value(context, "traceparent")}
        if source == "chat":
            messages = [_chat_message(i, m) for i, m in enumerate(request.chat.messages)]
            # A chat reply may run to the end of the context unless max_tokens says otherwise.
            return await self._frontend.prepare(messages=messages, sampling=sampling, default_max_tokens=None,
                                                timeout=_timeout(request, context), request_id=request_id, **traced)
        prompt = request.text if source == "text" else list(request.token_ids.ids)
        return await self._frontend.prepare(prompt=prompt, sampling=sampling,
                                            timeout=_timeout(request, context), request_id=request_id, **traced)

    async def _serve(self, call: _OpenCall, context: grpc.aio.ServicerContext) -> None:
        """Stream the call's responses; however it ends, close its OutputStream."""
        aborted = asyncio.ensure_future(call.aborted.wait())
        try:
            await self._stream(call, aborted, context)
        except RequestError as exc:
            await _abort(context, exc)
        finally:
            aborted.cancel()
            if call.stream is not None:
                await call.stream.aclose()
                # The record as trailing metadata (x-pdserve-*, traceparent); after an error,
                # the status's own metadata goes instead.
                record = call.stream.record
                trailing = record.headers() | ({"traceparent": record.traceparent} if record.traceparent else {})
                context.set_trailing_metadata(tuple(trailing.items()))

    async def _stream(self, call: _OpenCall, aborted: asyncio.Future, context: grpc.aio.ServicerContext) -> None:
        """Write one response per delta until the request finishes or is aborted."""
        request_id = call.request.request_id
        # Aborted while its prompt was prepared: it never reaches a worker.
        if call.aborted.is_set() or await _unless_aborted(self._open_stream(call), aborted) is _ABORTED:
            await context.write(_abort_response(call))
            return
        while True:
            delta = await _unless_aborted(anext(call.stream, None), aborted)
            if delta is None:
                return
            if delta is _ABORTED:
                await context.write(_abort_response(call))
                return
            call.usage = delta.usage
            await context.write(self._response(request_id, delta))

    async def _open_stream(self, call: _OpenCall) -> None:
        call.stream = await self._frontend.open(call.request)

    def _response(self, request_id: str, delta: OutputDelta) -> serving_pb2.GenerateResponse:
        response = serving_pb2.GenerateResponse(request_id=request_id, text=delta.text, token_ids=delta.token_ids,
                                                logprobs=delta.logprobs, finish_reason=delta.finish_reason or "")
        for alternatives in delta.top_logprobs or ():
            response.top_logprobs.add().alternatives.extend(
                serving_pb2.TokenLogprob(token_id=token, token_text=self._frontend.token_text(token), logprob=lp)
                for token, lp in alternatives)
        if delta.finish_reason is not None:
            response.usage.CopyFrom(_usage(delta.usage))
        if delta.prompt is not None and delta.prompt.logprobs is not None:
            response.prompt_logprobs.extend(self._prompt_logprobs(delta.prompt))
        return response

    def _prompt_logprobs(self, prompt: PromptOutput) -> list[serving_pb2.PromptTokenLogprob]:
        token_text = self._frontend.token_text
        return [serving_pb2.PromptTokenLogprob(
            token_id=token, token_text=token_text(token), logprob=entry.logprob, rank=entry.rank,
            alternatives=[serving_pb2.TokenLogprob(token_id=t, token_text=token_text(t), logprob=lp)
                          for t, lp in entry.top])
            for token, entry in zip(prompt.token_ids[1:], prompt.logprobs)]


CHAT_ROLES = ("system", "user", "assistant")  # as the HTTP API's chat messages


def _metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    value = next((v for k, v in context.invocation_metadata() or () if k == key), None)
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _chat_message(index: int, message: serving_pb2.ChatMessage) -> dict[str, str]:
    if message.role not in CHAT_ROLES:
        raise invalid(f"chat.messages[{index}].role must be one of {', '.join(CHAT_ROLES)}; got "
                      f"{shown(message.role)}", "chat")
    return {"role": message.role, "content": message.content}


def _timeout(request: serving_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> float | None:
    """The request's time limit: the earlier of timeout_seconds and the call's deadline."""
    limits = []
    if request.HasField("timeout_seconds"):
        if not (request.timeout_seconds > 0 and math.isfinite(request.timeout_seconds)):
            raise invalid(f"timeout_seconds must be a positive number of seconds, got "
                          f"{request.timeout_seconds!r}; leave it unset for no limit", "timeout_seconds")
        limits.append(request.timeout_seconds)
    remaining = context.time_remaining()
    if remaining is not None:
        if remaining <= 0:
            raise RequestError(ErrorKind.TIMEOUT, "the call's deadline passed before the request started; "
                               "give the call a longer deadline")
        limits.append(remaining)
    return min(limits, default=None)


async def _unless_aborted(work: Awaitable[T], aborted: asyncio.Future) -> T | _Aborted:
    """`await work`, unless `aborted` completes first: then cancel `work`, wait for it to
    unwind and return _ABORTED. Cancelling the caller cancels `work` the same way."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait((task, aborted), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))
    return _ABORTED if task.cancelled() else task.result()


def _abort_response(call: _OpenCall) -> serving_pb2.GenerateResponse:
    return serving_pb2.GenerateResponse(request_id=call.request.request_id, finish_reason="abort",
                                        usage=_usage(call.usage))


def _usage(usage: Usage) -> serving_pb2.Usage:
    return serving_pb2.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                             cached_tokens=usage.cached_tokens)


def _structured_output(request: serving_pb2.GenerateRequest) -> StructuredOutput | None:
    """The request's StructuredOutput message as the engine's, or None when unset; raises
    INVALID_ARGUMENT naming the field when it cannot be one."""
    if not request.HasField("structured_output"):
        return None
    message = request.structured_output
    kind = message.WhichOneof("kind")
    try:
        if kind is None:
            raise ValueError("set one of json_object, json_schema, regex, choice or grammar")
        if kind == "json_object":
            if not message.json_object:
                raise ValueError("json_object must be true when set")
            return StructuredOutput.json_object()
        if kind == "json_schema":
            return StructuredOutput.json_schema(message.json_schema, strict=not message.HasField("strict")
                                                or message.strict)
        if kind == "choice":
            return StructuredOutput.choice(list(message.choice.options))
        return StructuredOutput(kind, getattr(message, kind))
    except ValueError as exc:
        raise invalid(f"structured_output: {exc}", "structured_output") from None


async def _abort(context: grpc.aio.ServicerContext, error: RequestError) -> NoReturn:
    """End the call with the error's status code (raises grpc.aio's AbortError)."""
    metadata = () if error.retry_after is None else (("retry-after", f"{error.retry_after:g}"),)
    await context.abort(grpc.StatusCode[error.kind.grpc_code_name], error.message, metadata)


class HealthService(health_pb2_grpc.HealthServicer):
    """`grpc.health.v1.Health` for the whole server ("") and for Generation: SERVING while
    `ready()` (some worker can take a request), NOT_SERVING otherwise, computed at each
    Check. Watch re-evaluates every `watch_interval` seconds and sends changes only."""

    def __init__(self, ready: Callable[[], bool], watch_interval: float = 1.0) -> None:
        self._ready = ready
        self._watch_interval = watch_interval

    def _status(self, service: str) -> int:
        if service not in ("", GENERATION_SERVICE):
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        return health_pb2.HealthCheckResponse.SERVING if self._ready() else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        status = self._status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no health status for service "
                                f"{shown(request.service)}; ask for '' (the server) or {GENERATION_SERVICE!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        # Runs until the client cancels the call (or the server stops).
        last = None
        while True:
            status = self._status(request.service)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            await asyncio.sleep(self._watch_interval)
