"""Shared-memory transport for a prefill and a decode worker on one host.

Per link the listener owns a staging region (`multiprocessing.shared_memory`, one chunk's
worth) and hands its file descriptor to the sender over the control socket (SCM_RIGHTS).
The sender copies a chunk's payload into the region and sends only the small header over
the socket; the receiver validates and writes pages straight from the region, so the
payload never crosses a socket.

Control socket: AF_UNIX (in the abstract namespace on Linux) with the framing of
stream.py. A link has no region until it earns one: its first chunk goes in two steps,

    sender -> listener  frame head and header (the payload length says a payload follows)
    listener -> sender  refused (final; nothing else comes), or "proceed" with the new
                        region's fd attached: the header passed the receiver's ticket checks
    sender -> listener  READY, once the payload is in the region
    listener -> sender  the frame's reply

and every later chunk in one (payload in the region before its frame is sent).

Memory: at start-up the listener checks that /dev/shm has room for a region per channel
it may serve, and fails with what is free and what is needed, rather than leave a sender to
hit SIGBUS on a page that tmpfs cannot back; each region's pages are reserved when it is
made (posix_fallocate), so a /dev/shm filled by others later refuses that chunk instead.
No /dev/shm entry outlives a handshake: the listener unlinks the region right after
creating it, so the memory goes away with the last process that maps it, whoever dies.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import socket
import sys
import tempfile
from multiprocessing import shared_memory

from pdserve.kv_transfer.messages import MessageRejected
from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.transports.base import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CHUNK_BYTES,
    REPLY_HEAD_BYTES,
    ListenerLimits,
    TransportError,
    admit_frame,
    apply_frame,
    encode_proceed,
    serve_frame,
)
from pdserve.kv_transfer.transports.stream import (
    HELLO,
    Deadline,
    LinkDropped,
    Staging,
    StreamChannel,
    StreamListener,
    as_bytes_view,
    frame_bytes,
    recv_exact,
)

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SHM_DIR = "/dev/shm"  # where shm_open's segments live on Linux
READY = b"\x01"  # sender -> listener: the payload of a two-step chunk is in the region


def _socket_address(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise TransportError(f"shm listener name {name!r} must match {_NAME.pattern}")
    if sys.platform.startswith("linux"):
        return f"\0pdserve-kv-{name}"  # abstract: nothing on disk to leak
    return os.path.join(tempfile.gettempdir(), f"pdserve-kv-{name}.sock")


def check_room(max_channels: int, region_bytes: int, directory: str = SHM_DIR) -> None:
    """Raise TransportError unless `directory` (a tmpfs) has room for `max_channels`
    regions of `region_bytes`. Where it does not exist (macOS keeps segments in the
    kernel) there is nothing to measure."""
    if not os.path.isdir(directory):
        return
    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    needed = max_channels * region_bytes
    if free < needed:
        raise TransportError(
            f"{directory} has {_mib(free)} free, but the shm KV listener needs {_mib(needed)} "
            f"({max_channels} channels x {_mib(region_bytes)} staging regions): mount a larger "
            f"memory-backed {directory} (docker run --shm-size=..., or on Kubernetes an emptyDir "
            f"with medium: Memory mounted at {directory}), or lower the listener's max_channels or "
            f"max_chunk_bytes")


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


class _Region:
    """The listener's shared region for one link, already unlinked, its pages reserved."""

    def __init__(self, size: int) -> None:
        self.shm = shared_memory.SharedMemory(create=True, size=size)
        fd = self.shm._fd  # the fd is what we hand over; the name is never shared
        try:
            if hasattr(os, "posix_fallocate"):
                # Reserve the pages now: a full /dev/shm fails here with ENOSPC instead of
                # killing whoever touches the page later with SIGBUS.
                os.posix_fallocate(fd, 0, size)
        except OSError:
            self.shm.close()
            raise
        finally:
            self.shm.unlink()
        self.fd = fd
        self.size = size

    def view(self, nbytes: int) -> memoryview:
        return self.shm.buf[:nbytes]

    def close(self) -> None:
        try:
            self.shm.close()
        except BufferError:  # a view still alive somewhere; the mapping goes with it
            logger.warning("shm staging region still referenced at close")


