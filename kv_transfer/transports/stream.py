"""What the stream-socket transports (shm, tcp) share: framing, the listener's threads and
limits, and the channel's side of an exchange.

Wire, raw little-endian structs (never pickle):

    listener -> sender  hello: status (0 ok, 1 refused: at the channel limit), max chunk
                        bytes, idle timeout in ms (the listener closes a link idle that long)
    sender -> listener  frame: header length, payload length, header, then the payload
                        where the transport carries it (inline for tcp, in the region for shm)
    listener -> sender  reply: see base.encode_reply (shm may answer a link's first chunk
                        header with "proceed" first: see shm.py)

Limits (base.ListenerLimits): the accepting thread refuses a link over `max_channels` itself
(hello status 1), so the listener never runs more than max_channels + 1 threads; a link with
no frame for `idle_timeout` is closed; a frame must arrive, and its reply be taken, within
`op_timeout` of its first byte, or the link is dropped; a link's staging memory (`Staging`)
is allocated only after one of its chunk headers passed the receiver's ticket checks. Each
refusal and drop is counted on the receiver. Idle threads look at the closed flag every
_POLL_S, so `close()` returns promptly.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import select
import socket
import struct
import threading
import time
from abc import ABC, abstractmethod

from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.transports.base import (
    MAX_HEADER_BYTES,
    REPLY_HEAD_BYTES,
    KVChannel,
    KVListener,
    ListenerLimits,
    Reply,
    TransportError,
    decode_reply,
    encode_reply,
)

logger = logging.getLogger(__name__)

HELLO = struct.Struct("<BQI")  # status, max chunk bytes, idle timeout ms
FRAME = struct.Struct("<IQ")  # header length, payload length
MAX_REPLY_BYTES = 64 << 10
_POLL_S = 0.25  # how often idle threads look at the closed flag and the idle clock
_DRAIN_BYTES = 64 << 10  # refused inline payloads are read and dropped in pieces this big


class LinkDropped(TransportError):
    """The listener drops a link whose peer broke the protocol (already counted)."""


class Deadline:
    """The time by which one frame, from its first byte to its reply, must be done."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._at = time.monotonic() + seconds

    @property
    def at(self) -> float:
        """time.monotonic() by which the frame must be done."""
        return self._at

    def arm(self, sock: socket.socket) -> None:
        """Bound the next blocking call on `sock` by the time left; TimeoutError if none."""
        left = self._at - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"a frame took more than {self.seconds} s")
        sock.settimeout(left)


class Staging(ABC):
    """Where one link's chunk payloads land, and how a frame is served from there. Holds
    no memory until a chunk header on the link passed `base.admit_frame`."""

    @property
    @abstractmethod
    def allocated(self) -> int:
        """Bytes of staging memory the link holds now."""

    @abstractmethod
    def serve(self, conn: socket.socket, header: bytes, payload_len: int, deadline: Deadline) -> str | None:
        """Serve one frame whose header has been read: get its payload (reading it off
        `conn` if it travels there), apply it to the receiver, and return the reply's
        reason (None: accepted). Raises LinkDropped, OSError or TimeoutError to drop the
        link."""

    def close(self) -> None:
        """Release the link's staging memory."""


