"""Plain TCP transport: the framing of stream.py with each chunk's payload inline.

The fast path between hosts: one `sendall` of the page bytes per chunk, received straight
into a per-connection buffer (`recv_into`, no intermediate copies) and written to the pool
from there. Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import logging
import socket

from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.transports.base import DEFAULT_MAX_CHUNK_BYTES, TransportError
from pdserve.kv_transfer.transports.stream import (
    HELLO,
    PayloadSource,
    StreamChannel,
    StreamListener,
    as_bytes_view,
    recv_exact,
    recv_into_exact,
)

logger = logging.getLogger(__name__)


class _InlineSource(PayloadSource):
    """Payloads follow their frame on the socket; read into one reusable buffer."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buffer = memoryview(bytearray(capacity))

    def read(self, conn: socket.socket, nbytes: int) -> memoryview:
        view = self._buffer[:nbytes]
        recv_into_exact(conn, view)
        return view


class TcpListener(StreamListener):
    def __init__(self, receiver: KVReceiver, host: str = "127.0.0.1", port: int = 0,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, max_channels: int = 16,
                 op_timeout: float = 30.0) -> None:
        try:
            sock = socket.create_server((host, port))
        except OSError as exc:
            raise TransportError(f"cannot bind the TCP KV listener to {host}:{port}: {exc}") from exc
        bound_host, bound_port = sock.getsockname()[:2]
        super().__init__(receiver, sock, f"tcp://{bound_host}:{bound_port}", max_chunk_bytes,
                         max_channels, op_timeout)
        logger.info("TCP KV listener at %s (chunks up to %d bytes)", self.address, max_chunk_bytes)

    def _open(self, conn: socket.socket) -> PayloadSource:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        source = _InlineSource(self._max_chunk_bytes)
        conn.sendall(HELLO.pack(0, self._max_chunk_bytes))
        return source


class TcpChannel(StreamChannel):
    def __init__(self, target: str, timeout: float) -> None:
        super().__init__(f"tcp://{target}", timeout)
        host, _, port = target.rpartition(":")
        try:
            self._sock = socket.create_connection((host, int(port)), timeout=timeout)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            status, size = HELLO.unpack(recv_exact(self._sock, HELLO.size))
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot open a channel to the TCP KV listener {self.address}: {exc}") from None
        if status != 0:
            self._sock.close()
            raise TransportError(f"the TCP KV listener {self.address} is at its channel limit")
        self.max_chunk_bytes = size

    def _exchange(self, header: bytes, payload: memoryview | bytes) -> str | None:
        source = as_bytes_view(payload)
        return self._send_frame(header, source.nbytes, inline=source)

    def _teardown(self) -> None:
        self._sock.close()


def listen(kind: str, receiver: KVReceiver, **options) -> TcpListener:
    return TcpListener(receiver, **options)


def connect(kind: str, target: str, timeout: float) -> TcpChannel:
    return TcpChannel(target, timeout)
