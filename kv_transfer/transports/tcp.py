"""Plain TCP transport: the framing of stream.py with each chunk's payload inline.

The fast path between hosts: one `sendall` of the page bytes per chunk, received straight
into a per-link buffer (`recv_into`, no intermediate copies) and written to the pool from
there. The buffer is allocated when the link's first chunk header passes the receiver's
ticket checks, and grows to the largest admitted chunk; a refused chunk's payload is read
and dropped in small pieces, so the link stays in step and a peer without a ticket never
makes the listener allocate more than those pieces. Binds to 127.0.0.1 unless told
otherwise.
"""

from __future__ import annotations

import logging
import socket

from pdserve.kv_transfer.messages import MessageRejected
from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.transports.base import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CHUNK_BYTES,
    ListenerLimits,
    TransportError,
    admit_frame,
    apply_frame,
)
from pdserve.kv_transfer.transports.stream import (
    HELLO,
    Deadline,
    LinkDropped,
    Staging,
    StreamChannel,
    StreamListener,
    as_bytes_view,
    drain,
    recv_exact,
    recv_into_exact,
)

logger = logging.getLogger(__name__)


class _InlineStaging(Staging):
    """Payloads follow their frame on the socket; admitted ones are read into one
    reusable buffer."""

    def __init__(self, receiver: KVReceiver, capacity: int) -> None:
        self._receiver = receiver
        self.capacity = capacity
        self._buffer: memoryview | None = None  # none until a chunk header is admitted

    @property
    def allocated(self) -> int:
        return 0 if self._buffer is None else len(self._buffer)

    def serve(self, conn: socket.socket, header: bytes, payload_len: int, deadline: Deadline) -> str | None:
        if payload_len > self.capacity:
            # The payload is in the stream and too big to skip through: drop the link.
            self._receiver.count_rejection("oversized")
            raise LinkDropped(f"a payload of {payload_len} bytes over the {self.capacity}-byte limit")
        try:
            message = admit_frame(self._receiver, header, payload_len, self.capacity)
        except MessageRejected as exc:
            drain(conn, payload_len, deadline)
            return str(exc)
        payload = self._room_for(payload_len)
        recv_into_exact(conn, payload, deadline)
        return apply_frame(self._receiver, message, payload)

    def _room_for(self, nbytes: int) -> memoryview:
        if nbytes and self.allocated < nbytes:
            self._buffer = memoryview(bytearray(nbytes))
        return self._buffer[:nbytes] if nbytes else memoryview(b"")


class TcpListener(StreamListener):
    def __init__(self, receiver: KVReceiver, host: str = "127.0.0.1", port: int = 0,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, max_channels: int = 16,
                 op_timeout: float = 30.0, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        limits = ListenerLimits(max_chunk_bytes, max_channels, idle_timeout, op_timeout)
        try:
            sock = socket.create_server((host, port))
        except OSError as exc:
            raise TransportError(f"cannot bind the TCP KV listener to {host}:{port}: {exc}") from exc
        bound_host, bound_port = sock.getsockname()[:2]
        super().__init__(receiver, sock, f"tcp://{bound_host}:{bound_port}", limits)
        logger.info("TCP KV listener at %s (chunks up to %d bytes, %d channels, idle links closed after %g s)",
                    self.address, max_chunk_bytes, max_channels, idle_timeout)

    def _open(self, conn: socket.socket) -> Staging:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(self._hello(0))
        return _InlineStaging(self._receiver, self._limits.max_chunk_bytes)


class TcpChannel(StreamChannel):
    def __init__(self, target: str, timeout: float) -> None:
        super().__init__(f"tcp://{target}", timeout)
        self._target = target
        self._open()

    def _open(self) -> None:
        host, _, port = self._target.rpartition(":")
        try:
            sock = socket.create_connection((host, int(port)), timeout=self.timeout)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot open a channel to the TCP KV listener {self.address}: {exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._greet(sock, recv_exact(sock, HELLO.size), "TCP")
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot open a channel to the TCP KV listener {self.address}: {exc}") from None
        except TransportError:
            sock.close()
            raise
        self._sock = sock

    def _exchange(self, header: bytes, payload: memoryview | bytes) -> str | None:
        source = as_bytes_view(payload)
        return self._send_frame(header, source.nbytes, inline=source)

    def _teardown(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen(kind: str, receiver: KVReceiver, **options) -> TcpListener:
    return TcpListener(receiver, **options)


def connect(kind: str, target: str, timeout: float) -> TcpChannel:
    return TcpChannel(target, timeout)