class StreamListener(KVListener):
    """Accepts on a bound stream socket; subclasses say how a link starts (`_open`)."""

    def __init__(self, receiver: KVReceiver, sock: socket.socket, address: str, limits: ListenerLimits) -> None:
        self._receiver = receiver
        self._limits = limits
        self._sock = sock
        sock.listen()  # the kernel's default backlog: a burst over the limit is refused, not reset
        sock.settimeout(_POLL_S)
        self.address = address
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()  # one per served link, removed by itself
        self._stagings: set[Staging] = set()  # the served links' staging
        self._acceptor = threading.Thread(target=self._accept_loop, name="kv-stream-accept", daemon=True)
        self._acceptor.start()

    @property
    def num_links(self) -> int:
        """Links served right now."""
        with self._lock:
            return len(self._threads)

    @property
    def staging_bytes(self) -> int:
        """Staging memory the served links hold now."""
        with self._lock:
            return sum(staging.allocated for staging in self._stagings)

    @abstractmethod
    def _open(self, conn: socket.socket) -> Staging:
        """Greet a new link (send the hello) and return its (empty) staging."""

    def _after_close(self) -> None:
        """Remove anything the listener left behind (e.g. a socket file)."""

    def _hello(self, status: int) -> bytes:
        return HELLO.pack(status, self._limits.max_chunk_bytes, int(self._limits.idle_timeout * 1000))

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
            with self._lock:
                thread = None
                if len(self._threads) < self._limits.max_channels:
                    thread = threading.Thread(target=self._serve, args=(conn,), name="kv-stream-conn", daemon=True)
                    self._threads.add(thread)
            if thread is None:
                self._refuse(conn)
            else:
                thread.start()

    def _refuse(self, conn: socket.socket) -> None:
        """Tell a link over the channel limit so, from this thread, without waiting on it."""
        self._receiver.count_rejection("over_connection_limit")
        logger.warning("KV listener %s refused a link: %d links served already (max_channels)",
                       self.address, self._limits.max_channels)
        with conn:
            conn.setblocking(False)
            try:
                conn.send(self._hello(1))  # a few bytes into an empty socket buffer
            except OSError:
                pass

    def _serve(self, conn: socket.socket) -> None:
        staging = None
        with conn:  # closed last: a peer that sees the hang-up sees it counted
            try:
                conn.settimeout(self._limits.op_timeout)
                staging = self._open(conn)
                with self._lock:
                    self._stagings.add(staging)
                self._serve_frames(conn, staging)
            except TimeoutError as exc:
                self._receiver.count_rejection("stalled_frame")
                logger.info("KV link on %s dropped: %s", self.address, exc)
            except ConnectionError as exc:  # the peer hung up or reset in the middle of a frame
                self._receiver.count_rejection("truncated")
                logger.info("KV link on %s dropped mid-frame: %s", self.address, exc)
            except (OSError, TransportError) as exc:  # already counted where it was decided
                logger.info("KV link on %s dropped: %s", self.address, exc)
            finally:
                with self._lock:
                    self._stagings.discard(staging)
                    self._threads.discard(threading.current_thread())
                if staging is not None:
                    staging.close()

    def _serve_frames(self, conn: socket.socket, staging: Staging) -> None:
        waiter = select.poll()  # not select(): descriptors above 1024 are common in a worker
        waiter.register(conn, select.POLLIN)
        while self._wait_for_frame(waiter):
            deadline = Deadline(self._limits.op_timeout)
            try:
                head = recv_exact(conn, FRAME.size, deadline, allow_eof=True)
            except ConnectionResetError:  # gone between frames: a close, not a broken frame
                return
            if head is None:
                return
            header_len, payload_len = FRAME.unpack(head)
            if header_len > MAX_HEADER_BYTES:
                self._receiver.count_rejection("oversized")
                raise LinkDropped(f"a header of {header_len} bytes is over the {MAX_HEADER_BYTES}-byte limit")
            header = recv_exact(conn, header_len, deadline)
            reason = staging.serve(conn, header, payload_len, deadline)
            deadline.arm(conn)
            conn.sendall(encode_reply(reason, MAX_REPLY_BYTES))

    def _wait_for_frame(self, waiter: select.poll) -> bool:
        """True once the next frame's first bytes (or the peer's hang-up) are there; False
        when the listener closes or the link has been idle for idle_timeout (counted)."""
        idle_until = time.monotonic() + self._limits.idle_timeout
        while not waiter.poll(_POLL_S * 1000):
            if self._closed.is_set():
                return False
            if time.monotonic() >= idle_until:
                self._receiver.count_rejection("idle_timeout")
                logger.info("KV link on %s closed after %g s idle", self.address, self._limits.idle_timeout)
                return False
        return True


