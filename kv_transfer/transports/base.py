"""The interface of the prefill -> decode KV hop, and what every transport shares.

    prefill worker                                decode worker
    KVChannel.send_pages(header, payload) --frame--> KVListener -> KVReceiver.accept_pages
              <------------------- reply: ok, or the reason it was refused

A frame is a msgpack message from `messages` (PagesHeader, TransferDone, TransferAbort;
an empty header is a ping) plus, for a chunk, its raw page bytes. Each call waits for the
receiver's verdict: None/ok, or MessageRejected(reason) on the sender. A chunk sent with
`wait=False` may return before its verdict, on a transport that keeps a few chunks in
flight (tcp): a refusal then raises from the next call for the same ticket, `send_done`
at the latest. The receiver handles one link's frames in order and fails a ticket whose
chunk it refused, so `send_done`'s verdict always covers every chunk before it. Nothing that comes
off a link is ever unpickled, and every wait is bounded: a link that fails or stalls
raises TransportError on the sender, and the decode side's `KVReceiver.expire()` fails
the tickets it strands.

A listener trusts nothing a peer sends (`ListenerLimits`): it serves at most
`max_channels` links and refuses more; it closes a link idle for `idle_timeout` (a channel
idle for half that proves its link with a ping before the next frame and reconnects if the
listener closed it, so idle closes never fail a transfer); it drops a link whose frame stalls; and it
gives a link staging memory for payloads only once a chunk header on it passed the
receiver's ticket and secret checks (`admit_frame`). Every refusal is counted in
`KVReceiver.rejected`.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from pdserve.kv_transfer import layout, messages
from pdserve.kv_transfer.messages import (
    MalformedMessage,
    MessageRejected,
    PagesHeader,
    TransferAbort,
    TransferDone,
)
from pdserve.kv_transfer.receiver import KVReceiver, TransferState
from pdserve.runtime.kv_pool import KVPool

logger = logging.getLogger(__name__)

# kind (= address scheme) -> module in this package implementing `listen` and `connect`
_MODULES = {"grpc": "grpc_transport", "tcp": "tcp", "gloo": "torch_dist", "nccl": "torch_dist", "shm": "shm",
            "nixl": "nixl"}
KINDS = tuple(_MODULES)

DEFAULT_MAX_CHUNK_BYTES = 64 << 20  # a chunk is one layer's pages: tens of MB at most
DEFAULT_IDLE_TIMEOUT = 180.0  # s; channels revive idle links themselves, so this only frees slots
MAX_HEADER_BYTES = 64 << 10  # a msgpack header is ~200 bytes; anything near this is garbage

Message = PagesHeader | TransferDone | TransferAbort


class TransportError(RuntimeError):
    """The link failed (peer gone, timeout); the transfer cannot continue on it."""


@dataclass(frozen=True)
class ListenerLimits:
    """What a listener grants any peer, validated once. Every listener kind takes these
    as options (some kinds add their own)."""

    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES  # one chunk's payload; also the staging memory per link
    max_channels: int = 16  # links served at once (one thread each); more are refused
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # s without a frame before a link is closed
    op_timeout: float = 30.0  # s for one frame, from its first byte to its reply, before the link is dropped

    def __post_init__(self) -> None:
        for name in ("max_chunk_bytes", "max_channels", "idle_timeout", "op_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise TransportError(f"KV listener option {name} must be a positive number, got {value!r}")
        if not isinstance(self.max_channels, int) or not isinstance(self.max_chunk_bytes, int):
            raise TransportError("KV listener options max_channels and max_chunk_bytes must be integers")


class KVListener(ABC):
    """Decode side: accepts connections from prefill workers and feeds every message to a
    KVReceiver, from the listener's own threads, within its `ListenerLimits`."""

    address: str  # what `connect` takes: "grpc://127.0.0.1:PORT", "gloo://...", "shm://NAME"

    @property
    @abstractmethod
    def num_links(self) -> int:
        """Links (channels) served right now; never more than max_channels."""

    @abstractmethod
    def close(self) -> None:
        """Stop accepting and drop every link; safe to call twice. Channels still open
        see TransportError on their next call."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"


class KVChannel(ABC):
    """Prefill side: an ordered, reliable link to one decode worker's listener.

    Every call returns once the receiver accepted the message, raises MessageRejected(reason)
    if it refused it (the channel stays usable), or TransportError if the link failed
    within `timeout` (the channel is then broken: every later call raises TransportError).
    Calls from several threads are serialized.
    """

    address: str
    max_chunk_bytes: int  # the listener's limit on one chunk's payload, learned on connect
    # The listener closes the link after this long without a frame; None: never, or the
    # transport keeps the link busy itself. Learned on connect.
    idle_timeout: float | None = None

    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._lock = threading.Lock()
        self._broken: str | None = None
        self.last_used = time.monotonic()
        self.reconnects = 0  # links replaced after the listener closed an idle one
        # ticket id -> why the receiver refused a chunk of it sent without waiting; raised
        # (and dropped) by the next call for that ticket. Written by `_post`'s transport.
        self._refused: dict[int, str] = {}

    def send_pages(self, header: PagesHeader, payload: memoryview | bytes, wait: bool = True) -> None:
        """Send one chunk. `wait=False`: return once it is on the link where the transport
        can defer its verdict (see the module docstring); `payload` may be reused then."""
        self._check_chunk_size(memoryview(payload).nbytes)
        self._request(messages.encode(header), payload, ticket_id=header.ticket_id, wait=wait)

    # True: `send_pool_pages` moves the pages out of the sender's pool itself, during the
    # call (no copy first), so the pool must keep those blocks unchanged until it returns.
    reads_pool: ClassVar[bool] = False

    def send_pool_pages(self, header: PagesHeader, pool: KVPool, block_ids: Sequence[int],
                        wait: bool = True) -> None:
        """Send layer `header.layer` of this pool's `block_ids` as the chunk `header`
        describes (its checksum is `layout.checksum_pages` of them, or None: the channel
        takes it). This default packs them (`layout.read_pages`) and sends the copy; a
        transport that `reads_pool` moves them where they lie. `wait` as for send_pages."""
        payload = layout.to_bytes(layout.read_pages(pool, header.layer, block_ids))
        if header.checksum is None:
            header = dataclasses.replace(header, checksum=layout.checksum(payload))
        self.send_pages(header, payload, wait=wait)

    def send_done(self, done: TransferDone) -> None:
        """MessageRejected when the receiver failed the transfer (e.g. pages missing, or a
        chunk sent without waiting was refused)."""
        self._request(messages.encode(done), b"", ticket_id=done.ticket_id)

    def send_abort(self, abort: TransferAbort) -> None:
        self._request(messages.encode(abort), b"", ticket_id=abort.ticket_id)

    def ping(self) -> None:
        """A no-op round trip: proves the listener is there and answering."""
        self._request(b"", b"")

    def close(self) -> None:
        """Drop the link; safe to call twice and after a TransportError."""
        with self._lock:
            if self._broken is None:
                self._broken = "closed"
            self._teardown()

    @property
    def broken(self) -> str | None:
        """Why the channel can no longer be used, or None."""
        return self._broken

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"

    # ------------------------------------------------------------ for transports

    def _check_chunk_size(self, nbytes: int) -> None:
        if nbytes > self.max_chunk_bytes:
            raise MessageRejected(f"chunk of {nbytes} bytes exceeds the {self.max_chunk_bytes}-byte limit of "
                                  f"the link to {self.address}; send fewer pages per chunk or raise the "
                                  f"listener's max_chunk_bytes")

    def _request(self, header: bytes, payload: memoryview | bytes, ticket_id: int | None = None,
                 wait: bool = True) -> None:
        with self._lock:
            if self._broken is not None:
                raise TransportError(f"the KV channel to {self.address} is {self._broken_words()}")
            try:
                self._revive_if_idle()
                reason = self._exchange(header, payload) if wait else self._post(header, payload, ticket_id)
                # A chunk refused earlier is the first reason this ticket failed.
                reason = self._refused.pop(ticket_id, None) or reason
            except BaseException as exc:  # mid-frame, the link's state is unknown: drop it
                self._broken = f"broken: {exc!s}" if isinstance(exc, TransportError) else \
                    f"broken by {type(exc).__name__} mid-frame: {exc!s}"
                self._teardown()
                raise
            finally:
                self.last_used = time.monotonic()
        if reason is not None:
            raise MessageRejected(reason)

    def _broken_words(self) -> str:
        return self._broken if self._broken == "closed" else f"unusable ({self._broken})"

    def _revive_if_idle(self) -> None:
        """Before a frame on a link idle for half the listener's idle timeout or more (the
        listener may have closed it, or be about to): prove the link with a ping, unless
        the listener visibly closed it already, and open a fresh one if that fails. A ping
        is harmless to lose or repeat, so idle closes never fail a transfer; a link that
        fails while in use still raises TransportError. Raises TransportError if no fresh
        link can be opened."""
        idle = time.monotonic() - self.last_used
        if self.idle_timeout is None or idle < self.idle_timeout / 2:
            return
        self._settle()  # verdicts still on the link would read as its hang-up
        if not self._closed_by_listener():
            try:
                if self._exchange(b"", b"") is None:
                    return
            except TransportError as exc:
                logger.debug("idle KV link to %s is gone (%s); reconnecting", self.address, exc)
        self._teardown()
        self._open()
        self.reconnects += 1
        logger.info("KV channel to %s reconnected after %.1f s idle", self.address, idle)

    @abstractmethod
    def _open(self) -> None:
        """Open the link (connect, handshake, learn `max_chunk_bytes`). Called by the
        constructor, and under the lock after `_teardown` to replace a link the listener
        closed. Raises TransportError."""

    @abstractmethod
    def _exchange(self, header: bytes, payload: memoryview | bytes) -> str | None:
        """Send one frame and wait (at most `timeout`) for its reply: None if accepted,
        else the reason. Raises TransportError if the link failed. Called under the lock."""

    def _post(self, header: bytes, payload: memoryview | bytes, ticket_id: int) -> str | None:
        """Send one chunk frame without waiting for its verdict where the transport can:
        then return None and, once the verdict is read, put a refusal in `_refused`. This
        default waits (`_exchange`). Called under the lock."""
        return self._exchange(header, payload)

    def _settle(self) -> None:
        """Read the verdicts of every chunk still in flight (into `_refused`). Called
        under the lock; raises TransportError if the link failed."""

    @abstractmethod
    def _teardown(self) -> None:
        """Release the link's resources; called once broken or closed, or before a
        reconnect, under the lock. Safe to call twice."""

    def _closed_by_listener(self) -> bool:
        """True if the listener has visibly closed the link (a transport that can tell
        without a round trip says so); False if unknown."""
        return False


# -------------------------------------------------------------------- decode side


def read_header(receiver: KVReceiver, header: bytes | memoryview, payload_len: int,
                max_payload: int | None = None) -> Message | None:
    """Decode a frame's header and check that it fits the frame (a payload only after a
    chunk header, within `max_payload`). Returns the message, None for a ping. Raises
    MessageRejected for anything else, counted on `receiver`."""
    if len(header) == 0:
        if payload_len:
            raise _refuse(receiver, "malformed", "a ping carries no payload")
        return None
    if len(header) > MAX_HEADER_BYTES:
        raise _refuse(receiver, "oversized", f"header of {len(header)} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    if max_payload is not None and payload_len > max_payload:
        raise _refuse(receiver, "oversized", f"payload of {payload_len} bytes is over the {max_payload}-byte limit")
    try:
        message = messages.decode(header)
    except MalformedMessage as exc:
        raise _refuse(receiver, "malformed", f"malformed message: {exc}") from None
    if payload_len and not isinstance(message, PagesHeader):
        raise _refuse(receiver, "malformed", f"a {message.kind} message carries no payload ({payload_len} bytes sent)")
    return message


def admit_frame(receiver: KVReceiver, header: bytes | memoryview, payload_len: int,
                max_payload: int) -> Message | None:
    """`read_header`, then, for a chunk, the receiver's ticket and layout checks: once this
    returns, the frame's `payload_len` bytes may be read, and staging memory allocated for
    them. Raises MessageRejected (counted) only."""
    message = read_header(receiver, header, payload_len, max_payload)
    if isinstance(message, PagesHeader):
        try:
            receiver.admit_pages(message, payload_len)
        except MessageRejected:
            raise
        except Exception as exc:  # a bug here must not take the listener down
            logger.exception("KV receiver failed on a chunk header")
            raise _refuse(receiver, "internal_error", f"internal error in the receiver: {type(exc).__name__}: {exc}") \
                from None
    return message


def apply_frame(receiver: KVReceiver, message: Message | None, payload: bytes | memoryview) -> str | None:
    """Apply a frame whose header `read_header` or `admit_frame` returned. Returns None if
    it was accepted, else why not. Never raises for anything a peer can send."""
    if message is None:
        return None
    try:
        if isinstance(message, PagesHeader):
            receiver.accept_pages(message, payload)
            return None
        if isinstance(message, TransferAbort):
            receiver.accept_abort(message)
            return None
        receiver.accept_done(message)
        return _done_verdict(receiver, message.ticket_id)
    except MessageRejected as exc:
        return str(exc)
    except Exception as exc:  # a bug here must not take the listener down
        logger.exception("KV receiver failed on a %s frame", message.kind)
        receiver.count_rejection("internal_error")
        return f"internal error in the receiver: {type(exc).__name__}: {exc}"


def serve_frame(receiver: KVReceiver, header: bytes | memoryview, payload: bytes | memoryview,
                max_payload: int | None = None) -> str | None:
    """Apply one frame whose payload has already arrived. Returns None if it was accepted,
    else why not (counted on `receiver`). Never raises for anything a peer can send."""
    try:
        message = read_header(receiver, header, len(payload), max_payload)
    except MessageRejected as exc:
        return str(exc)
    return apply_frame(receiver, message, payload)


def _refuse(receiver: KVReceiver, reason_class: str, reason: str) -> MessageRejected:
    receiver.count_rejection(reason_class)
    return MessageRejected(reason)


def _done_verdict(receiver: KVReceiver, ticket_id: int) -> str | None:
    # The engine may release or fail the ticket right after accept_done; report its state.
    try:
        status = receiver.poll(ticket_id)
    except KeyError:  # released by the engine in between: it has already seen the outcome
        return None
    if status.state is TransferState.FAILED:
        return status.reason or "transfer failed"
    return None


class Reply(NamedTuple):
    """A listener's answer to a frame."""

    reason: str | None  # why the frame was refused; None if accepted (or if `proceed`)
    proceed: bool = False  # the chunk header was admitted: send its payload now (see encode_proceed)


