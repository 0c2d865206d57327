"""How errors leave the OpenAI-compatible HTTP API: as the OpenAI error body, with the
status of their `ErrorKind`.

`install_error_handlers` makes that hold for every error a FastAPI app raises: a
`RequestError`, FastAPI's validation error (a 400 whose message names the fields to fix,
never a 422), Starlette's HTTP errors (404, 405, ...) and anything unexpected (a 500 that
reveals nothing). `counting_refusals` counts the refusals that happen before a request
reaches the frontend's stream.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from pdserve.cluster.gateway.errors import ErrorKind, RequestError
from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.cluster.gateway.openai.responses import ErrorDetail, ErrorResponse
from pdserve.cluster.gateway.streaming import json_response

INTERNAL_MESSAGE = ("The server had an internal error while handling this request (it is logged). "
                    "Retry the request; if the error persists, report it with the request.")


def error_body(error_type: str, message: str, param: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=message, type=error_type, param=param))


def error_response(exc: RequestError) -> Response:
    """The OpenAI error response of `exc`: its kind's status, and `Retry-After` when set."""
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if exc.kind is ErrorKind.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return json_response(error_body(exc.kind.openai_type, exc.message, exc.param), exc.kind.http_status,
                         headers)


@contextlib.contextmanager
def counting_refusals(metrics: GatewayMetrics) -> Iterator[None]:
    """Count the requests refused before they reach the frontend's stream (which counts
    its own)."""
    try:
        yield
    except RequestError as exc:
        metrics.error(exc.kind)
        raise


def install_error_handlers(app: FastAPI, metrics: GatewayMetrics) -> None:
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
        return json_response(error_body(kind.openai_type, message), exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # Starlette re-raises after this response is sent, so the server logs the cause.
        return json_response(error_body(ErrorKind.INTERNAL.openai_type, INTERNAL_MESSAGE), 500)


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
