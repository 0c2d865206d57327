"""What differs between the torch.distributed KV transport's backends, and how a wait on a
pair is bounded.

`Gloo`: gloo over TCP with CPU tensors. `Nccl`: NCCL with CUDA tensors, each end of a pair
on a stream of its own (`PairStream`), so frames never queue behind the engine's kernels.
Only gloo runs on a CPU machine.

Waits. A gloo work completes only inside `wait()`, which takes a timeout and cannot be
interrupted; a wait that times out closes the pair. An NCCL work must never be waited for
with `work.wait(timeout)`: a timed-out NCCL operation is an error that the group's watchdog
answers by taking the process down. NCCL works are polled (`is_completed`) against our own
deadline instead, the caller aborts the communicator when it passes, and each NCCL group's
watchdog timeout is set well past the longest wait on it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import timedelta
from typing import ClassVar

import torch
import torch.distributed as dist

from pdserve.kv_transfer.transports.base import TransportError

logger = logging.getLogger(__name__)

TAG = 0  # every operation on a pair: frames are ordered by the pair, not by tags
WATCHDOG_MARGIN_S = 60.0  # an NCCL group's watchdog timeout is this far past our longest wait on it
# Polling an NCCL work: sleeps double from POLL_FIRST_S up to POLL_BUSY_S for the first
# POLL_BUSY_FOR_S of a wait (a frame's parts follow each other closely), then up to
# POLL_IDLE_S (what was waited for that long may wait a little more).
POLL_FIRST_S, POLL_BUSY_S, POLL_BUSY_FOR_S, POLL_IDLE_S = 20e-6, 1e-3, 0.05, 5e-3

Wait = Callable[[object, float, "threading.Event | None"], bool]


class LinkTimeout(TransportError):
    """A wait on a pair ran out of time (or was cancelled); the pair is unusable."""


def wait_blocking(work, timeout: float, cancel: threading.Event | None = None) -> bool:
    """Gloo's wait: inside `work.wait`, at most `timeout`; `cancel` cannot interrupt it.
    A wait that times out raises (and closes the pair)."""
    return work.wait(timedelta(seconds=timeout))


def poll_work(work, timeout: float, cancel: threading.Event | None = None) -> bool:
    """NCCL's wait: poll `work` until it completed (True), `timeout` passed or `cancel` is
    set (False: the caller then aborts the communicator). Never `work.wait(timeout)`."""
    started = time.monotonic()
    delay = POLL_FIRST_S
    while not work.is_completed():
        waited = time.monotonic() - started
        if waited >= timeout or (cancel is not None and cancel.is_set()):
            return False
        time.sleep(min(delay, timeout - waited))
        delay = min(2 * delay, POLL_BUSY_S if waited < POLL_BUSY_FOR_S else POLL_IDLE_S)
    work.wait()  # raises the operation's error, if any; orders the current stream after it
    return True


def run_op(op, tensor: torch.Tensor, peer: int, timeout: float, what: str, wait: Wait = wait_blocking,
           cancel: threading.Event | None = None):
    """`op` (a group's send or recv) on `tensor` with `peer`, waited for by `wait` (the
    backend's; gloo's by default) for at most `timeout`. Failures, raised at once or by the
    wait, come out as TransportError, and LinkTimeout for a timeout or `cancel`.

    Returns the work, which callers hold until the next frame's works have completed:
    destroying gloo works before posting the next operations makes the next exchange spin
    for ~3 ms (measured with torch 2.13's gloo on 2 cores; a ping goes from ~4 ms to
    ~0.2 ms with the works held)."""
    try:
        work = op([tensor], peer, TAG)
        completed = wait(work, timeout, cancel)
    except RuntimeError as exc:  # peer closed, gloo's timeout: the pair is unusable after either
        error = LinkTimeout if "timed out" in str(exc).lower() else TransportError
        raise error(f"failed to {what}: {exc}") from None
    if not completed:
        cancelled = cancel is not None and cancel.is_set()
        raise LinkTimeout(f"failed to {what}: " + ("cancelled" if cancelled else f"not done within {timeout} s"))
    return work


class PairStream:
    """Where one end of a pair queues its device work: a CUDA stream of its own, or nothing
    (host tensors). Entering it makes it current (and its device) for the thread."""

    def __init__(self, stream: torch.cuda.Stream | None = None) -> None:
        self.stream = stream
        self._contexts = threading.local()

    def __enter__(self) -> None:
        stack = contextlib.ExitStack()
        if self.stream is not None:
            stack.enter_context(torch.cuda.device(self.stream.device))
            stack.enter_context(torch.cuda.stream(self.stream))
        self._contexts.__dict__.setdefault("stacks", []).append(stack)

    def __exit__(self, *exc) -> None:
        self._contexts.stacks.pop().close()

    def follow_caller(self) -> None:
        """Order what is queued on this stream next after what the calling thread's current
        stream has queued so far (e.g. the forward that wrote the pages to send)."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))

    def synchronize(self) -> None:
        """Wait until everything queued on this stream is done."""
        if self.stream is not None:
            self.stream.synchronize()


