"""Plain TCP transport: the framing of stream.py with each chunk's payload inline.

The fast path between hosts: one `sendall` of the page bytes per chunk. How the listener
takes a chunk's payload depends on the decode worker's pool, decided once per listener:

- Into the pool (`_PoolLanding`; a CPU pool with pages of LAND_PAGES_FROM bytes or
  more): an admitted chunk header opens a landing (`KVReceiver.land_pages`) and the
  payload is received straight into the ticket's blocks, a scatter read (`recvmsg_into`)
  per up to _BUFFERS_PER_CALL contiguous runs of them; the receiver then verifies the
  checksum where the pages lie. No staging memory at all: a corrupted chunk lands in its
  own ticket's blocks and fails that ticket, and a link that fails mid-payload fails the
  ticket too (the blocks may hold part of it), counted once as "truncated" or
  "stalled_frame".
- Through a per-link buffer (`_InlineStaging`; a CUDA pool, which `recv_into` cannot
  write, or pages too small for the scatter read to pay): the payload is received into
  the buffer and `KVReceiver.accept_pages` checks and copies it from there, so a chunk
  that fails its checksum or does not arrive whole writes nothing. The buffer is
  allocated when the link's first chunk header passes the receiver's ticket checks, and
  grows to the largest admitted chunk.

Either way a refused chunk's payload is read and dropped in small pieces, so the link
stays in step and a peer without a ticket never makes the listener allocate more than
those pieces. Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import logging
import os
import socket

import torch

from pdserve.kv_transfer import layout
from pdserve.kv_transfer.messages import MessageRejected, PagesHeader
from pdserve.kv_transfer.receiver import KVReceiver, Landing
from pdserve.kv_transfer.transports.base import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CHUNK_BYTES,
    ListenerLimits,
    admit_frame,
    apply_frame,
    read_header,
)
from pdserve.kv_transfer.transports.stream import (
    Deadline,
    LinkDropped,
    Staging,
    StreamChannel,
    StreamListener,
    as_bytes_view,
    bind_tcp,
    drain,
    open_tcp_link,
    recv_into_exact,
)
from pdserve.runtime.kv_pool import KVPool

logger = logging.getLogger(__name__)

# Pages from this many bytes (one page of k or of v at one layer: the shortest run a
# chunk can land in) are received straight into a CPU pool; smaller ones through the
# per-link buffer. Measured on the 2-core VM over loopback, 1.5 MB chunks received into
# runs of each size, one round trip per chunk (GB/s, median of 190 chunks, ranges over
# two or three sittings):
#
#     run bytes                       1 Ki     2 Ki     4 Ki     8 Ki     12 Ki    48 Ki    768 Ki
#     recv_into per run               0.5-0.9  0.9-1.2  1.1-3.1  1.7-3.8  1.5-7.2  5.8-7.4  9.1-10.5
#     recvmsg_into, <=1024 runs/call  1.6-3.4  4.0-4.4  5.7-6.8  7.1-7.8  7.5-8.1  8.5-9.0  9.1-9.7
#     one recv_into + one copy        1.5-5.4  4.7-4.9  4.8-5.6  4.7-5.4  4.8-5.7  4.8-5.4  4.9-5.4
#
# The scatter read (recvmsg_into) beats the buffer and its copy from 4 KiB runs on.
# End to end (this listener and KVReceiver; receiver CPU per 1.5 MB chunk, median of 30),
# landing saves a third where a chunk is a few long runs, but every run also costs about
# 20 us of Python (pool_runs, views and their buffers here, checksum_pages), so a ticket
# of scattered blocks costs more landed than buffered until that shrinks; the choice is
# made per listener, before any chunk's blocks are known:
#
#     pages            contiguous ticket: landed / buffer    every other block: landed / buffer
#     4 KiB (384 runs)       580 / 830 us                        8050 / 830 us
#     12 KiB (128 runs)      520 / 780 us                        3610 / 760 us
#     48 KiB (32 runs)       420 / 610 us                         970 / 540 us
#     192 KiB (8 runs)       460 / 590 us                         520 / 570 us
LAND_PAGES_FROM = 4 << 10
try:  # buffers one recvmsg_into may fill (IOV_MAX: 1024 on Linux and macOS)
    _BUFFERS_PER_CALL = min(os.sysconf("SC_IOV_MAX"), 1024)
except (AttributeError, ValueError, OSError):
    _BUFFERS_PER_CALL = 16  # the least POSIX allows


def lands_in_pool(pool: KVPool) -> bool:
    """Whether a TCP listener receives chunks for `pool` straight into it (see the module
    docstring); otherwise through a per-link buffer."""
    return pool.kv.device.type == "cpu" and layout.page_nbytes(pool) >= LAND_PAGES_FROM


def _refuse_oversized(receiver: KVReceiver, payload_len: int, capacity: int) -> None:
    if payload_len > capacity:
        # The payload is in the stream and too big to skip through: drop the link.
        receiver.count_rejection("oversized")
        raise LinkDropped(f"a payload of {payload_len} bytes over the {capacity}-byte limit")


class _InlineStaging(Staging):
    """Payloads follow their frame on the socket; admitted ones are read into one
    reusable buffer and written to the pool from there."""

    def __init__(self, receiver: KVReceiver, capacity: int) -> None:
        self._receiver = receiver
        self.capacity = capacity
        self._buffer: memoryview | None = None  # none until a chunk header is admitted

    @property
    def allocated(self) -> int:
        return 0 if self._buffer is None else len(self._buffer)

    def serve(self, conn: socket.socket, header: bytes, payload_len: int, deadline: Deadline) -> str | None:
        _refuse_oversized(self._receiver, payload_len, self.capacity)
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


class _PoolLanding(Staging):
    """Payloads follow their frame on the socket; admitted ones land in the ticket's
    blocks of the pool (a CPU pool). Holds no memory."""

    allocated = 0

    def __init__(self, receiver: KVReceiver, capacity: int) -> None:
        self._receiver = receiver
        self.capacity = capacity

    def serve(self, conn: socket.socket, header: bytes, payload_len: int, deadline: Deadline) -> str | None:
        _refuse_oversized(self._receiver, payload_len, self.capacity)
        try:
            message = read_header(self._receiver, header, payload_len, self.capacity)
            landing = self._land(message, payload_len) if isinstance(message, PagesHeader) else None
        except MessageRejected as exc:
            drain(conn, payload_len, deadline)
            return str(exc)
        if landing is None:  # done, abort or ping: read_header saw to it that no payload follows
            return apply_frame(self._receiver, message, b"")
        _receive_landing(conn, landing, deadline)
        try:
            landing.landed()
        except MessageRejected as exc:  # the checksum: the ticket failed, the link is in step
            return str(exc)
        except Exception as exc:  # a bug here must not take the listener down
            logger.exception("KV receiver failed to verify a landed chunk")
            self._receiver.count_rejection("internal_error")
            return f"internal error in the receiver: {type(exc).__name__}: {exc}"
        return None

    def _land(self, message: PagesHeader, payload_len: int) -> Landing:
        """Admit the chunk (once): its landing, or MessageRejected (counted)."""
        try:
            if payload_len != message.nbytes:
                # The frame carries other than the header's bytes: the receiver's size
                # check refuses it (after its ticket checks, as for any chunk).
                self._receiver.admit_pages(message, payload_len)
                raise RuntimeError(f"a {payload_len}-byte payload admitted for a {message.nbytes}-byte chunk")
            return self._receiver.land_pages(message)
        except MessageRejected:
            raise
        except Exception as exc:  # a bug here must not take the listener down
            logger.exception("KV receiver failed on a chunk header")
            self._receiver.count_rejection("internal_error")
            raise MessageRejected(f"internal error in the receiver: {type(exc).__name__}: {exc}") from None


def _receive_landing(conn: socket.socket, landing: Landing, deadline: Deadline) -> None:
    """Receive a landing's bytes into its runs. If they do not all arrive, the landing is
    abandoned (the ticket fails; counted there, once, so the listener does not count the
    drop again) and LinkDropped raised: the link is out of step."""
    try:
        recv_into_buffers(conn, [as_bytes_view(view.view(torch.uint8).numpy()) for view in landing.views()],
                          deadline)
    except BaseException as exc:
        reason = f"the link failed in the middle of a chunk: {exc}"
        if isinstance(exc, TimeoutError):
            reason_class = "stalled_frame"
        elif isinstance(exc, OSError):
            reason_class = "truncated"
        else:
            logger.exception("KV chunk failed while landing in the pool")
            reason_class, reason = "internal_error", f"internal error while landing a chunk: {type(exc).__name__}: {exc}"
        try:
            landing.abandoned(reason, reason_class)
        except MessageRejected:
            pass
        if not isinstance(exc, Exception):
            raise
        raise LinkDropped(f"a chunk's payload did not arrive: {exc}") from exc


def recv_into_buffers(sock: socket.socket, buffers: list[memoryview], deadline: Deadline) -> None:
    """Fill `buffers`, in order, from `sock` by `deadline`: one scatter read (readv) per
    call, over up to _BUFFERS_PER_CALL of them; ConnectionError on EOF."""
    pending = [buffer for buffer in buffers if len(buffer)]
    first = 0  # pending[:first] are full; pending[first] may be partly filled (trimmed)
    while first < len(pending):
        deadline.arm(sock)
        got = sock.recvmsg_into(pending[first:first + _BUFFERS_PER_CALL])[0]
        if not got:
            raise ConnectionError("the peer closed the link")
        while got:
            size = len(pending[first])
            if got < size:
                pending[first] = pending[first][got:]
                break
            got -= size
            first += 1


class TcpListener(StreamListener):
    def __init__(self, receiver: KVReceiver, host: str = "127.0.0.1", port: int = 0,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, max_channels: int = 16,
                 op_timeout: float = 30.0, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        limits = ListenerLimits(max_chunk_bytes, max_channels, idle_timeout, op_timeout)
        self._staging = _PoolLanding if lands_in_pool(receiver.pool) else _InlineStaging
        sock, address = bind_tcp("tcp", host, port)
        super().__init__(receiver, sock, address, limits)
        logger.info("TCP KV listener at %s (chunks up to %d bytes %s, %d channels, idle links closed after %g s)",
                    self.address, max_chunk_bytes,
                    "into the pool" if self._staging is _PoolLanding else "through a buffer per link",
                    max_channels, idle_timeout)

    def _open(self, conn: socket.socket) -> Staging:
        open_tcp_link(conn, self._hello(0))
        return self._staging(self._receiver, self._limits.max_chunk_bytes)


class TcpChannel(StreamChannel):
    def __init__(self, target: str, timeout: float) -> None:
        super().__init__(f"tcp://{target}", timeout)
        self._target = target
        self._open()

    def _open(self) -> None:
        self._sock = self._connect_tcp(self._target, "TCP")

    def _exchange(self, header: bytes, payload: memoryview | bytes) -> str | None:
        source = as_bytes_view(payload)
        return self._send_frame(header, source.nbytes, inline=source)

    def _post(self, header: bytes, payload: memoryview | bytes, ticket_id: int) -> str | None:
        source = as_bytes_view(payload)  # written to the socket before this returns
        return self._send_frame(header, source.nbytes, inline=source, ticket_id=ticket_id, wait=False)


def listen(kind: str, receiver: KVReceiver, **options) -> TcpListener:
    return TcpListener(receiver, **options)


def connect(kind: str, target: str, timeout: float) -> TcpChannel:
    return TcpChannel(target, timeout)
