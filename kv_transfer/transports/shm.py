"""Shared-memory transport for a prefill and a decode worker on one host.

Per connection the listener owns a staging region (`multiprocessing.shared_memory`, one
chunk's worth) and hands its file descriptor to the sender over the control socket
(SCM_RIGHTS). The sender copies a chunk's payload into the region and sends only the small
header over the socket; the receiver validates and writes pages straight from the region,
so the payload never crosses a socket.

Control socket: AF_UNIX (in the abstract namespace on Linux) with the framing of
stream.py; the hello carries the region size and, as ancillary data, the region's fd; a
frame's payload is in the region, not on the socket.

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

from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.transports.base import DEFAULT_MAX_CHUNK_BYTES, TransportError
from pdserve.kv_transfer.transports.stream import (
    HELLO,
    PayloadSource,
    StreamChannel,
    StreamListener,
    as_bytes_view,
    recv_exact,
)

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _socket_address(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise TransportError(f"shm listener name {name!r} must match {_NAME.pattern}")
    if sys.platform.startswith("linux"):
        return f"\0pdserve-kv-{name}"  # abstract: nothing on disk to leak
    return os.path.join(tempfile.gettempdir(), f"pdserve-kv-{name}.sock")


class _Staging:
    """The listener's shared region for one connection, already unlinked."""

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


class _RegionSource(PayloadSource):
    """Payloads are already in the connection's staging region when their frame arrives."""

    def __init__(self, staging: _Staging) -> None:
        self.staging = staging
        self.capacity = staging.size

    def read(self, conn: socket.socket, nbytes: int) -> memoryview:
        return self.staging.view(nbytes)

    def refuse_oversize(self, nbytes: int) -> str:
        # The payload is not in the stream, so the link stays in step: just refuse it.
        return f"payload of {nbytes} bytes is larger than the {self.capacity}-byte staging region"

    def close(self) -> None:
        self.staging.close()


class ShmListener(StreamListener):
    def __init__(self, receiver: KVReceiver, name: str | None = None,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, max_channels: int = 16,
                 op_timeout: float = 30.0) -> None:
        name = name or secrets.token_hex(8)
        self._path = _socket_address(name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self._path)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot create the shm KV listener {name!r}: {exc}") from exc
        super().__init__(receiver, sock, f"shm://{name}", max_chunk_bytes, max_channels, op_timeout)
        logger.info("shm KV listener at %s (staging %d bytes per channel)", self.address, max_chunk_bytes)

    def _open(self, conn: socket.socket) -> PayloadSource:
        staging = _Staging(self._max_chunk_bytes)
        try:
            socket.send_fds(conn, [HELLO.pack(0, staging.size)], [staging.fd])
        except OSError:
            staging.close()
            raise
        return _RegionSource(staging)

    def _after_close(self) -> None:
        if not self._path.startswith("\0"):
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass


class ShmChannel(StreamChannel):
    def __init__(self, name: str, timeout: float) -> None:
        super().__init__(f"shm://{name}", timeout)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._view: memoryview | None = None
        self._map: mmap.mmap | None = None
        try:
            self._sock.connect(_socket_address(name))
            data, fds, _, _ = socket.recv_fds(self._sock, HELLO.size, 1)
            if len(data) < HELLO.size:
                data += recv_exact(self._sock, HELLO.size - len(data))
            status, size = HELLO.unpack(data)
            if status != 0 or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise TransportError("it is at its channel limit" if status else "no staging region came")
            try:
                self._map = mmap.mmap(fds[0], size)
            finally:
                os.close(fds[0])
        except (OSError, TransportError) as exc:
            self._sock.close()
            raise TransportError(f"cannot open a channel to the shm KV listener {self.address} "
                                 f"on this host: {exc}") from None
        self._view = memoryview(self._map)
        self.max_chunk_bytes = size

    def _exchange(self, header: bytes, payload: memoryview | bytes) -> str | None:
        source = as_bytes_view(payload)
        self._view[:source.nbytes] = source
        return self._send_frame(header, source.nbytes, inline=None)

    def _teardown(self) -> None:
        self._sock.close()
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
