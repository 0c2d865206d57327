"""`AsyncEngine`: an `EngineCore` stepping on its own thread, streamed to asyncio callers.

Data flows one way. Callers put commands (add, finish) on a queue; the engine thread
applies them between steps, so an abort takes effect before the next step and frees the
request's blocks within one step. Token deltas go back to each caller's asyncio queue
through its event loop. Nothing but the engine thread touches the core; `on_iteration`
(if given) runs on that thread after every loop iteration, so it may read the core to
publish snapshots (stats, prefix-cache events) for other threads.

A remote request (`generate_remote`: a prefill worker computes its prompt) first yields
its KV ticket, then its deltas. While only such requests wait for their KV, the thread polls their transfers
every `KV_POLL_SECONDS` instead of spinning, leaving the GIL to the listener threads
that write the KV. A group's follower (`generate(..., follows=leader id)`) streams like any
request; the core holds it until its leader's prompt KV is here (EngineCore.add_request).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

from pdserve.engine.engine import EngineCore
from pdserve.kv_transfer.messages import KVTicket
from pdserve.runtime.engine_thread import EngineThread
from pdserve.runtime.request import TokenDelta
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason
from pdserve.runtime.structured_output import compile_grammar

log = logging.getLogger(__name__)

KV_POLL_SECONDS = 0.002


class _Sink(NamedTuple):
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: TokenDelta | KVTicket | BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass  # the caller's loop is closed; nobody is listening any more


class _Add(NamedTuple):
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: _Sink
    remote: bool  # a prefill worker computes the prompt: the first item put on the sink is its ticket
    resume_at: int | None  # see EngineCore.add_request
    follows: str | None  # the group's leader (local requests only; see EngineCore.add_request)


class _FailRemote(NamedTuple):
    request_id: str
    reason: str


class _Finish(NamedTuple):
    request_id: str
    reason: FinishReason


class AsyncEngine(EngineThread):
    def __init__(self, core: EngineCore, on_iteration: Callable[[EngineCore], None] | None = None,
                 threads: int | None = None) -> None:
        self.core = core
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._ids = itertools.count()
        super().__init__(core, "pdserve-engine", KV_POLL_SECONDS, on_iteration, threads)

    @property
    def num_waiting(self) -> int:
        """Requests submitted but not yet running (an estimate: read from another thread)."""
        return self.num_queued_commands + len(self.core.scheduler.waiting) + self.core.num_held_followers

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
        resume_at: int | None = None, follows: str | None = None,
    ) -> AsyncIterator[TokenDelta]:
        """Stream the request's token deltas; the last one carries its finish reason.
        Raises RequestRejected (ValueError) if the engine cannot take it. Leaving the
        iteration early (break, cancellation, disconnect) aborts the request.
        `resume_at`: a migrated request; `follows`: the id of its group's leader, sent
        before it with the same prompt (see EngineCore.add_request for both)."""
        async for item in self._stream(prompt_ids, params, request_id, False, resume_at, follows):
            yield item

    async def generate_remote(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
        resume_at: int | None = None,
    ) -> AsyncIterator[KVTicket | TokenDelta | None]:
        """Like `generate` for a request whose prompt a prefill worker computes. The
        first item is the KVTicket to hand to that worker, or None when the pool cannot
        hold the request now: it is then prefilled here. Token deltas follow."""
        async for item in self._stream(prompt_ids, params, request_id, True, resume_at, None):
            yield item

    def fail_remote(self, request_id: str, reason: str) -> None:
        """The prefill side cannot deliver this request's KV (its worker died or refused
        the job): recompute or fail it now, per the engine's policy."""
        self.post(_FailRemote(request_id, reason))

    async def _stream(self, prompt_ids, params, request_id, remote, resume_at, follows):
        if not self.is_alive:
            raise RuntimeError("the engine has been shut down")
        request_id = request_id or f"req-{next(self._ids)}"
        await compile_grammar(self.core.grammars, params)
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        self.post(_Add(request_id, list(prompt_ids), params, sink, remote, resume_at, follows))
        finished = False
        try:
            while not finished:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = isinstance(item, TokenDelta) and item.finish_reason is not None
                yield item
        finally:
            if not finished:
                self.post(_Finish(request_id, FinishReason.ABORT))

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        """Finish a request from any thread; its stream ends with a delta saying why."""
        self.post(_Finish(request_id, reason))

    # ------------------------------------------------------------------ engine thread

    def _has_unfinished(self) -> bool:
        return self.core.has_unfinished

    def _has_compute(self) -> bool:
        return self.core.scheduler.has_work

    def _apply(self, command: _Add | _Finish | _FailRemote) -> None:
        if isinstance(command, _Add):
            self._add(command)
        elif isinstance(command, _FailRemote):
            self.core.fail_remote(command.request_id, command.reason)
        else:
            self._finish(command.request_id, command.reason)

    def _command_failed(self, command: _Add | _Finish | _FailRemote, exc: Exception) -> None:
        """End the command's request with an error; the batch goes on."""
        request_id = command.request_id
        sink = command.sink if isinstance(command, _Add) else self._sinks.get(request_id)
        self._sinks.pop(request_id, None)
        try:
            self.core.finish_request(request_id, FinishReason.ERROR)  # frees whatever it holds
        except Exception:  # it may never have been added: nothing more to free
            log.exception("could not finish request %s after its command failed", request_id)
        if sink is not None:
            sink.put(RuntimeError(f"request {request_id} failed on the decode worker: {type(exc).__name__}: {exc}"))

    def _close(self, unapplied: list) -> None:
        for request_id in list(self._sinks):
            self._finish(request_id, FinishReason.ABORT)
        for command in unapplied:
            if isinstance(command, _Add):
                command.sink.put(RuntimeError("the engine has been shut down"))

    def _add(self, command: _Add) -> None:
        try:
            if command.remote:
                ticket = self.core.add_remote_request(command.request_id, command.prompt_ids, command.params,
                                                      command.resume_at)
                if ticket is None:  # no room to reserve now: prefill it here when there is
                    self.core.add_request(command.request_id, command.prompt_ids, command.params,
                                          command.resume_at)
                command.sink.put(ticket)
            else:
                self.core.add_request(command.request_id, command.prompt_ids, command.params, command.resume_at,
                                      command.follows)
            self._sinks[command.request_id] = command.sink
        except ValueError as exc:
            command.sink.put(exc)

    def _finish(self, request_id: str, reason: FinishReason) -> None:
        delta = self.core.finish_request(request_id, reason)
        sink = self._sinks.pop(request_id, None)
        if delta is not None and sink is not None:
            sink.put(delta)

    def _step(self) -> None:
        try:
            deltas = self.core.step()
        except Exception:
            # A failed step leaves no request in a known state: fail them all, loudly,
            # and keep serving new ones.
            self._num_errors += 1
            log.exception("engine step failed; finishing every running request with an error")
            for request_id in list(self._sinks):
                self._finish(request_id, FinishReason.ERROR)
            return
        for delta in deltas:
            sink = self._sinks.get(delta.request_id)
            if delta.finish_reason is not None:
                self._sinks.pop(delta.request_id, None)
            if sink is not None:
                sink.put(delta)
