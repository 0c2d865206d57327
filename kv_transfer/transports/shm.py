"""Shared-memory transport for a prefill and a decode worker on one host.

Per connection the listener owns a staging region (`multiprocessing.shared_memory`, one
chunk's worth) and hands its file descriptor to the sender over the control socket
(SCM_RIGHTS). The sender copies a chunk's payload into the region and sends only the small
header over the socket; the receiver validates and writes pages straight from the region,
so the payload never crosses a socket.

Control socket (AF_UNIX; in the abstract namespace on Linux), raw little-endian structs,
never pickle:

    listener -> sender  hello: status (0 ok, 1 refused), region size   + the region's fd
    sender -> listener  frame: header length, payload length, header  (payload in region)
    listener -> sender  reply: see base.encode_reply

No /dev/shm entry outlives a handshake: the listener unlinks the region right after
creating it, so the memory goes away with the last process that maps it, whoever dies.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import select
import socket
import struct
import sys
import tempfile
import threading
import time
from multiprocessing import shared_memory

from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.transports.base import (
    DEFAULT_MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    REPLY_HEAD_BYTES,
    KVChannel,
    KVListener,
    TransportError,
    decode_reply,
    encode_reply,
    serve_frame,
)

logger = logging.getLogger(__name__)

_HELLO = struct.Struct("<BQ")
_FRAME = struct.Struct("<IQ")
_MAX_REPLY_BYTES = 64 << 10
_POLL_S = 0.25  # how often idle threads look at the closed flag
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


class ShmListener(KVListener):
    def __init__(self, receiver: KVReceiver, name: str | None = None,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, max_channels: int = 16,
                 op_timeout: float = 30.0) -> None:
        self._receiver = receiver
        self._max_chunk_bytes = max_chunk_bytes
        self._max_channels = max_channels
        self._op_timeout = op_timeout
        name = name or secrets.token_hex(8)
        self._path = _socket_address(name)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(self._path)
        except OSError as exc:
            self._sock.close()
            raise TransportError(f"cannot create the shm KV listener {name!r}: {exc}") from exc
        self._sock.listen(max_channels)
        self._sock.settimeout(_POLL_S)
        self.address = f"shm://{name}"
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._acceptor = threading.Thread(target=self._accept_loop, name="kv-shm-accept", daemon=True)
        self._acceptor.start()
        logger.info("shm KV listener at %s (staging %d bytes per channel)", self.address, max_chunk_bytes)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        deadline = time.monotonic() + 5 * _POLL_S  # every thread looks at the flag this often
        self._acceptor.join(timeout=5 * _POLL_S)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._sock.close()
        if not self._path.startswith("\0"):
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self._closed.is_set():
                    logger.exception("shm KV listener %s stopped accepting", self.address)
                return
            thread = threading.Thread(target=self._serve, args=(conn,), name="kv-shm-conn", daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        staging = None
        try:
            with conn:
                conn.settimeout(self._op_timeout)
                with self._lock:
                    full = len(self._threads) > self._max_channels
                if full:
                    conn.sendall(_HELLO.pack(1, 0))
                    return
                staging = _Staging(self._max_chunk_bytes)
                socket.send_fds(conn, [_HELLO.pack(0, staging.size)], [staging.fd])
                self._serve_frames(conn, staging)
        except (OSError, TransportError) as exc:  # the peer died or misbehaved: drop it
            logger.info("shm KV channel on %s dropped: %s", self.address, exc)
        finally:
            if staging is not None:
                staging.close()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _serve_frames(self, conn: socket.socket, staging: _Staging) -> None:
        idle = select.poll()  # not select(): descriptors above 1024 are common in a worker
        idle.register(conn, select.POLLIN)
        while True:
            # Idle until the next frame, the peer hanging up, or close().
            while not idle.poll(_POLL_S * 1000):
                if self._closed.is_set():
                    return
            head = _recv_exact(conn, _FRAME.size, allow_eof=True)
            if head is None:
                return
            header_len, payload_len = _FRAME.unpack(head)
            if header_len > MAX_HEADER_BYTES:
                raise TransportError(f"a header of {header_len} bytes")
            header = _recv_exact(conn, header_len)
            if payload_len > staging.size:
                reason = f"payload of {payload_len} bytes is larger than the {staging.size}-byte staging region"
            else:
                payload = staging.view(payload_len)
                reason = serve_frame(self._receiver, header, payload)
                del payload  # the region must have no views left when it is closed
            conn.sendall(encode_reply(reason, _MAX_REPLY_BYTES))


class ShmChannel(KVChannel):
    def __init__(self, name: str, timeout: float) -> None:
        super().__init__(f"shm://{name}", timeout)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._view: memoryview | None = None
        self._map: mmap.mmap | None = None
        try:
            self._sock.connect(_socket_address(name))
            data, fds, _, _ = socket.recv_fds(self._sock, _HELLO.size, 1)
            if len(data) < _HELLO.size:
                data += _recv_exact(self._sock, _HELLO.size - len(data))
            status, size = _HELLO.unpack(data)
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
        source = memoryview(payload)
        if source.format != "B" or source.ndim != 1:
            source = source.cast("B")
        self._view[:source.nbytes] = source
        try:
            self._sock.sendall(_FRAME.pack(len(header), source.nbytes) + header)
            head = _recv_exact(self._sock, REPLY_HEAD_BYTES)
            length = struct.unpack_from("<I", head, 1)[0]
            if length > _MAX_REPLY_BYTES:
                raise TransportError(f"garbled reply from {self.address}")
            return decode_reply(head + _recv_exact(self._sock, length))
        except TimeoutError:
            raise TransportError(f"no reply from {self.address} within {self.timeout} s") from None
        except OSError as exc:
            raise TransportError(f"the shm link to {self.address} failed: {exc}") from None

    def _teardown(self) -> None:
        self._sock.close()
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None


def _recv_exact(sock: socket.socket, nbytes: int, allow_eof: bool = False) -> bytes | None:
    """Exactly `nbytes` from `sock` (its timeout bounds each wait). None on a clean EOF
    before the first byte if `allow_eof`; ConnectionError on EOF mid-message."""
    data = bytearray()
    while len(data) < nbytes:
        piece = sock.recv(nbytes - len(data))
        if not piece:
            if allow_eof and not data:
                return None
            raise ConnectionError("the peer closed the link")
        data += piece
    return bytes(data)


def listen(kind: str, receiver: KVReceiver, **options) -> ShmListener:
    return ShmListener(receiver, **options)


def connect(kind: str, target: str, timeout: float) -> ShmChannel:
    return ShmChannel(target, timeout)
