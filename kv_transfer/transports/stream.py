"""What the stream-socket transports (shm, tcp) share: framing, the listener's threads,
and the channel's side of an exchange.

Wire, raw little-endian structs (never pickle):

    listener -> sender  hello: status (0 ok, 1 refused: at the channel limit), max chunk bytes
                        (a transport may attach more, e.g. shm's region fd)
    sender -> listener  frame: header length, payload length, header, then the payload
                        where the transport carries it (inline for tcp, in the region for shm)
    listener -> sender  reply: see base.encode_reply

A listener runs one thread per connection; each looks at the closed flag every _POLL_S
while idle, so `close()` returns promptly.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
from abc import abstractmethod

from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.transports.base import (
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

HELLO = struct.Struct("<BQ")
FRAME = struct.Struct("<IQ")
MAX_REPLY_BYTES = 64 << 10
_POLL_S = 0.25  # how often idle threads look at the closed flag


class PayloadSource:
    """Where one connection's chunk payloads are read from."""

    capacity: int

    @abstractmethod
    def read(self, conn: socket.socket, nbytes: int) -> memoryview:
        """The next frame's payload; valid until the next call."""

    def refuse_oversize(self, nbytes: int) -> str:
        """A frame announced a payload over `capacity`: return the rejection to reply with
        if the stream stays in step, or raise TransportError to drop the link."""
        raise TransportError(f"a payload of {nbytes} bytes over the {self.capacity}-byte limit")

    def close(self) -> None:
        """Release the connection's resources."""


class StreamListener(KVListener):
    """Accepts on a bound stream socket; subclasses say how a connection starts (`_open`)."""

    def __init__(self, receiver: KVReceiver, sock: socket.socket, address: str,
                 max_chunk_bytes: int, max_channels: int, op_timeout: float) -> None:
        self._receiver = receiver
        self._max_chunk_bytes = max_chunk_bytes
        self._max_channels = max_channels
        self._op_timeout = op_timeout
        self._sock = sock
        sock.listen(max_channels)
        sock.settimeout(_POLL_S)
        self.address = address
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._acceptor = threading.Thread(target=self._accept_loop, name="kv-stream-accept", daemon=True)
        self._acceptor.start()

    @abstractmethod
    def _open(self, conn: socket.socket) -> PayloadSource:
        """Greet a new connection (send the hello) and return where its payloads come from."""

    def _after_close(self) -> None:
        """Remove anything the listener left behind (e.g. a socket file)."""

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
        self._after_close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self._closed.is_set():
                    logger.exception("KV listener %s stopped accepting", self.address)
                return
            thread = threading.Thread(target=self._serve, args=(conn,), name="kv-stream-conn", daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        source = None
        try:
            with conn:
                conn.settimeout(self._op_timeout)
                with self._lock:
                    full = len(self._threads) > self._max_channels
                if full:
                    conn.sendall(HELLO.pack(1, 0))
                    return
                source = self._open(conn)
                self._serve_frames(conn, source)
        except (OSError, TransportError) as exc:  # the peer died or misbehaved: drop it
            logger.info("KV channel on %s dropped: %s", self.address, exc)
        finally:
            if source is not None:
                source.close()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _serve_frames(self, conn: socket.socket, source: PayloadSource) -> None:
        idle = select.poll()  # not select(): descriptors above 1024 are common in a worker
        idle.register(conn, select.POLLIN)
        while True:
            # Idle until the next frame, the peer hanging up, or close().
            while not idle.poll(_POLL_S * 1000):
                if self._closed.is_set():
                    return
            head = recv_exact(conn, FRAME.size, allow_eof=True)
            if head is None:
                return
            header_len, payload_len = FRAME.unpack(head)
            if header_len > MAX_HEADER_BYTES:
                raise TransportError(f"a header of {header_len} bytes")
            header = recv_exact(conn, header_len)
            if payload_len > source.capacity:
                reason = source.refuse_oversize(payload_len)
            else:
                payload = source.read(conn, payload_len)
                reason = serve_frame(self._receiver, header, payload)
                del payload  # shm: the region must have no views left when it is closed
            conn.sendall(encode_reply(reason, MAX_REPLY_BYTES))


class StreamChannel(KVChannel):
    """The sender's side: frames out, replies back, on a connected socket."""

    _sock: socket.socket

    def _send_frame(self, header: bytes, payload_len: int, inline: memoryview | None) -> str | None:
        try:
            self._sock.sendall(FRAME.pack(len(header), payload_len) + header)
            if inline is not None and payload_len:
                self._sock.sendall(inline)
            head = recv_exact(self._sock, REPLY_HEAD_BYTES)
            length = struct.unpack_from("<I", head, 1)[0]
            if length > MAX_REPLY_BYTES:
                raise TransportError(f"garbled reply from {self.address}")
            return decode_reply(head + recv_exact(self._sock, length))
        except TimeoutError:
            raise TransportError(f"no reply from {self.address} within {self.timeout} s") from None
        except OSError as exc:
            raise TransportError(f"the link to {self.address} failed: {exc}") from None


def as_bytes_view(payload: memoryview | bytes) -> memoryview:
    view = memoryview(payload)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def recv_exact(sock: socket.socket, nbytes: int, allow_eof: bool = False) -> bytes | None:
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


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock`; ConnectionError on EOF."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("the peer closed the link")
        got += n
