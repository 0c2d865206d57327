"""How torch.distributed KV pairs come and go: the listener's TCPStore and its keys.

The listener serves a TCPStore from a socket bound to its host only. Keys:

    kv/pairs            the pair counter: a sender takes index = add(1) - 1
    kv-verdict/<index>  the listener's answer to pair `index`: "ok" (a thread serves it) or
                        "full" (at max_channels: refused, no thread spent on it)
    kv/<index>/...      the pair's 2-rank group rendezvous (PrefixStore), listener rank 0
    kv-close/<index>    the listener's word on a served pair: "ask" (it idled for
                        idle_timeout: its sender should close it with a CLOSE frame), or
                        "gone" (the listener dropped it: the sender drops its end without one)

No init_process_group: pairs are independent of any default group and of each other.

The TCPStore accepts any client that reaches its port and stores what it is sent: the pair
counter is a number anyone may set, so the listener treats it as a hint (see
`TorchDistListener`), and the listener must be bound to an address only the cluster reaches.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist

from pdserve.kv_transfer.transports.base import TransportError

logger = logging.getLogger(__name__)

COUNTER = "kv/pairs"
_VERDICT = "kv-verdict/{index}"
_CLOSE = "kv-close/{index}"
OK, FULL = b"ok", b"full"
ASK, GONE = b"ask", b"gone"


def serve_store(host: str, port: int, timeout: float) -> dist.TCPStore:
    """The listener's store, served from a socket bound to `host` only (TCPStore's own
    server would listen on every interface). Raises OSError or RuntimeError."""
    sock = socket.create_server((host, port))
    return dist.TCPStore(host, 0, None, True, timedelta(seconds=timeout), wait_for_workers=False,
                         master_listen_fd=sock.detach())


def pairs_taken(store: dist.Store) -> int:
    """How many pair indexes senders (or anyone) took so far: the counter, unchanged."""
    return store.add(COUNTER, 0)


def client_store(host: str, port: int, timeout: float) -> dist.TCPStore:
    """A client of a listener's store. Raises RuntimeError if none answers in `timeout`."""
    return dist.TCPStore(host, port, None, False, timedelta(seconds=timeout), wait_for_workers=False)


def pair_store(store: dist.Store, index: int) -> dist.PrefixStore:
    """Where pair `index`'s group meets."""
    return dist.PrefixStore(f"kv/{index}/", store)


def take_pair(store: dist.Store, timeout: float, address: str) -> int:
    """The sender's side: take the next pair index and wait for the listener's verdict on
    it. Returns the index once it is "ok". Raises TransportError if the listener (at
    `address`) is at its channel limit, RuntimeError (the store's) if no verdict comes
    within `timeout`."""
    index = store.add(COUNTER, 1) - 1
    key = _VERDICT.format(index=index)
    store.wait([key], timedelta(seconds=timeout))
    if store.get(key) != OK:
        raise TransportError(f"the KV listener at {address} is at its channel limit")
    return index


def answer(store: dist.Store, index: int, ok: bool) -> None:
    """The listener's verdict on pair `index`."""
    store.set(_VERDICT.format(index=index), OK if ok else FULL)


def close_request(store: dist.Store | None, index: int) -> bytes | None:
    """The listener's word on pair `index`: ASK, GONE, or None; GONE if its store cannot be
    reached (the listener is gone) or there is none."""
    key = _CLOSE.format(index=index)
    try:
        return store.get(key) if store.check([key]) else None
    except (AttributeError, RuntimeError, OSError) as exc:  # AttributeError: no store
        logger.debug("cannot read %s from the KV listener's store: %s", key, exc)
        return GONE


class PairWatch:
    """The listener's side of one served pair's close key, and what it goes by: since when
    the pair has waited for a frame. The key is written under `lock` with that state, so an
    ask and the frame that withdraws it cannot cross. The acceptor thread asks; the pair's
    own thread waits, withdraws and marks it gone (each with its own store client)."""

    def __init__(self, index: int) -> None:
        self.key = _CLOSE.format(index=index)
        self._lock = threading.Lock()
        self._waiting_since: float | None = None  # None: the pair is in a frame
        self._asked = False

    @contextlib.contextmanager
    def waiting(self, store: dist.Store) -> Iterator[None]:
        """Around the pair's wait for its next head. After it (a frame came after all: a
        CLOSE, or a sender that was only late), an ask is withdrawn."""
        with self._lock:
            self._waiting_since = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._waiting_since = None
        with self._lock:
            if self._asked:
                self._asked = False
                _quietly(store.delete_key, self.key)

    def ask_if_idle(self, store: dist.Store, idle_timeout: float) -> bool:
        """Ask the sender to close the pair if it has waited for a frame for `idle_timeout`
        and was not asked yet. True if it was asked now."""
        with self._lock:
            since = self._waiting_since
            if self._asked or since is None or time.monotonic() - since < idle_timeout:
                return False
            self._asked = True
            store.set(self.key, ASK)
        return True

    def mark_gone(self, store: dist.Store | None) -> None:
        """The listener drops the pair: first tell the sender, whose end may fail as soon
        as ours goes."""
        with self._lock:
            _quietly(lambda: store.set(self.key, GONE))


def _quietly(action, *args) -> None:
    """A store write the sender learns of anyway, from its link, if it fails."""
    try:
        action(*args)
    except (AttributeError, RuntimeError, OSError) as exc:  # AttributeError: no store
        logger.debug("a KV pair store write failed: %s", exc)
