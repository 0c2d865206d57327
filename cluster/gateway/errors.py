"""Errors a client sees, with the one mapping both APIs use.

Every failure that reaches a client is a `RequestError` of one `ErrorKind`; the HTTP layer
turns it into an OpenAI error body with the kind's status, the gRPC layer into the kind's
status code. Nothing else decides status codes.

A message quotes what the client sent through `shown`, and is cut to MAX_MESSAGE_CHARS
whatever it quotes: gRPC sends it as trailing metadata (percent-encoded beyond ASCII: up
to 12 bytes a character), and a client refuses trailers over 16 KiB; it would see
"Stream removed" instead of the error.
"""

from __future__ import annotations

import enum

MAX_MESSAGE_CHARS = 1024


class ErrorKind(enum.Enum):
    #                  HTTP status, OpenAI error type,        gRPC status code name
    INVALID_ARGUMENT = (400, "invalid_request_error", "INVALID_ARGUMENT")
    UNAUTHENTICATED = (401, "authentication_error", "UNAUTHENTICATED")
    NOT_FOUND = (404, "not_found_error", "NOT_FOUND")
    TIMEOUT = (408, "timeout_error", "DEADLINE_EXCEEDED")
    TOO_LARGE = (413, "invalid_request_error", "RESOURCE_EXHAUSTED")
    OVERLOADED = (429, "rate_limit_error", "RESOURCE_EXHAUSTED")
    INTERNAL = (500, "internal_error", "INTERNAL")
    UNAVAILABLE = (503, "service_unavailable", "UNAVAILABLE")

    @property
    def http_status(self) -> int:
        return self.value[0]

    @property
    def openai_type(self) -> str:
        return self.value[1]

    @property
    def grpc_code_name(self) -> str:
        """The name of the `grpc.StatusCode` member (this module does not import grpc)."""
        return self.value[2]


class RequestError(Exception):
    """A request failed for a reason the client should hear. `message` says what was wrong
    and what to do; `param` names the offending request field, if one; `retry_after` is
    the seconds a client should wait before retrying (overload only)."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None,
                 retry_after: float | None = None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[:MAX_MESSAGE_CHARS - 20]}... (message cut)"
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"RequestError({self.kind.name}, {self.message!r})"


def shown(value: object, max_chars: int = 60) -> str:
    """`repr(value)` for an error message, cut to about `max_chars` characters."""
    text = repr(value)
    return text if len(text) <= max_chars else f"{text[:max_chars]}... ({len(text)} characters)"


def invalid(message: str, param: str | None = None) -> RequestError:
    return RequestError(ErrorKind.INVALID_ARGUMENT, message, param)
