"""`AsyncPrefillEngine`: a `PrefillEngine` stepping on its own thread, awaited by asyncio.

    await prefill(job) -> PrefillResult      once the decode worker accepted the KV (ok)
                                             or the transfer failed (reason)
    abort(request_id)                        from any thread; frees the job's blocks

Commands go to the engine thread through a queue and are applied between steps; results
come back through each caller's event loop. Only the engine thread touches the engine;
`on_iteration` runs there after each loop iteration to publish snapshots.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from pdserve.kv_transfer.messages import PrefillJob, PrefillResult
from pdserve.prefill_worker.engine import PrefillEngine
from pdserve.runtime.engine_thread import EngineThread
from pdserve.runtime.structured_output import compile_grammar

log = logging.getLogger(__name__)

SEND_POLL_SECONDS = 0.002  # how often to check transfers when nothing is left to compute


class _Pending(NamedTuple):
    job: PrefillJob
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    accepted_at: float


class _Abort(NamedTuple):
    request_id: str
    reason: str


class AsyncPrefillEngine(EngineThread):
    def __init__(self, engine: PrefillEngine, on_iteration: Callable[[PrefillEngine], None] | None = None,
                 threads: int | None = None) -> None:
        self.engine = engine
        # Engine thread only, keyed by job id (`PrefillEngine.add_job`): a request may have
        # a second job here while its first one's aborted transfer settles.
        self._pending: dict[int, _Pending] = {}
        self._started_at: dict[int, float] = {}  # its first step began
        self._computed_at: dict[int, float] = {}  # its last step ended
        # Prompt tokens of jobs posted / applied so far; each counter has one writer thread.
        self._posted_tokens = 0  # caller's thread
        self._applied_tokens = 0  # engine thread
        super().__init__(engine, "pdserve-prefill", SEND_POLL_SECONDS, on_iteration, threads)

    async def prefill(self, job: PrefillJob) -> PrefillResult:
        """Compute the job's prompt and push its KV; return when the transfer settled.
        Raises ValueError if the job can never run here. Cancelling the await aborts it."""
        if not self.is_alive:
            raise RuntimeError("the prefill engine has been shut down")
        await compile_grammar(self.engine.grammars, job.params)
        loop = asyncio.get_running_loop()
        pending = _Pending(job, loop, loop.create_future(), time.monotonic())
        self._posted_tokens += len(job.prompt_ids)
        self.post(pending)
        try:
            return await pending.future
        except asyncio.CancelledError:
            self.abort(job.ticket.request_id, "cancelled by the caller")
            raise

    @property
    def num_queued_tokens(self) -> int:
        """Prompt tokens of jobs posted but not yet taken by the engine thread."""
        return self._posted_tokens - self._applied_tokens

    def abort(self, request_id: str, reason: str = "aborted") -> None:
        self.post(_Abort(request_id, reason))

    # ------------------------------------------------------------------ engine thread

    def _has_unfinished(self) -> bool:
        return self.engine.has_unfinished

    def _has_compute(self) -> bool:
        return self.engine.scheduler.has_work

    def _apply(self, command: _Pending | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort(command.request_id, command.reason)
            return
        self._applied_tokens += len(command.job.prompt_ids)
        try:
            job_id = self.engine.add_job(command.job)
        except ValueError as exc:
            _set(command, exc)
            return
        self._pending[job_id] = command

    def _command_failed(self, command: _Pending | _Abort, exc: Exception) -> None:
        """End the command's request with a failed result; the other jobs go on."""
        request_id = command.request_id if isinstance(command, _Abort) else command.job.ticket.request_id
        try:
            self.engine.abort(request_id, f"failed on the prefill worker: {type(exc).__name__}")
        except Exception:  # it may never have been added: nothing more to free
            log.exception("could not abort job %s after its command failed", request_id)
        if isinstance(command, _Pending):  # it failed before it was added: it has no job id
            _set(command, RuntimeError(f"job {request_id} failed on the prefill worker: {type(exc).__name__}: {exc}"))
        for job_id in [j for j, p in self._pending.items() if p.job.ticket.request_id == request_id]:
            self._resolve(job_id, False, f"the prefill worker failed this job: {type(exc).__name__}: {exc}")

    def _close(self, unapplied: list) -> None:
        for job_id, pending in list(self._pending.items()):
            self.engine.abort(pending.job.ticket.request_id, "the prefill worker is shutting down")
            self._resolve(job_id, False, "the prefill worker shut down")
        for command in unapplied:
            if isinstance(command, _Pending):
                _set(command, RuntimeError("the prefill engine has been shut down"))

    def _step(self) -> None:
        step_started = time.monotonic()
        try:
            outcomes = self.engine.step()
        except Exception:
            self._num_errors += 1
            log.exception("prefill step failed; failing every job in flight")
            for job_id, pending in list(self._pending.items()):
                self.engine.abort(pending.job.ticket.request_id, "prefill step failed")
                self._resolve(job_id, False, "the prefill step failed (see the prefill worker's log)")
            return
        step_ended = time.monotonic()
        for job_id in self._pending.keys() - self._computed_at.keys():
            request_id = self._pending[job_id].job.ticket.request_id
            computing = self.engine.jobs.computing_job(request_id) == job_id
            request = self.engine.scheduler.requests.get(request_id) if computing else None
            if job_id not in self._started_at and (request is None or request.num_computed_tokens > 0):
                self._started_at[job_id] = step_started
            if request is None:  # its prompt is complete (or it was aborted)
                self._computed_at[job_id] = step_ended
        for outcome in outcomes:
            self._resolve(outcome.job_id, outcome.ok, outcome.reason, outcome.kv_bytes)

    def _resolve(self, job_id: int, ok: bool, reason: str, kv_bytes: int = 0) -> None:
        pending = self._pending.pop(job_id, None)
        now = time.monotonic()
        started = self._started_at.pop(job_id, now)
        computed = self._computed_at.pop(job_id, now)
        if pending is None:
            return
        if not ok:
            log.info("prefill job %s failed: %s%s", pending.job.ticket.request_id, reason,
                     f" (trace {pending.job.traceparent})" if pending.job.traceparent else "")
        _set(pending, PrefillResult(pending.job.ticket.request_id, ok, reason, started - pending.accepted_at,
                                    computed - started, now - computed, kv_bytes))


def _set(pending: _Pending, result: PrefillResult | BaseException) -> None:
    def deliver() -> None:
        if pending.future.done():
            return  # the caller gave up (cancelled)
        if isinstance(result, BaseException):
            pending.future.set_exception(result)
        else:
            pending.future.set_result(result)

    try:
        pending.loop.call_soon_threadsafe(deliver)
    except RuntimeError:
        pass  # the caller's loop is closed
