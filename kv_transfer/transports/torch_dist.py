"""torch.distributed transport: a 2-rank process group per (prefill, decode) pair.

Kinds: gloo (TCP, CPU tensors) and nccl (CUDA tensors); the backend is the only
difference. A sender takes a pair index from the listener's TCPStore and, once the
listener answers "ok", both ends form a group for that pair alone. This module holds the
listener and the entry points; the rest, one concern each:

    torch_dist_pairs     the listener's store: pair counter, verdicts, close keys
    torch_dist_frames    the frames on a pair and the tensors they travel in
    torch_dist_served    the listener's end of one pair (a thread each)
    torch_dist_channel   the sender's end (`TorchDistChannel`)
    torch_dist_backends  gloo and nccl, and how a wait on a pair is bounded
    device_checksum      the checksum of bytes on a GPU

Where the pages lie. `send_pool_pages` from a pool on the backend's device (CUDA + nccl,
CPU + gloo) sends them from there: a run of consecutive blocks as two views of the pool
(nothing copied), scattered blocks gathered on that device first. Over nccl such a chunk
carries its `device_checksum` (a DEVICE_CHUNK frame), taken on the GPU, and the listener
verifies it on its staging tensor and writes the pages into its pool on the GPU: no byte
of a payload crosses to the host on either side. Over gloo a chunk carries XXH3
(`layout.checksum`), the host bytes being there anyway. A pool elsewhere than the
backend's device is packed on the host and sent as `send_pages` sends bytes. A caller may
leave a pool chunk's checksum to the channel (`PagesHeader.checksum` None): a sender
whose pool is on a GPU cannot take XXH3 without copying the pages to the host.

Closing a pair, with no wait timing out on the way:
- The sender closes it (`close`, or before replacing a pair the listener asked it to
  close): a CLOSE frame, the listener's acknowledgement, then both ends shut their group
  down with nothing pending on it. The listener counts it in `explicit_closes`.
- A sender keeps its pair busy with a ping every idle_timeout / 4 from a background
  thread. A pair with no frame for idle_timeout (its sender stopped pinging) is one the
  listener asks to be closed (counted as `idle_timeout`); a channel idle for
  idle_timeout / 2 reads that ask before its next frame, closes the pair as above and
  opens a fresh one.
- Only a pair that fails, stalls in a frame, or whose sender has not answered the ask
  within op_timeout is dropped (gloo's wait times out and closes it; an NCCL communicator
  is aborted). The listener marks it gone, and the sender drops its end without a CLOSE.

What a peer writes is never turned into threads or allocations: the pair counter in the
store is a number any client may set, so the listener answers at most
max_channels + _BACKLOG new indexes per poll (a bigger jump is skipped whole) and runs at
most max_channels pair threads (one that no sender joins ends after connect_timeout);
frame lengths are checked against HEAD_BYTES and max_chunk_bytes before anything is
received, and a pair gets staging memory only once a chunk header passed the ticket checks.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref

from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.transports import torch_dist_pairs as pairs
from pdserve.kv_transfer.transports.base import (
    DEFAULT_MAX_CHUNK_BYTES,
    KVListener,
    ListenerLimits,
    TransportError,
    decode_reply,
)
from pdserve.kv_transfer.transports.torch_dist_backends import BACKENDS, Backend
from pdserve.kv_transfer.transports.torch_dist_channel import OPEN_CHANNELS, TorchDistChannel
from pdserve.kv_transfer.transports.torch_dist_frames import HEAD_BYTES, REPLY_BYTES
from pdserve.kv_transfer.transports.torch_dist_served import ServedPair

__all__ = ["HEAD_BYTES", "REPLY_BYTES", "TorchDistChannel", "TorchDistListener", "connect", "decode_reply", "listen",
           "reads_pool_on"]

logger = logging.getLogger(__name__)

_POLL_S = 0.02  # how often the listener looks for new pairs and idle ones
_BACKLOG = 32  # new pair indexes per poll beyond max_channels that are still answered


def reads_pool_on(kind: str, device_type: str) -> bool:
    """Whether a `kind` channel sends the pages of a pool on `device_type` ("cpu",
    "cuda") out of the pool in place (`TorchDistChannel.send_pool_pages`): gloo from host
    memory, nccl from CUDA memory."""
    return BACKENDS[kind].device_type == device_type


# Listeners still open at interpreter exit (channels: OPEN_CHANNELS). Closing both before
# finalization matters: a daemon thread that returns from a gloo wait while Python
# finalizes is torn down mid-C++-frame, and the process aborts ("terminate called without
# an active exception").
_OPEN_LISTENERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for channel in list(OPEN_CHANNELS):  # first: their CLOSE frames end their pairs here at once
        channel.close()
    listeners = list(_OPEN_LISTENERS)
    for listener in listeners:
        listener.close()
    deadline = time.monotonic() + 1.0  # pairs whose channel just closed here end within ms
    for listener in listeners:
        listener.join_pairs(max(0.0, deadline - time.monotonic()))


class TorchDistListener(KVListener):
    def __init__(self, receiver: KVReceiver, backend: Backend, host: str = "127.0.0.1", port: int = 0,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, max_channels: int = 16,
                 idle_timeout: float = 10.0, op_timeout: float = 30.0, connect_timeout: float = 30.0) -> None:
        self._receiver, self._backend, self._host = receiver, backend, host
        self._limits = ListenerLimits(max_chunk_bytes, max_channels, idle_timeout, op_timeout)
        self._connect_timeout = connect_timeout
        try:
            self._store = pairs.serve_store(host, port, connect_timeout)
        except (OSError, RuntimeError) as exc:
            raise TransportError(f"cannot start the {backend.name} KV listener on {host}:{port}: {exc}") from exc
        self._port = self._store.port
        self.address = f"{backend.name}://{host}:{self._port}"
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._served: dict[threading.Thread, ServedPair] = {}  # each pair's thread -> its pair, under _lock
        self.explicit_closes = 0  # pairs ended by their sender's CLOSE frame (under _lock)
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"kv-{backend.name}-accept", daemon=True)
        self._acceptor.start()
        _OPEN_LISTENERS.add(self)
        logger.info("%s KV listener at %s (chunks up to %d bytes, %d channels, idle pairs closed after %g s)",
                    backend.name, self.address, max_chunk_bytes, max_channels, idle_timeout)

    @property
    def num_links(self) -> int:
        """Pairs served right now."""
        with self._lock:
            return sum(thread.is_alive() for thread in self._served)

    @property
    def staging_bytes(self) -> int:
        """Staging memory the served pairs hold now."""
        with self._lock:
            return sum(pair.staging_bytes for thread, pair in self._served.items() if thread.is_alive())

    def close(self, join_timeout: float = 1.0) -> None:
        """Stops accepting at once and waits up to `join_timeout` for pair threads to end.
        A gloo pair waiting for a frame ends at its next frame, or op_timeout after its
        idle timeout, instead (gloo waits cannot be interrupted), dropping its link; an
        nccl pair's wait is cancelled."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._acceptor.join(timeout=5 * _POLL_S + 1.0)
        self.join_pairs(join_timeout)
        self._store = None

    def join_pairs(self, timeout: float) -> bool:
        """Wait up to `timeout` for every pair thread to end; True if none is left."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._served)
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    def _accept_loop(self) -> None:
        next_index = 0
        window = self._limits.max_channels + _BACKLOG
        while not self._closed.wait(_POLL_S):
            try:
                count = pairs.pairs_taken(self._store)
                if count - next_index > window:
                    # More new pairs than could ever be served: the counter was pushed by a
                    # client of the store, not by senders. Skip them all; a sender among
                    # them gets no verdict and times out.
                    self._receiver.count_rejection("malformed")
                    logger.warning("%s KV listener %s: the pair counter jumped by %d; skipping those pairs",
                                   self._backend.name, self.address, count - next_index)
                    next_index = count
                refused = sum(not self._answer(index) for index in range(next_index, count))
                self._ask_idle_pairs()
            except RuntimeError:
                logger.exception("%s KV listener %s lost its store", self._backend.name, self.address)
                return
            if refused:
                logger.warning("%s KV listener %s refused %d pair(s): %d served already (max_channels)",
                               self._backend.name, self.address, refused, self._limits.max_channels)
            next_index = max(next_index, count)

    def _answer(self, index: int) -> bool:
        """Give pair `index` a thread, or refuse it in the store (counted) when
        max_channels pairs are served. True if it got a thread."""
        with self._lock:
            # A thread counts until it has returned: its last act is dropping its group.
            self._served = {thread: pair for thread, pair in self._served.items() if thread.is_alive()}
            thread = None
            if len(self._served) < self._limits.max_channels:
                pair = ServedPair(index, (self._host, self._port), self._backend, self._receiver, self._limits,
                                  self._connect_timeout, self._closed)
                thread = threading.Thread(target=self._serve_pair, args=(pair,), daemon=True,
                                          name=f"kv-{self._backend.name}-pair-{index}")
                self._served[thread] = pair
        if thread is None:
            self._receiver.count_rejection("over_connection_limit")  # counted before the sender can know
            pairs.answer(self._store, index, ok=False)
            return False
        pairs.answer(self._store, index, ok=True)
        thread.start()
        return True

    def _serve_pair(self, pair: ServedPair) -> None:
        if pair.run():
            with self._lock:
                self.explicit_closes += 1

    def _ask_idle_pairs(self) -> None:
        """Ask the sender of every pair idle for idle_timeout to close it (counted once)."""
        with self._lock:
            served = list(self._served.values())
        for pair in served:
            if pair.watch.ask_if_idle(self._store, self._limits.idle_timeout):
                self._receiver.count_rejection("idle_timeout")
                logger.info("%s KV listener %s asked the sender of idle pair %d to close it",
                            self._backend.name, self.address, pair.index)


# -------------------------------------------------------------------------- helpers


def _split_target(kind: str, target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TransportError(f"malformed {kind} KV listener address {kind}://{target}; expected {kind}://HOST:PORT")
    return host, int(port)


def listen(kind: str, receiver: KVReceiver, **options) -> TorchDistListener:
    return TorchDistListener(receiver, BACKENDS[kind](), **options)


def connect(kind: str, target: str, timeout: float) -> TorchDistChannel:
    host, port = _split_target(kind, target)
    return TorchDistChannel(BACKENDS[kind](), host, port, timeout)
