"""The gateway's OpenAI-compatible HTTP API: `create_app(frontend)` -> a FastAPI app.

    POST /v1/completions, /v1/chat/completions   one JSON body, or with stream=true SSE chunks
    GET  /v1/models, /v1/models/{model}
    GET  /health                                 200 while the backend can serve, else 503
    GET  /metrics                                Prometheus text of `frontend.metrics`

Every error, wherever it arises, leaves as the OpenAI error body with the status of its
`ErrorKind` (FastAPI's 422 included: it becomes a 400 that says which field is wrong). An
error after a stream has started is one `data: {"error": ...}` event, then `data: [DONE]`.

Invariant: whatever ends a request (its end, an error, its timeout, the client going away
while it waits, generates or streams) closes its `OutputStream`, which aborts it on the
workers and frees its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from pdserve.cluster.errors import ErrorKind, RequestError
from pdserve.cluster.frontend import Frontend, OutputStream, PreparedRequest
from pdserve.cluster.metrics import GatewayMetrics
from pdserve.cluster.openai_protocol import (
    ChatBodies,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionBodies,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    ModelList,
    ModelObject,
    merge_deltas,
)
from pdserve.version import __version__

log = logging.getLogger(__name__)
T = TypeVar("T")

_DONE = b"data: [DONE]\n\n"
_CLIENT_CLOSED_REQUEST = 499  # a status nobody reads: the client has gone (nginx's convention)


def create_app(frontend: Frontend, *, api_key: str | None = None) -> FastAPI:
    """The HTTP API over `frontend`. With `api_key`, /v1/* requires
    `Authorization: Bearer <api_key>`; /health and /metrics stay open for probes and
    scrapers. The app holds no state of its own: serve it from one event loop."""
    app = FastAPI(title="pdserve", version=__version__,
                  summary="OpenAI-compatible API of the pdserve prefill/decode serving cluster.")
    _install_error_handlers(app, frontend.metrics)
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, metrics=frontend.metrics)

    @app.post("/v1/completions", response_model=None, responses=_generation_responses(CompletionResponse))
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        bodies = _new_bodies(CompletionBodies, "cmpl", frontend, logprobs=body.logprobs is not None,
                             token_ids=body.return_token_ids)
        with _counting_refusals(frontend.metrics):
            frontend.check_model(body.model)
            body.check_supported()
            prepared = frontend.prepare(prompt=body.prompt_input(), sampling=body.sampling(),
                                        timeout=body.timeout, request_id=bodies.head["id"])
        return await _serve(request, frontend, prepared, bodies, bool(body.stream), body.include_usage)

    @app.post("/v1/chat/completions", response_model=None,
              responses=_generation_responses(ChatCompletionResponse))
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        bodies = _new_bodies(ChatBodies, "chatcmpl", frontend, logprobs=bool(body.logprobs),
                             token_ids=body.return_token_ids)
        with _counting_refusals(frontend.metrics):
            frontend.check_model(body.model)
            body.check_supported()
            prepared = frontend.prepare(messages=body.template_messages(), sampling=body.sampling(),
                                        default_max_tokens=None, timeout=body.timeout,
                                        request_id=bodies.head["id"])
        return await _serve(request, frontend, prepared, bodies, bool(body.stream), body.include_usage)

    def model_object() -> ModelObject:
        card = frontend.card
        return ModelObject(id=card.name, created=card.created, max_model_len=card.max_model_len)

    @app.get("/v1/models", responses=_error_responses())
    async def list_models() -> ModelList:
        return ModelList(data=[model_object()])

    @app.get("/v1/models/{model:path}", responses=_error_responses(404))
    async def retrieve_model(model: str) -> ModelObject:
        frontend.check_model(model)
        return model_object()

    @app.get("/health", responses=_error_responses(503))
    async def health() -> dict[str, str]:
        if not frontend.backend.ready():
            raise RequestError(ErrorKind.UNAVAILABLE, "no worker is ready to serve requests; wait for the "
                               "workers to start, or check their logs")
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition of the gateway's metrics."}})
    async def metrics() -> Response:
        return Response(frontend.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


# ------------------------------------------------------------------------ one generation

Bodies = TypeVar("Bodies", CompletionBodies, ChatBodies)


def _new_bodies(cls: type[Bodies], id_prefix: str, frontend: Frontend, *, logprobs: bool,
                token_ids: bool) -> Bodies:
    """The body builder of a new response; its id is also the request's id on the workers."""
    return cls(f"{id_prefix}-{uuid.uuid4().hex}", frontend.card.name, int(time.time()), frontend.token_text,
               logprobs=logprobs, token_ids=token_ids)


async def _serve(request: Request, frontend: Frontend, prepared: PreparedRequest,
                 bodies: CompletionBodies | ChatBodies, stream: bool, include_usage: bool) -> Response:
    """Admit the prepared request and answer it. Every refusal (overload, no worker,
    timeout before the first output) raises RequestError here, before a response starts."""
    if stream:
        output = await until_disconnected(request.receive, frontend.open(prepared))
        if output is None:
            return Response(status_code=_CLIENT_CLOSED_REQUEST)
        return EventStreamResponse(_events(output, bodies, include_usage), output.aclose)
    answer = await until_disconnected(request.receive, _collect(frontend, prepared, bodies))
    if answer is None:
        return Response(status_code=_CLIENT_CLOSED_REQUEST)
    return _json(answer)


async def _collect(frontend: Frontend, prepared: PreparedRequest,
                   bodies: CompletionBodies | ChatBodies) -> BaseModel:
    output = await frontend.open(prepared)
    try:
        deltas = [delta async for delta in output]
    finally:
        await output.aclose()
    return bodies.response(merge_deltas(deltas), prepared.prompt_ids)


async def _events(output: OutputStream, bodies: CompletionBodies | ChatBodies,
                  include_usage: bool) -> AsyncGenerator[bytes, None]:
    """The SSE events of one stream, ending with [DONE], after an error event if it failed."""
    try:
        usage = None
        async for delta in output:
            usage = delta.usage
            if bodies.wants_chunk(delta):
                yield _event(bodies.chunk(delta))
        if include_usage and usage is not None:
            yield _event(bodies.usage_chunk(usage))
    except RequestError as exc:
        yield _event(_error_body(exc.kind.openai_type, exc.message, exc.param))
    except Exception:
        log.exception("request %s failed while streaming", output.request.request_id)
        yield _event(_error_body(ErrorKind.INTERNAL.openai_type, _INTERNAL_MESSAGE))
    finally:
        await output.aclose()
    yield _DONE


def _event(body: BaseModel) -> bytes:
    return b"data: " + body.model_dump_json().encode() + b"\n\n"


def _json(body: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    # pydantic writes non-finite floats as null, where json.dumps would fail the response.
    return Response(body.model_dump_json(), status_code=status_code, headers=headers,
                    media_type="application/json")


class EventStreamResponse(StreamingResponse):
    """A server-sent-events response that calls `on_close` on every exit: the end of the
    events, an error, or the client going away (noticed through `receive`, whether or not
    a send fails, and also before the first event)."""

    def __init__(self, events: AsyncGenerator[bytes, None], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnected(receive, self.stream_response(send))
        except OSError:
            pass  # the client went away during a send (servers of ASGI spec 2.4 and later)
        finally:
            with anyio.CancelScope(shield=True):  # cleanup must run even when cancelled
                await self._events.aclose()
                await self._on_close()


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T | None:
    """Await `work` unless the client disconnects first; then cancel it, let its cleanup
    run, and return None. `work`'s errors propagate. Only for after the request body has
    been read: it consumes `receive` messages."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait((work_task, watch_task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.wait((work_task,))
    return None if work_task.cancelled() else work_task.result()


async def _wait_for_disconnect(receive: Receive) -> None:
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a broken connection is a gone client
        log.debug("receive failed; treating the client as disconnected", exc_info=True)


# ------------------------------------------------------------------------ errors

_INTERNAL_MESSAGE = ("The server had an internal error while handling this request (it is logged). "
                     "Retry the request; if the error persists, report it with the request.")


def _error_body(error_type: str, message: str, param: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=message, type=error_type, param=param))


def error_response(exc: RequestError) -> Response:
    """The OpenAI error response of `exc`: its kind's status, and `Retry-After` when set."""
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if exc.kind is ErrorKind.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return _json(_error_body(exc.kind.openai_type, exc.message, exc.param), exc.kind.http_status, headers)


@contextlib.contextmanager
def _counting_refusals(metrics: GatewayMetrics) -> Iterator[None]:
    """Count the requests refused before they reach the frontend's stream (which counts
    its own)."""
    try:
        yield
    except RequestError as exc:
        metrics.error(exc.kind)
        raise


def _install_error_handlers(app: FastAPI, metrics: GatewayMetrics) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        metrics.error(ErrorKind.INVALID_ARGUMENT)
        message, param = describe_validation_errors(exc.errors())
        return error_response(RequestError(ErrorKind.INVALID_ARGUMENT, message, param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = next((k for k in ErrorKind if k.http_status == exc.status_code),
                    ErrorKind.INTERNAL if exc.status_code >= 500 else ErrorKind.INVALID_ARGUMENT)
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return _json(_error_body(kind.openai_type, message), exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # Starlette re-raises after this response is sent, so the server logs the cause.
        return _json(_error_body(ErrorKind.INTERNAL.openai_type, _INTERNAL_MESSAGE), 500)


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A readable message for pydantic's errors about a request body, and the top-level
    field to blame (OpenAI's `param`)."""
    first = errors[0]
    if first["type"] == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "malformed JSON")
        return (f"The request body is not valid JSON ({reason}, at character {first['loc'][-1]}); "
                "send a JSON object."), None
    if first["loc"] == ("body",):
        if first["type"] == "missing":
            return "The request body is missing; send a JSON object with the request's fields.", None
        return "The request body must be a JSON object with the request's fields.", None
    by_field: dict[str, list[tuple[tuple, dict[str, Any]]]] = {}
    for error in errors:
        path = _field_path(error["loc"][1:]) or ("body",)
        by_field.setdefault(str(path[0]), []).append((path, error))
    problems: dict[str, list[str]] = {}
    for field_errors in by_field.values():
        # A union's member tags are dropped from the paths, so its members' errors share a
        # path; the deepest paths are the most specific complaints.
        deepest = max(len(path) for path, _ in field_errors)
        for path, error in field_errors:
            if len(path) == deepest:
                problems.setdefault(_dotted(path), []).append(_describe_error(error))
    described = "; ".join(f"{path}: {' or '.join(dict.fromkeys(complaints))}"
                          for path, complaints in list(problems.items())[:4])
    return f"Invalid request: {described}. See /docs for the request schema.", next(iter(by_field))


def _field_path(loc: tuple) -> tuple:
    """`loc` without the union-member tags pydantic puts in it (field names are snake case)."""
    return tuple(p for p in loc if isinstance(p, int) or (p.isidentifier() and p.islower()
                                                          and p not in ("str", "int", "float", "bool")))


def _dotted(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _describe_error(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unrecognized field; remove it"
    value = error.get("input")
    if isinstance(value, (int, float, str, bool)) and len(repr(value)) <= 40:
        return f"{error['msg']} (got {value!r})"
    return error["msg"]


# ------------------------------------------------------------------------ auth

class ApiKeyMiddleware:
    """Refuses /v1/* requests without `Authorization: Bearer <api_key>` (401), before
    their body is read; every other path stays open."""

    def __init__(self, app: ASGIApp, api_key: str, metrics: GatewayMetrics) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")):
            problem = self._problem(Headers(scope=scope).get("authorization"))
            if problem is not None:
                self._metrics.error(ErrorKind.UNAUTHENTICATED)
                await error_response(RequestError(ErrorKind.UNAUTHENTICATED, problem))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, header: str | None) -> str | None:
        if not header:
            return "Missing API key: send it in the header 'Authorization: Bearer <key>'."
        if not hmac.compare_digest(header.encode(), self._expected):
            return "Incorrect API key provided; send the key this server was started with."
        return None


# ------------------------------------------------------------------------ OpenAPI

def _error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Error responses to document; "default" stands for the rest (and replaces FastAPI's
    422, which this API never sends)."""
    documented: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": _STATUS_MEANING[status]} for status in statuses}
    documented["default"] = {"model": ErrorResponse, "description": "An error, in the OpenAI error shape."}
    return documented


_STATUS_MEANING = {
    400: "The request is invalid; the message says what to change.",
    401: "Missing or wrong API key.",
    404: "The model is not served here.",
    408: "The request's timeout expired before it started streaming.",
    429: "The server is at capacity; retry after Retry-After seconds.",
    503: "No worker is ready.",
}


def _generation_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "description": "The completion; with stream=true, server-sent events "
                  "of its chunks, ending with `data: [DONE]`.",
                  "content": {"text/event-stream": {"schema": _SSE_EVENT_SCHEMA}}},
            **_error_responses(*_STATUS_MEANING)}


# One event of a stream (OpenAPI 3.1 reads a text/event-stream schema as one event's).
_SSE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "A chunk (the completion object with the "
                            "new text; chat: `chat.completion.chunk`) as JSON, `{\"error\": {...}}` "
                            "if the request failed after the stream started, or `[DONE]` last."}},
}
