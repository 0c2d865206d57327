"""The interface of the prefill -> decode KV hop, and what every transport shares.

    prefill worker                                decode worker
    KVChannel.send_pages(header, payload) --frame--> KVListener -> KVReceiver.accept_pages
              <------------------- reply: ok, or the reason it was refused

A frame is a msgpack message from `messages` (PagesHeader, TransferDone, TransferAbort;
an empty header is a ping) plus, for a chunk, its raw page bytes. Each call waits for the
receiver's verdict: None/ok, or MessageRejected(reason) on the sender. Nothing that comes
off a link is ever unpickled, and every wait is bounded: a link that fails or stalls
raises TransportError on the sender, and the decode side's `KVReceiver.expire()` fails
the tickets it strands.
"""

from __future__ import annotations

import importlib
import logging
import struct
import threading
import time
from abc import ABC, abstractmethod

from pdserve.kv_transfer import messages
from pdserve.kv_transfer.messages import (
    MalformedMessage,
    MessageRejected,
    PagesHeader,
    TransferAbort,
    TransferDone,
)
from pdserve.kv_transfer.receiver import KVReceiver, TransferState

logger = logging.getLogger(__name__)

# kind (= address scheme) -> module in this package implementing `listen` and `connect`
_MODULES = {"grpc": "grpc_transport", "tcp": "tcp", "gloo": "torch_dist", "nccl": "torch_dist", "shm": "shm"}
KINDS = tuple(_MODULES)

DEFAULT_MAX_CHUNK_BYTES = 64 << 20  # a chunk is one layer's pages: tens of MB at most
MAX_HEADER_BYTES = 64 << 10  # a msgpack header is ~200 bytes; anything near this is garbage


class TransportError(RuntimeError):
    """The link failed (peer gone, timeout); the transfer cannot continue on it."""


class KVListener(ABC):
    """Decode side: accepts connections from prefill workers and feeds every message to a
    KVReceiver, from the listener's own threads. Serves any number of channels at once
    (up to the `max_channels` option)."""

    address: str  # what `connect` takes: "grpc://127.0.0.1:PORT", "gloo://...", "shm://NAME"

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

    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._lock = threading.Lock()
        self._broken: str | None = None
        self.last_used = time.monotonic()

    def send_pages(self, header: PagesHeader, payload: memoryview | bytes) -> None:
        nbytes = memoryview(payload).nbytes
        if nbytes > self.max_chunk_bytes:
            raise MessageRejected(f"chunk of {nbytes} bytes exceeds the {self.max_chunk_bytes}-byte limit of "
                                f"the link to {self.address}; send fewer pages per chunk or raise the "
                                f"listener's max_chunk_bytes")
        self._request(messages.encode(header), payload)

    def send_done(self, done: TransferDone) -> None:
        """MessageRejected when the receiver failed the transfer (e.g. pages missing)."""
        self._request(messages.encode(done), b"")

    def send_abort(self, abort: TransferAbort) -> None:
        self._request(messages.encode(abort), b"")

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

    def _request(self, header: bytes, payload: memoryview | bytes) -> None:
        with self._lock:
            if self._broken is not None:
                raise TransportError(f"the KV channel to {self.address} is {self._broken_words()}")
            try:
                reason = self._exchange(header, payload)
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

    @abstractmethod
    def _exchange(self, header: bytes, payload: memoryview | bytes) -> str | None:
        """Send one frame and wait (at most `timeout`) for its reply: None if accepted,
        else the reason. Raises TransportError if the link failed. Called under the lock."""

    @abstractmethod
    def _teardown(self) -> None:
        """Release the link's resources; called once broken or closed, under the lock."""


# -------------------------------------------------------------------- decode side


def serve_frame(receiver: KVReceiver, header: bytes | memoryview, payload: bytes | memoryview) -> str | None:
    """Apply one frame to `receiver`. Returns None if it was accepted, else why not.
    Never raises for anything a peer can send."""
    if len(header) == 0:
        return None if len(payload) == 0 else "a ping carries no payload"
    if len(header) > MAX_HEADER_BYTES:
        return f"header of {len(header)} bytes is over the {MAX_HEADER_BYTES}-byte limit"
    try:
        message = messages.decode(header)
    except MalformedMessage as exc:
        return f"malformed message: {exc}"
    try:
        if isinstance(message, PagesHeader):
            receiver.accept_pages(message, payload)
            return None
        if len(payload) != 0:
            return f"a {message.kind} message carries no payload ({len(payload)} bytes sent)"
        if isinstance(message, TransferAbort):
            receiver.accept_abort(message)
            return None
        receiver.accept_done(message)
        return _done_verdict(receiver, message.ticket_id)
    except MessageRejected as exc:
        return str(exc)
    except Exception as exc:  # a bug here must not take the listener down
        logger.exception("KV receiver failed on a %s frame", getattr(message, "kind", "?"))
        return f"internal error in the receiver: {type(exc).__name__}: {exc}"


def _done_verdict(receiver: KVReceiver, ticket_id: int) -> str | None:
    # accept_done fails an incomplete transfer without raising; the sender must hear it.
    try:
        status = receiver.poll(ticket_id)
    except KeyError:  # released by the engine in between: it has already seen the outcome
        return None
    if status.state is TransferState.FAILED:
        return status.reason or "transfer failed"
    return None


_REPLY = struct.Struct("<BI")  # status (0 ok, 1 rejected), reason length; then the reason


def encode_reply(reason: str | None, limit: int | None = None) -> bytes:
    """Reply bytes for byte-stream transports; `limit` bounds the total length."""
    if reason is None:
        return _REPLY.pack(0, 0)
    text = reason.encode("utf-8", "replace")
    if limit is not None:
        text = text[:limit - _REPLY.size]
    return _REPLY.pack(1, len(text)) + text


def decode_reply(data: bytes) -> str | None:
    status, length = _REPLY.unpack_from(data)
    if status not in (0, 1) or _REPLY.size + length > len(data):
        raise TransportError(f"garbled reply from the KV listener (status {status}, length {length})")
    return None if status == 0 else data[_REPLY.size:_REPLY.size + length].decode("utf-8", "replace")


REPLY_HEAD_BYTES = _REPLY.size


# ----------------------------------------------------------------- entry points


def listen(kind: str, receiver: KVReceiver, **options) -> KVListener:
    """Start a listener of `kind` ("grpc", "gloo", "nccl", "shm") feeding `receiver`.
    Options are per transport (see each module); all accept `max_chunk_bytes`.
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


def _module(kind: str, context: str):
    if kind not in _MODULES:
        raise TransportError(f"unknown KV transport {kind!r} in {context!r}; expected one of {', '.join(KINDS)}")
    return importlib.import_module(f"{__package__}.{_MODULES[kind]}")
