"""The gateway's OpenAI-compatible HTTP API: `create_app(frontend)` -> a FastAPI app.

    POST /v1/completions, /v1/chat/completions   one JSON body, or with stream=true SSE chunks
    GET  /v1/models, /v1/models/{model}
    POST /tokenize, /detokenize                  token ids of a text or conversation, and back (as vLLM)
    GET  /health                                 200 while the backend can serve, else 503
    GET  /metrics                                Prometheus text of `frontend.metrics`

Every error, wherever it arises, leaves as the OpenAI error body with the status of its
`ErrorKind` (FastAPI's 422 included: it becomes a 400 that says which field is wrong). An
error after a stream has started is one `data: {"error": ...}` event, then `data: [DONE]`.

Invariant: whatever ends a request (its end, an error, its timeout, the client going away
while it waits, generates or streams) closes its `OutputStream`, which aborts it on the
workers and frees its KV.

This module owns the routes and the OpenAPI description of the responses. One
generation's path (one choice or n, a body or a stream) is in `generation`; the bodies are
in `protocol` and `messages` (requests), `responses` and `bodies`; tool calls in `..tools`; errors in `errors`; the API key in
`auth`; SSE and disconnect handling in `..streaming`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from pdserve.cluster.gateway.errors import ErrorKind, RequestError
from pdserve.cluster.gateway.frontend import DEFAULT_MAX_REQUEST_BYTES, Frontend
from pdserve.cluster.gateway.openai.auth import ApiKeyMiddleware
from pdserve.cluster.gateway.openai.bodies import ChatBodies, CompletionBodies
from pdserve.cluster.gateway.openai.errors import counting_refusals, install_error_handlers
from pdserve.cluster.gateway.openai.generation import ChoicePlan, serve
from pdserve.cluster.gateway.openai.limits import BodySizeLimitMiddleware
from pdserve.cluster.gateway.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from pdserve.cluster.gateway.openai.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    ErrorResponse,
    ModelList,
    ModelObject,
    TokenizeResponse,
)
from pdserve.version import __version__


def create_app(frontend: Frontend, *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The HTTP API over `frontend`. With `api_key`, /v1/* requires
    `Authorization: Bearer <api_key>`; /health and /metrics stay open for probes and
    scrapers. Bodies over `max_body_bytes` get 413 unread (openai/limits.py). The app
    holds no state of its own: serve it from one event loop."""
    app = FastAPI(title="pdserve", version=__version__,
                  summary="OpenAI-compatible API of the pdserve prefill/decode serving cluster.")
    install_error_handlers(app, frontend.metrics)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes, metrics=frontend.metrics)
    if api_key is not None:  # added last, so it runs first: no body is looked at unauthenticated
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, metrics=frontend.metrics)

    @app.post("/v1/completions", response_model=None, responses=_generation_responses(CompletionResponse))
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        bodies_for = _BodiesFor(CompletionBodies, "cmpl", frontend, logprobs=body.logprobs is not None,
                                 token_ids=body.return_token_ids, echo=bool(body.echo))
        with counting_refusals(frontend.metrics):
            frontend.check_model(body.model)
            body.check_supported()
            prepared = await frontend.prepare(prompt=body.prompt_input(), sampling=body.sampling(),
                                              timeout=body.timeout, request_id=bodies_for.response_id,
                                              field_names=body.field_names(), api="completions",
                                              traceparent=request.headers.get("traceparent"))
            plan = ChoicePlan(bodies_for, bool(body.stream), body.include_usage, body.num_sequences, body.num_choices)
            return await serve(request, frontend, prepared, plan)

    @app.post("/v1/chat/completions", response_model=None,
              responses=_generation_responses(ChatCompletionResponse))
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        family = frontend.tool_family
        bodies_for = _BodiesFor(ChatBodies, "chatcmpl", frontend, logprobs=bool(body.logprobs),
                                 token_ids=body.return_token_ids, tool_family=family if body.offers_tools else None,
                                 forced_tools=body.forces_tool_calls)
        with counting_refusals(frontend.metrics):
            frontend.check_model(body.model)
            body.check_supported()
            messages, tools = body.template_input(family, frontend.tokenizer.supports_tools)
            prepared = await frontend.prepare(messages=messages, tools=tools, sampling=body.sampling(family),
                                              default_max_tokens=None, timeout=body.timeout,
                                              request_id=bodies_for.response_id, field_names=body.field_names(),
                                              api="chat", traceparent=request.headers.get("traceparent"))
            plan = ChoicePlan(bodies_for, bool(body.stream), body.include_usage, body.num_sequences, body.num_choices)
            return await serve(request, frontend, prepared, plan)

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

    @app.post("/tokenize", responses=_error_responses(400, 404))
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        with counting_refusals(frontend.metrics):
            frontend.check_model(body.model)
            prompt, messages = body.input()
            tokens = await frontend.tokenize(prompt=prompt, messages=messages,
                                             add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=frontend.card.max_model_len, tokens=tokens)

    @app.post("/detokenize", responses=_error_responses(400, 404))
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        with counting_refusals(frontend.metrics):
            frontend.check_model(body.model)
            return DetokenizeResponse(prompt=frontend.detokenize(body.tokens))

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


class _BodiesFor:
    """Body builders of one response, one per choice index, all under the response's id
    (also the request's id on the workers). `options`: the builders' keyword arguments
    (logprobs, token_ids, echo, tool calls)."""

    def __init__(self, cls: type[Bodies], id_prefix: str, frontend: Frontend, **options: Any) -> None:
        self.response_id = f"{id_prefix}-{uuid.uuid4().hex}"
        self._cls, self._frontend, self._options = cls, frontend, options
        self._created = int(time.time())

    def __call__(self, index: int) -> Bodies:
        return self._cls(self.response_id, self._frontend.card.name, self._created, self._frontend.token_text,
                         index=index, **self._options)


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