class _RegionStaging(Staging):
    """Payloads are in the link's region when their frame arrives; the region is made for
    the link's first admitted chunk."""

    def __init__(self, receiver: KVReceiver, capacity: int) -> None:
        self._receiver = receiver
        self.capacity = capacity
        self.region: _Region | None = None

    @property
    def allocated(self) -> int:
        return 0 if self.region is None else self.region.size

    def serve(self, conn: socket.socket, header: bytes, payload_len: int, deadline: Deadline) -> str | None:
        if payload_len > self.capacity:
            # The payload is not in the stream, so the link stays in step: just refuse it.
            self._receiver.count_rejection("oversized")
            return f"payload of {payload_len} bytes is larger than the {self.capacity}-byte staging region"
        if payload_len and self.region is None:
            return self._first_chunk(conn, header, payload_len, deadline)
        payload = self.region.view(payload_len) if payload_len else b""
        try:
            return serve_frame(self._receiver, header, payload, self.capacity)
        finally:
            del payload  # the region must have no views left when it is closed

    def _first_chunk(self, conn: socket.socket, header: bytes, payload_len: int, deadline: Deadline) -> str | None:
        try:
            message = admit_frame(self._receiver, header, payload_len, self.capacity)
        except MessageRejected as exc:
            return str(exc)  # final: the sender sends no payload after a refusal
        try:
            region = _Region(self.capacity)
        except OSError as exc:
            self._receiver.count_rejection("no_staging_memory")
            logger.warning("no room for a %d-byte shm staging region: %s", self.capacity, exc)
            return (f"the decode worker has no room for a {self.capacity}-byte staging region in {SHM_DIR} "
                    f"({exc}); mount a larger memory-backed {SHM_DIR}")
        self.region = region
        deadline.arm(conn)
        socket.send_fds(conn, [encode_proceed()], [region.fd])
        if recv_exact(conn, len(READY), deadline) != READY:
            self._receiver.count_rejection("malformed")
            raise LinkDropped("the sender did not confirm its payload")
        payload = region.view(payload_len)
        try:
            return apply_frame(self._receiver, message, payload)
        finally:
            del payload

    def close(self) -> None:
        if self.region is not None:
            self.region.close()


class ShmListener(StreamListener):
    def __init__(self, receiver: KVReceiver, name: str | None = None,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, max_channels: int = 16,
                 op_timeout: float = 30.0, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        limits = ListenerLimits(max_chunk_bytes, max_channels, idle_timeout, op_timeout)
        check_room(max_channels, max_chunk_bytes)
        name = name or secrets.token_hex(8)
        self._path = _socket_address(name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self._path)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot create the shm KV listener {name!r}: {exc}") from exc
        super().__init__(receiver, sock, f"shm://{name}", limits)
        logger.info("shm KV listener at %s (staging %d bytes per channel, %d channels)",
                    self.address, max_chunk_bytes, max_channels)

    def _open(self, conn: socket.socket) -> Staging:
        conn.sendall(self._hello(0))
        return _RegionStaging(self._receiver, self._limits.max_chunk_bytes)

    def _after_close(self) -> None:
        if not self._path.startswith("\0"):
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass


class ShmChannel(StreamChannel):
    def __init__(self, name: str, timeout: float) -> None:
        super().__init__(f"shm://{name}", timeout)
        self._name = name
        self._view: memoryview | None = None  # the link's region, once the listener sent it
        self._map: mmap.mmap | None = None
        self._open()

    def _open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(_socket_address(self._name))
            self._greet(sock, recv_exact(sock, HELLO.size), "shm")
        except (OSError, TransportError) as exc:
            sock.close()
            raise TransportError(f"cannot open a channel to the shm KV listener {self.address} "
                                 f"on this host: {exc}") from None
        self._sock = sock

    def _exchange(self, header: bytes, payload: memoryview | bytes) -> str | None:
        source = as_bytes_view(payload)
        if source.nbytes and self._view is None:
            return self._first_chunk(header, source)
        if source.nbytes:
            self._view[:source.nbytes] = source
        return self._send_frame(header, source.nbytes, inline=None)

    def _first_chunk(self, header: bytes, source: memoryview) -> str | None:
        """The two steps of a link's first chunk (see the module docstring)."""
        with self._link_errors():
            self._sock.sendall(frame_bytes(header, source.nbytes))
            head, fds, _, _ = socket.recv_fds(self._sock, REPLY_HEAD_BYTES, 1)
            if not head:
                raise ConnectionError("the listener closed the link")
            try:
                reply = self._read_reply(head)
                if not reply.proceed:
                    return reply.reason
                if len(fds) != 1 or os.fstat(fds[0]).st_size < self.max_chunk_bytes:
                    raise TransportError(f"the shm KV listener {self.address} sent no usable staging region")
                self._map = mmap.mmap(fds[0], self.max_chunk_bytes)
            finally:
                for fd in fds:
                    os.close(fd)
            self._view = memoryview(self._map)
            self._view[:source.nbytes] = source
            self._sock.sendall(READY)
            return self._read_reply().reason

    def _teardown(self) -> None:
        super()._teardown()
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None


def listen(kind: str, receiver: KVReceiver, **options) -> ShmListener:
    return ShmListener(receiver, **options)


def connect(kind: str, target: str, timeout: float) -> ShmChannel:
    return ShmChannel(target, timeout)
