"""The request body limit of the OpenAI-compatible HTTP API: an ASGI middleware that
refuses a body over `max_bytes` with 413 without buffering it.

A declared Content-Length over the limit is refused before any byte of the body is read;
a body without one (chunked) is counted as it arrives and refused as soon as it passes the
limit. Either way the event loop never parses or holds more than the limit, so one huge
body cannot stall the other requests' streams.
"""

from __future__ import annotations

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.cluster.gateway.errors import ErrorKind, RequestError
from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.cluster.gateway.openai.errors import error_response


def too_large_message(max_bytes: int) -> str:
    return f"Request body larger than {max_bytes} bytes; send a smaller request."


class BodyTooLarge(HTTPException):
    """Raised while a chunked body is read past the limit; FastAPI passes HTTPExceptions
    raised during body reading through to the app's handler, which answers 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(status_code=ErrorKind.TOO_LARGE.http_status, detail=too_large_message(max_bytes))


class BodySizeLimitMiddleware:
    """Refuses HTTP bodies over `max_bytes` with 413 (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: GatewayMetrics) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The HTTP server has refused a malformed Content-Length already.
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            self._metrics.error(ErrorKind.TOO_LARGE)
            error = RequestError(ErrorKind.TOO_LARGE, too_large_message(self.max_bytes))
            await error_response(error)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    self._metrics.error(ErrorKind.TOO_LARGE)
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)
