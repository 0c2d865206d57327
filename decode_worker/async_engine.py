"""`AsyncEngine`: an `EngineCore` stepping on its own thread, streamed to asyncio callers.

Data flows one way. Callers put commands (add, finish) on a queue; the engine thread
applies them between steps, so an abort takes effect before the next step and frees the
request's blocks within one step. Token chunks go back to each caller's asyncio queue
through its event loop. Nothing but the engine thread touches the core.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import NamedTuple

from pdserve.decode_worker.engine import EngineCore
from pdserve.runtime.request import TokenChunk
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason

log = logging.getLogger(__name__)


class _Sink(NamedTuple):
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: TokenChunk | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass  # the caller's loop is closed; nobody is listening any more


class _Add(NamedTuple):
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: _Sink


class _Finish(NamedTuple):
    request_id: str
    reason: FinishReason


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._commands: queue.SimpleQueue[_Add | _Finish | None] = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[TokenChunk]:
        """Stream the request's token chunks; the last one carries its finish reason.
        Raises RequestRejected (ValueError) if the engine cannot take it. Leaving the
        iteration early (break, cancellation, disconnect) aborts the request."""
        if not self._thread.is_alive():
            raise RuntimeError("the engine has been shut down")
        request_id = request_id or f"req-{next(self._ids)}"
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(_Add(request_id, list(prompt_ids), params, sink))
        finished = False
        try:
            while not finished:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                self._commands.put(_Finish(request_id, FinishReason.ABORT))

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        """Finish a request from any thread; its stream ends with a chunk saying why."""
        self._commands.put(_Finish(request_id, reason))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._commands.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while True:
            if not self._apply_commands(block=not self.core.has_unfinished):
                break
            if self.core.has_unfinished:
                self._step()
        for request_id in list(self._sinks):
            self._finish(request_id, FinishReason.ABORT)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle). False means shut down."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command is None:
                return False
            if isinstance(command, _Add):
                try:
                    self.core.add_request(command.request_id, command.prompt_ids, command.params)
                    self._sinks[command.request_id] = command.sink
                except ValueError as exc:
                    command.sink.put(exc)
            else:
                self._finish(command.request_id, command.reason)

    def _finish(self, request_id: str, reason: FinishReason) -> None:
        chunk = self.core.finish_request(request_id, reason)
        sink = self._sinks.pop(request_id, None)
        if chunk is not None and sink is not None:
            sink.put(chunk)

    def _step(self) -> None:
        try:
            chunks = self.core.step()
        except Exception:
            # A failed step leaves no request in a known state: fail them all, loudly,
            # and keep serving new ones.
            log.exception("engine step failed; finishing every running request with an error")
            for request_id in list(self._sinks):
                self._finish(request_id, FinishReason.ERROR)
            return
        for chunk in chunks:
            sink = self._sinks.get(chunk.request_id)
            if chunk.finish_reason is not None:
                self._sinks.pop(chunk.request_id, None)
            if sink is not None:
                sink.put(chunk)
