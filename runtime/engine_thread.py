"""`EngineThread`: the loop both workers run their engine on.

Callers on any thread `post` commands; the engine thread applies them between steps, so
nothing but that thread touches the engine. Each loop iteration:

    wait for commands  (idle: until one arrives; only transfers in flight: `poll_seconds`,
                        so the thread does not spin and leaves the GIL to the transport
                        threads; otherwise: not at all)
    apply every queued command
    step, if there is work
    on_iteration(engine), if given: publish snapshots for other threads

Subclasses say what the engine's state is and how a command or a step is applied.

Liveness: the loop beats (`health()`) at every iteration and at least every
`HEARTBEAT_SECONDS` while idle, so a heartbeat older than a step could take means the
thread is stuck; a thread that ended without `shutdown` reports what ended it. One bad
command never ends the loop: an exception applying it goes to `_command_failed` (the
subclass fails that command's request) and the loop goes on; so does an exception in
`on_iteration`. Only a BaseException (a bug past recovery, or a test's injected fault)
ends the thread.

Threads: OpenMP thread pools (torch's intra-op threads) belong to the thread that calls
into them. With `threads`, the engine thread sizes its own pool first thing, and the
process's other threads should keep one torch thread: two multi-threaded pools in one
process manage more threads than the cores, so libgomp stops spinning between parallel
regions and every op pays a thread wake-up (measured: matmuls 1.3-1.7x slower from a
second thread of a process whose main thread had a 2-thread pool).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0  # the longest an idle loop waits before it beats again


class EngineHealth(NamedTuple):
    alive: bool  # the loop is running (not stopped, not crashed)
    heartbeat_age: float  # seconds since the loop last beat: how long the current step has run, if one runs
    failure: str | None  # why the loop ended, if it ended without a shutdown
    num_errors: int  # steps, commands and on_iteration calls that raised (each handled, the loop went on)



class EngineThread(ABC):
    def __init__(self, engine: Any, name: str, poll_seconds: float = 0.002,
                 on_iteration: Callable[[Any], None] | None = None, threads: int | None = None) -> None:
        self._engine = engine
        self._threads = threads
        self._measured_threads: int | None = None  # written once by the engine thread
        self._started = threading.Event()
        self._poll_seconds = poll_seconds
        self._on_iteration = on_iteration
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._last_beat = time.monotonic()  # written by the engine thread only
        self._failure: str | None = None  # written once, by the engine thread, as it dies
        self._stopping = False
        self._num_errors = 0  # engine thread only
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_queued_commands(self) -> int:
        """Commands posted but not yet applied by the engine thread."""
        return self._commands.qsize()

    def health(self) -> EngineHealth:
        """The loop's liveness, read from any thread."""
        alive = self._thread.is_alive()
        failure = self._failure
        if not alive and failure is None and not self._stopping:
            failure = "the engine thread ended"
        return EngineHealth(alive, time.monotonic() - self._last_beat, failure, self._num_errors)

    def post(self, command: Any) -> None:
        """Queue a command for the engine thread (any thread may call this)."""
        self._commands.put(command)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------ for subclasses

    @abstractmethod
    def _has_unfinished(self) -> bool:
        """Anything left to do: computing or waiting on a transfer."""

    @abstractmethod
    def _has_compute(self) -> bool:
        """Anything a step would compute (False while only transfers are in flight)."""

    @abstractmethod
    def _apply(self, command: Any) -> None:
        """Apply one posted command (engine thread)."""

    @abstractmethod
    def _step(self) -> None:
        """Run one engine step and deliver its results (engine thread)."""

    def _command_failed(self, command: Any, exc: Exception) -> None:
        """Applying `command` raised `exc` (not a ValueError the subclass handles itself):
        end whatever request the command concerns, with an error (engine thread)."""

    @abstractmethod
    def _close(self, unapplied: list[Any]) -> None:
        """The thread is stopping: end whatever is still in flight, and refuse the
        commands posted after the stop (engine thread)."""

    # ------------------------------------------------------------------ the loop

    @property
    def threads(self) -> int:
        """The torch intra-op threads the engine thread runs with, as read on that thread."""
        self._started.wait()
        return self._measured_threads

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self._failure = f"the engine thread died: {type(exc).__name__}: {exc}"
            log.critical("%s", self._failure, exc_info=True)
            raise

    def _loop(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        self._measured_threads = torch.get_num_threads()
        self._started.set()
        while True:
            self._last_beat = time.monotonic()
            if not self._has_unfinished():
                wait = HEARTBEAT_SECONDS
            elif not self._has_compute():
                wait = self._poll_seconds
            else:
                wait = 0.0
            if not self._apply_commands(wait):
                break
            if self._has_unfinished():
                self._step()
            if self._on_iteration is not None:
                try:
                    self._on_iteration(self._engine)
                except Exception:
                    self._num_errors += 1
                    log.exception("publishing the engine's state failed; the engine goes on")
        unapplied = []
        while True:
            try:
                unapplied.append(self._commands.get_nowait())
            except queue.Empty:
                break
        self._close([c for c in unapplied if c is not None])

    def _apply_commands(self, wait: float) -> bool:
        """Apply queued commands, waiting up to `wait` seconds for the first. False means
        shut down."""
        while True:
            try:
                command = self._commands.get(block=wait != 0.0, timeout=wait)
            except queue.Empty:
                return True
            wait = 0.0
            if command is None:
                return False
            try:
                self._apply(command)
            except Exception as exc:
                self._num_errors += 1
                log.exception("applying %s failed; failing its request, the engine goes on", type(command).__name__)
                self._command_failed(command, exc)