class Backend(ABC):
    name: ClassVar[str]
    device_type: ClassVar[str]  # where its tensors lie, and so the pools it sends from in place
    # Whether a channel sends pool chunks with `device_checksum` (DEVICE_CHUNK frames)
    # rather than XXH3 of host bytes.
    checksums_on_device: ClassVar[bool] = False
    wait: ClassVar[Wait]  # how a work on its groups is waited for

    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def group(self, store: dist.Store, rank: int, connect_timeout: float, longest_wait: float,
              local_host: str) -> dist.ProcessGroup:
        """A 2-rank group over `store`; `longest_wait`: the longest any wait on it may last."""

    def pair_stream(self) -> PairStream:
        """A stream for one end of a pair."""
        return PairStream()

    def shut_down(self, group: dist.ProcessGroup) -> None:
        """End a group none of whose operations is pending (both ends do, after a CLOSE)."""
        try:
            group.shutdown()
        except RuntimeError as exc:
            logger.debug("shutting a %s KV pair down failed: %s", self.name, exc)

    @abstractmethod
    def abandon(self, group: dist.ProcessGroup) -> None:
        """End a group in an unknown state (an operation may be pending on it)."""


class Gloo(Backend):
    name = "gloo"
    device_type = "cpu"
    wait = staticmethod(wait_blocking)
    # One gloo device (a socket and its event loop) per local address, shared by every pair
    # of the process.
    _devices: ClassVar[dict[str, object]] = {}
    _devices_lock = threading.Lock()

    def device(self) -> torch.device:
        return torch.device("cpu")

    def group(self, store, rank, connect_timeout, longest_wait, local_host):
        with self._devices_lock:
            if local_host not in self._devices:
                self._devices[local_host] = dist.ProcessGroupGloo.create_device(hostname=local_host)
            device = self._devices[local_host]
        options = dist.ProcessGroupGloo._Options()
        options._devices = [device]  # bound to local_host only, never to every interface
        options._timeout = timedelta(seconds=connect_timeout)  # the rendezvous; every wait has its own
        return dist.ProcessGroupGloo(store, rank, 2, options)

    def abandon(self, group):
        pass  # a failed or timed-out gloo wait has closed the pair; dropping the group closes the rest


class Nccl(Backend):
    """The same frames as CUDA tensors. NCCL's own bootstrap sockets follow
    NCCL_SOCKET_IFNAME, not the listener's host."""

    name = "nccl"
    device_type = "cuda"
    checksums_on_device = True
    wait = staticmethod(poll_work)

    def __init__(self) -> None:
        if not (torch.cuda.is_available() and dist.is_nccl_available()):
            raise TransportError("the nccl KV transport needs CUDA and a torch build with NCCL; "
                                 "use grpc (or gloo) on this machine")
        self._device = torch.device("cuda", torch.cuda.current_device())

    def device(self) -> torch.device:
        return self._device

    def group(self, store, rank, connect_timeout, longest_wait, local_host):
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timedelta(seconds=longest_wait + WATCHDOG_MARGIN_S)  # never reached: see poll_work
        return dist.ProcessGroupNCCL(store, rank, 2, options)

    def pair_stream(self) -> PairStream:
        return PairStream(torch.cuda.Stream(device=self._device))

    def abandon(self, group):
        try:
            group.abort()  # ends pending operations; the watchdog stops without a verdict
        except RuntimeError as exc:
            logger.debug("aborting an nccl KV pair failed: %s", exc)


BACKENDS: dict[str, type[Backend]] = {"gloo": Gloo, "nccl": Nccl}