class StreamChannel(KVChannel):
    """The sender's side: frames out, replies back, on a connected socket.

    Chunk frames posted without waiting (`_send_frame(wait=False)`) stay in flight, up to
    IN_FLIGHT_CHUNKS of them, while the listener checks earlier ones: the sender packs and
    writes the next chunk as the receiver verifies the last. Replies come back in frame
    order; every waited frame reads the verdicts before its own."""

    # Chunk frames written ahead of their verdicts. Two already overlap the sender's pack
    # and write with the receiver's read and checksum; more only hold more replies back.
    IN_FLIGHT_CHUNKS = 4
    _sock: socket.socket | None = None
    _in_flight: collections.deque | None = None  # ticket ids of frames whose verdicts are unread

    def _connect_tcp(self, target: str, listener_kind: str) -> socket.socket:
        """A TCP link to the listener at `target` ("host:port"), greeted (`_greet`).
        Raises TransportError saying why not."""
        host, _, port = target.rpartition(":")
        try:
            sock = socket.create_connection((host, int(port)), timeout=self.timeout)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot open a channel to the {listener_kind} KV listener {self.address}: "
                                 f"{exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._greet(sock, recv_exact(sock, HELLO.size), listener_kind)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot open a channel to the {listener_kind} KV listener {self.address}: "
                                 f"{exc}") from None
        except TransportError:
            sock.close()
            raise
        return sock

    def _greet(self, sock: socket.socket, hello: bytes, listener_kind: str) -> None:
        """Take the listener's hello: refused (TransportError) or the link's limits."""
        status, max_chunk_bytes, idle_ms = HELLO.unpack(hello)
        if status != 0:
            raise TransportError(f"the {listener_kind} KV listener {self.address} is at its channel limit")
        self.max_chunk_bytes = max_chunk_bytes
        self.idle_timeout = idle_ms / 1000 if idle_ms else None

    def _send_frame(self, header: bytes, payload_len: int, inline: memoryview | None,
                    ticket_id: int | None = None, wait: bool = True) -> str | None:
        """Write a frame; with `wait`, read the verdicts in flight and return its own,
        else leave it in flight (a refusal lands in `_refused[ticket_id]`) and return None."""
        with self._link_errors():
            self._sock.sendall(frame_bytes(header, payload_len))
            if inline is not None and payload_len:
                self._sock.sendall(inline)
            if wait:
                self._take_verdicts(0)
                return self._read_reply().reason
            if self._in_flight is None:
                self._in_flight = collections.deque()
            self._in_flight.append(ticket_id)
            self._take_verdicts(self.IN_FLIGHT_CHUNKS)
            return None

    def _take_verdicts(self, keep: int) -> None:
        """Read verdicts of frames in flight, oldest first, until `keep` are left."""
        while self._in_flight and len(self._in_flight) > keep:
            reason = self._read_reply().reason
            ticket_id = self._in_flight.popleft()
            if reason is not None:
                self._refused.setdefault(ticket_id, reason)

    def _settle(self) -> None:
        with self._link_errors():
            self._take_verdicts(0)

    def _teardown(self) -> None:
        self._in_flight = None  # verdicts lost with the link: each ticket's send_done, on a new link, tells
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @contextlib.contextmanager
    def _link_errors(self):
        """Socket failures inside the block become TransportError (the link is broken)."""
        try:
            yield
        except TimeoutError:
            raise TransportError(f"no reply from {self.address} within {self.timeout} s") from None
        except OSError as exc:
            raise TransportError(f"the link to {self.address} failed: {exc}") from None

    def _read_reply(self, head: bytes = b"") -> Reply:
        """The next reply; `head` holds its first bytes (at most the fixed part) if the
        caller read them already."""
        head += recv_exact(self._sock, REPLY_HEAD_BYTES - len(head))
        length = struct.unpack_from("<I", head, 1)[0]
        if length > MAX_REPLY_BYTES:
            raise TransportError(f"garbled reply from {self.address}")
        return decode_reply(head + recv_exact(self._sock, length))

    def _closed_by_listener(self) -> bool:
        # The listener never sends unasked: once no verdict is in flight (`_settle`),
        # anything readable between frames is its hang-up (EOF) or an error.
        if self._sock is None:
            return True
        waiter = select.poll()
        waiter.register(self._sock, select.POLLIN)
        return bool(waiter.poll(0))


def bind_tcp(kind: str, host: str, port: int) -> tuple[socket.socket, str]:
    """A listening TCP socket on host:port (0: any free port) and its address,
    "kind://host:port". Raises TransportError naming the listener if the bind fails."""
    try:
        sock = socket.create_server((host, port))
    except OSError as exc:
        raise TransportError(f"cannot bind the {kind} KV listener to {host}:{port}: {exc}") from exc
    bound_host, bound_port = sock.getsockname()[:2]
    return sock, f"{kind}://{bound_host}:{bound_port}"


def open_tcp_link(conn: socket.socket, hello: bytes) -> None:
    """An accepted TCP link: frames go out as soon as they are written; greet the sender."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.sendall(hello)


def frame_bytes(header: bytes, payload_len: int) -> bytes:
    """A frame's fixed part and header, as the sender writes them."""
    return FRAME.pack(len(header), payload_len) + header


def as_bytes_view(payload: memoryview | bytes) -> memoryview:
    view = memoryview(payload)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def recv_exact(sock: socket.socket, nbytes: int, deadline: Deadline | None = None,
               allow_eof: bool = False) -> bytes | None:
    """Exactly `nbytes` from `sock`, by `deadline` if given (else each wait is bounded by
    the socket's timeout). None on a clean EOF before the first byte if `allow_eof`;
    ConnectionError on EOF mid-message."""
    data = bytearray()
    while len(data) < nbytes:
        if deadline is not None:
            deadline.arm(sock)
        piece = sock.recv(min(nbytes - len(data), 1 << 20))
        if not piece:
            if allow_eof and not data:
                return None
            raise ConnectionError("the peer closed the link")
        data += piece
    return bytes(data)


def recv_into_exact(sock: socket.socket, view: memoryview, deadline: Deadline | None = None) -> None:
    """Fill `view` from `sock`, by `deadline` if given; ConnectionError on EOF."""
    got = 0
    while got < len(view):
        if deadline is not None:
            deadline.arm(sock)
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("the peer closed the link")
        got += n


def drain(sock: socket.socket, nbytes: int, deadline: Deadline) -> None:
    """Read and drop `nbytes` (a refused frame's inline payload), in small pieces: the link
    stays in step without the listener holding the payload."""
    scratch = memoryview(bytearray(min(nbytes, _DRAIN_BYTES)))
    left = nbytes
    while left:
        piece = scratch[:min(left, len(scratch))]
        recv_into_exact(sock, piece, deadline)
        left -= len(piece)
