"""The API key of the OpenAI-compatible HTTP API: an ASGI middleware that refuses /v1/*
requests without `Authorization: Bearer <api_key>`, before their body is read.

Every other path (/health, /metrics, the docs) stays open, for probes and scrapers. The key
is compared in constant time.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from pdserve.cluster.gateway.errors import ErrorKind, RequestError
from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.cluster.gateway.openai.errors import error_response

_PROTECTED = frozenset({"/tokenize", "/detokenize"})  # beside /v1/*: they run the tokenizer


class ApiKeyMiddleware:
    """Refuses /v1/*, /tokenize and /detokenize requests without `Authorization: Bearer
    <api_key>` (401), before their body is read; /health, /metrics and the schema stay open."""

    def __init__(self, app: ASGIApp, api_key: str, metrics: GatewayMetrics) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/") or path in _PROTECTED):
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
