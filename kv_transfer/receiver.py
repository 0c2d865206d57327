"""`KVReceiver`: the decode side's gatekeeper for incoming KV.

It issues tickets and accepts only chunks for live tickets with the right secret, in the
ticket's layout, within its pages, with a matching checksum; anything else is rejected
with a reason and writes nothing. A transfer is a handle the scheduler polls:

    PENDING --first chunk--> TRANSFERRING --done, all pages present--> SUCCEEDED
       \\______________________________\\--deadline, abort, bad done--> FAILED(reason)

Transports call `accept_pages` / `accept_done` / `accept_abort` from their own threads;
the decode engine thread calls `issue`, `poll`, `release` and `expire`. One lock guards
the ticket table; chunk bytes are written outside it, into blocks that only their ticket
may write (each ticket's blocks are reserved for it by the scheduler).
"""

from __future__ import annotations

import enum
import hmac
import itertools
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from pdserve.kv_transfer import layout
from pdserve.kv_transfer.messages import KVTicket, MessageRejected, PagesHeader, TransferAbort, TransferDone
from pdserve.runtime.kv_pool import KVPool


class TransferState(enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class TransferStatus(NamedTuple):
    state: TransferState
    done: TransferDone | None = None  # set when SUCCEEDED
    reason: str = ""  # set when FAILED


@dataclass
class _Live:
    ticket: KVTicket
    # pages_received[layer] = set of ticket-relative page indices written at that layer
    pages_received: list[set[int]] = field(default_factory=list)
    state: TransferState = TransferState.PENDING
    done: TransferDone | None = None
    reason: str = ""
    bytes_received: int = 0
    writers: int = 0  # chunks being written right now (outside the lock)


class KVReceiver:
    def __init__(self, pool: KVPool, default_timeout: float = 30.0) -> None:
        self.pool = pool
        self.layout = layout.layout_of(pool)
        self.default_timeout = default_timeout
        self._lock = threading.Lock()
        self._live: dict[int, _Live] = {}
        self._ids = itertools.count(1)
        self.num_rejected = 0
        self.bytes_received = 0  # accepted chunk payloads, all tickets

    # ------------------------------------------------------------ engine thread side

    def issue(self, request_id: str, block_ids: Sequence[int], first_page: int,
              num_prompt_tokens: int, timeout: float | None = None) -> KVTicket:
        """A ticket allowing pages [first_page, first_page + len(block_ids)) of the prompt
        to be written into `block_ids` (already reserved by the scheduler)."""
        ticket = KVTicket(
            request_id=request_id, ticket_id=next(self._ids), secret=os.urandom(16),
            block_ids=tuple(block_ids), first_page=first_page,
            num_prompt_tokens=num_prompt_tokens, layout=self.layout,
            deadline=time.time() + (timeout if timeout is not None else self.default_timeout),
        )
        with self._lock:
            self._live[ticket.ticket_id] = _Live(ticket, [set() for _ in range(self.layout.num_layers)])
        return ticket

    def poll(self, ticket_id: int) -> TransferStatus:
        with self._lock:
            live = self._live[ticket_id]
            return TransferStatus(live.state, live.done, live.reason)

    def expire(self, now: float | None = None) -> list[int]:
        """Fail every unfinished ticket past its deadline; return their ids."""
        now = time.time() if now is None else now
        failed = []
        with self._lock:
            for ticket_id, live in self._live.items():
                if live.state in (TransferState.PENDING, TransferState.TRANSFERRING) and now > live.ticket.deadline:
                    self._fail(live, f"deadline exceeded after {live.bytes_received} bytes")
                    failed.append(ticket_id)
        return failed

    def release(self, ticket_id: int) -> None:
        """Forget a ticket (after SUCCEEDED, or after FAILED once the scheduler has dealt
        with it). Waits for chunk writes still in flight, so the caller may reuse the
        blocks as soon as this returns; later chunks for it are rejected."""
        while True:
            with self._lock:
                live = self._live.get(ticket_id)
                if live is None:
                    return
                if live.writers == 0:
                    del self._live[ticket_id]
                    return
                if live.state is not TransferState.FAILED:
                    self._fail(live, "released")
            time.sleep(0.0005)

    @property
    def num_live(self) -> int:
        with self._lock:
            return len(self._live)

    # --------------------------------------------------------------- transport side

    def accept_pages(self, header: PagesHeader, payload: bytes | bytearray | memoryview) -> None:
        """Validate and write one chunk. Raises MessageRejected (nothing written)."""
        with self._lock:
            live = self._check_ticket(header.ticket_id, header.secret, header.request_id)
            try:
                self._check_chunk(live.ticket, header, payload)
            except MessageRejected as exc:
                # The sender holds the secret, so it is ours and broken: the transfer
                # cannot complete, and failing it now lets decode recover at once.
                self._fail(live, str(exc))
                raise
            live.writers += 1
            live.state = TransferState.TRANSFERRING
        try:
            if layout.checksum(payload) != header.checksum:
                with self._lock:
                    self._fail(live, "checksum mismatch: a chunk was corrupted in transit")
                raise self._reject("checksum mismatch: the chunk was corrupted in transit")
            pages = layout.from_bytes(payload, self.layout, header.num_pages)
            blocks = live.ticket.block_ids[header.page_start:header.page_start + header.num_pages]
            layout.write_pages(self.pool, header.layer, blocks, pages)
        finally:
            with self._lock:
                live.writers -= 1
        with self._lock:
            live.pages_received[header.layer].update(range(header.page_start, header.page_start + header.num_pages))
            live.bytes_received += header.nbytes
            self.bytes_received += header.nbytes

    def accept_done(self, done: TransferDone) -> None:
        """The sender says it sent everything: succeed if every page of every layer is
        here. Otherwise the transfer fails and MessageRejected tells the sender why; it is
        also raised for a foreign message."""
        with self._lock:
            live = self._check_ticket(done.ticket_id, done.secret, done.request_id)
            expected = set(range(len(live.ticket.block_ids)))
            missing = [i for i, got in enumerate(live.pages_received) if got != expected]
            if missing or live.writers:
                reason = f"transfer declared done with layers {missing[:4]} incomplete"
                self._fail(live, reason)
                raise self._reject(reason)
            live.state, live.done = TransferState.SUCCEEDED, done

    def accept_abort(self, abort: TransferAbort) -> None:
        with self._lock:
            live = self._check_ticket(abort.ticket_id, abort.secret, abort.request_id)
            self._fail(live, f"aborted by the sender: {abort.reason}")

    def abort(self, ticket_id: int, reason: str) -> None:
        """Fail a ticket from the decode side (request cancelled)."""
        with self._lock:
            live = self._live.get(ticket_id)
            if live is not None and live.state is not TransferState.SUCCEEDED:
                self._fail(live, reason)

    # ---------------------------------------------------------------------- checks

    def _check_ticket(self, ticket_id: int, secret: bytes, request_id: str) -> _Live:
        live = self._live.get(ticket_id)
        if live is None:
            raise self._reject(f"no live ticket {ticket_id}")
        if not hmac.compare_digest(live.ticket.secret, secret) or live.ticket.request_id != request_id:
            raise self._reject(f"wrong secret or request id for ticket {ticket_id}")
        if live.state in (TransferState.SUCCEEDED, TransferState.FAILED):
            raise self._reject(f"ticket {ticket_id} is already {live.state.value}")
        if time.time() > live.ticket.deadline:
            self._fail(live, f"deadline exceeded after {live.bytes_received} bytes")
            raise self._reject(f"ticket {ticket_id} is past its deadline")
        return live

    def _check_chunk(self, ticket: KVTicket, header: PagesHeader, payload) -> None:
        if header.dtype != self.layout.dtype:
            raise self._reject(f"dtype {header.dtype} != pool dtype {self.layout.dtype}")
        if not 0 <= header.layer < self.layout.num_layers:
            raise self._reject(f"layer {header.layer} out of range [0, {self.layout.num_layers})")
        if header.num_pages <= 0 or header.page_start < 0 or \
                header.page_start + header.num_pages > len(ticket.block_ids):
            raise self._reject(f"pages [{header.page_start}, {header.page_start + header.num_pages}) "
                               f"outside the ticket's {len(ticket.block_ids)} pages")
        if tuple(header.shape) != layout.chunk_shape(self.layout, header.num_pages):
            raise self._reject(f"shape {tuple(header.shape)} != "
                               f"{layout.chunk_shape(self.layout, header.num_pages)}")
        expected = layout.chunk_nbytes(self.layout, header.num_pages)
        if header.nbytes != expected or len(payload) != expected:
            raise self._reject(f"payload of {len(payload)} bytes (header {header.nbytes}); expected {expected}")

    def _reject(self, reason: str) -> MessageRejected:
        self.num_rejected += 1
        return MessageRejected(reason)

    @staticmethod
    def _fail(live: _Live, reason: str) -> None:
        live.state, live.reason = TransferState.FAILED, reason