# status (0 accepted, 1 refused, 2 proceed), reason length; then the reason
_REPLY = struct.Struct("<BI")
_ACCEPTED, _REFUSED, _PROCEED = 0, 1, 2


def encode_reply(reason: str | None, limit: int | None = None) -> bytes:
    """Reply bytes for byte-stream transports; `limit` bounds the total length."""
    if reason is None:
        return _REPLY.pack(_ACCEPTED, 0)
    text = reason.encode("utf-8", "replace")
    if limit is not None:
        text = text[:limit - _REPLY.size]
    return _REPLY.pack(_REFUSED, len(text)) + text


def encode_proceed() -> bytes:
    """The interim reply of a two-step chunk: its header was admitted, the sender may now
    send the payload (and then waits for the final reply). Transports whose staging memory
    must exist before a payload is sent (shm, torch.distributed) use it for a link's first
    chunk."""
    return _REPLY.pack(_PROCEED, 0)


def decode_reply(data: bytes) -> Reply:
    status, length = _REPLY.unpack_from(data)
    if status not in (_ACCEPTED, _REFUSED, _PROCEED) or _REPLY.size + length > len(data):
        raise TransportError(f"garbled reply from the KV listener (status {status}, length {length})")
    if status == _REFUSED:
        return Reply(data[_REPLY.size:_REPLY.size + length].decode("utf-8", "replace"))
    return Reply(None, proceed=status == _PROCEED)


