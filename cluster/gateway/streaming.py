"""HTTP response plumbing that knows ASGI but not OpenAI: pydantic bodies as JSON
responses or server-sent events, an event-stream response that always runs its cleanup,
and awaiting work unless the client goes away first.

Nothing here holds state between requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

import anyio
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)
T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"  # the last event of every stream


def sse_event(body: BaseModel) -> bytes:
    """`body` as one server-sent event."""
    return b"data: " + body.model_dump_json().encode() + b"\n\n"


def json_response(body: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    # pydantic writes non-finite floats as null, where json.dumps would fail the response.
    return Response(body.model_dump_json(), status_code=status_code, headers=headers,
                    media_type="application/json")


class EventStreamResponse(StreamingResponse):
    """A server-sent-events response that calls `on_close` on every exit: the end of the
    events, an error, or the client going away (noticed through `receive`, whether or not
    a send fails, and also before the first event)."""

    def __init__(self, events: AsyncGenerator[bytes, None], on_close: Callable[[], Awaitable[None]],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **(headers or {})})
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