REPLY_HEAD_BYTES = _REPLY.size


# ----------------------------------------------------------------- entry points


def listen(kind: str, receiver: KVReceiver, **options) -> KVListener:
    """Start a listener of `kind` ("grpc", "tcp", "gloo", "nccl", "shm", "nixl") feeding `receiver`.
    Options are per transport (see each module); all accept the fields of ListenerLimits.
    Raises TransportError if the transport cannot work here."""
    return _module(kind, kind).listen(kind, receiver, **options)


def connect(address: str, timeout: float = 10.0) -> KVChannel:
    """Open a channel to the listener at `address`. `timeout` bounds connecting and then
    every call on the channel. Raises TransportError if no listener answers in time."""
    kind, sep, target = address.partition("://")
    if not sep or not target:
        raise TransportError(f"malformed KV listener address {address!r}; expected kind://target "
                             f"with kind one of {', '.join(KINDS)}")
    return _module(kind, address).connect(kind, target, timeout)


def reads_pool(address: str, device_type: str = "cpu") -> bool:
    """Whether channels to `address` send the pages of a pool on `device_type` ("cpu",
    "cuda") out of the pool in place (`KVChannel.reads_pool`): the sender must then hold
    the pages until each send returns. A transport module says so by `reads_pool_on(kind,
    device_type)`, or by `READS_POOL` for host memory only."""
    kind = address.partition("://")[0]
    if kind not in _MODULES:
        return False
    module = _module(kind, address)
    if hasattr(module, "reads_pool_on"):
        return module.reads_pool_on(kind, device_type)
    return getattr(module, "READS_POOL", False) and device_type == "cpu"


def _module(kind: str, context: str):
    if kind not in _MODULES:
        raise TransportError(f"unknown KV transport {kind!r} in {context!r}; expected one of {', '.join(KINDS)}")
    return importlib.import_module(f"{__package__}.{_MODULES[kind]}")
