"""`KVReceiver`: the decode side's gatekeeper for incoming KV.

It issues tickets and accepts only chunks for live tickets with the right secret, in the
ticket's layout, within its pages, with a matching checksum; anything else is rejected
with a reason and writes nothing. A transfer is a handle the scheduler polls:

    PENDING --first chunk--> TRANSFERRING --done, all pages present--> SUCCEEDED
       \\______________________________\\--deadline, abort, bad done--> FAILED(reason)

Transports call `admit_pages` (a chunk's header, before its payload is read),
`accept_pages` / `accept_done` / `accept_abort` and `count_rejection` from their own
threads, or, to move a chunk's bytes straight into the ticket's blocks without staging
them (nixl pulls them, tcp receives into them), `land_pages` and then the landing's
`landed` (the checksum is verified over the blocks) or `abandoned`; the decode engine thread calls `issue`, `poll`, `release` and `expire`. One lock
guards the ticket table and the rejection counters; chunk bytes are written outside it,
into blocks that only their ticket may write (each ticket's blocks are reserved for it by
the scheduler).

Every refusal, here or in a listener, is counted in `rejected` under one of
`REJECTION_REASONS` (the keys are fixed at construction, so another thread may copy the
dict at any time).
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

import torch

from pdserve.kv_transfer import layout
from pdserve.kv_transfer.messages import (
    KVTicket,
    MessageRejected,
    PagesHeader,
    TransferAbort,
    TransferDone,
    first_token_problem,
)
from pdserve.runtime.kv_pool import KVPool
from pdserve.runtime.sampling_params import MAX_LOGPROBS

# Why frames or links were refused: the keys of `KVReceiver.rejected`.
REJECTION_REASONS = (
    "malformed",  # not a frame or message of the protocol (bad msgpack, kind, field types, stray payload)
    "oversized",  # a header or payload over the listener's limits
    "truncated",  # the link ended in the middle of a frame
    "stalled_frame",  # a frame not completed (or its reply not read) within the listener's op_timeout
    "idle_timeout",  # a link idle past the listener's idle_timeout, closed
    "over_connection_limit",  # a link refused because the listener serves max_channels already
    "unknown_ticket",  # no live ticket with that id: never issued, or released
    "bad_secret",  # wrong secret or request id for a live ticket
    "settled_ticket",  # the ticket already succeeded or failed (e.g. a frame replayed after TransferDone)
    "expired",  # the ticket is past its deadline
    "out_of_bounds",  # a layer or pages outside the ticket
    "bad_layout",  # dtype, shape, scales or byte count other than the pool's layout implies
    "checksum",  # the payload does not match its checksum (XXH3-64)
    "incomplete",  # TransferDone before every page of every layer arrived
    "bad_token",  # TransferDone's first token, logprobs or prompt logprobs out of range
    "pull_failed",  # the decode side's read of a chunk from the sender's memory (nixl) failed or timed out
    "no_staging_memory",  # no room for a connection's staging memory (shm: /dev/shm is full)
    "internal_error",  # the receiver failed on a frame (a bug); the frame was refused
)


class TransferState(enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class TransferStatus(NamedTuple):
    state: TransferState
    done: TransferDone | None = None  # set when SUCCEEDED
    reason: str = ""  # set when FAILED
    first_page_at: float | None = None  # time.monotonic() when its first chunk arrived (None: none yet)


@dataclass
class _Live:
    ticket: KVTicket
    pool: KVPool  # where its pages go: the receiver's pool, or the probe pool for a probe ticket
    # pages_received[layer] = set of ticket-relative page indices written at that layer
    pages_received: list[set[int]] = field(default_factory=list)
    state: TransferState = TransferState.PENDING
    done: TransferDone | None = None
    reason: str = ""
    bytes_received: int = 0
    writers: int = 0  # chunks being written right now (outside the lock)
    first_page_at: float | None = None  # time.monotonic() of its first chunk


class Landing:
    """One admitted chunk being moved into the pool in place (see `KVReceiver.land_pages`)."""

    def __init__(self, receiver: KVReceiver, live: _Live, header: PagesHeader, blocks: Sequence[int],
                 runs: list[layout.PoolRun]) -> None:
        self.receiver, self.live, self.header = receiver, live, header
        self.block_ids = tuple(blocks)
        self.runs = runs
        self._open = True

    @property
    def pool(self) -> KVPool:
        """The pool the bytes go to (the receiver's, or its probe pool)."""
        return self.live.pool

    def views(self) -> list[torch.Tensor]:
        """The destination runs' memory, in the chunk's byte order."""
        return [layout.run_view(self.pool, self.header.layer, run) for run in self.runs]

    def addresses(self) -> list[tuple[int, int]]:
        """The destination runs as (address, nbytes), in the chunk's byte order."""
        return layout.run_addresses(self.pool, self.header.layer, self.runs)

    def landed(self, checksum: int | None = None) -> None:
        """The bytes are in the runs: verify the checksum, then count the pages received.
        `checksum`: the landed bytes' checksum as the transport computed it where they lie
        (e.g. on a GPU, in the header's kind of checksum); None: hash the runs here
        (`layout.checksum_pages`, host memory). Raises MessageRejected (and fails the
        ticket) on a mismatch."""
        self._close()
        try:
            got = layout.checksum_pages(self.pool, self.header.layer, self.block_ids, self.runs) \
                if checksum is None else checksum
        except Exception as exc:  # noqa: BLE001 - fail the ticket: release() must not wait for this landing
            self.receiver._landed(self, f"internal error while verifying a chunk: {type(exc).__name__}: {exc}",
                                  "internal_error")
        error = None if got == self.header.checksum else "checksum mismatch: a chunk was corrupted in transit"
        if error is None and self.pool.quantized:
            # Checked where the bytes landed: the ticket's blocks are read by no one until
            # every chunk of it landed and passed.
            error = self._stored_values_problem()
            if error is not None:
                self.receiver._landed(self, f"refused a chunk's quantized values: {error}", "bad_layout")
        self.receiver._landed(self, error)

    def _stored_values_problem(self) -> str | None:
        for run, view in zip(self.runs, self.views()):
            if not run.scales:
                continue
            values = layout.run_view(self.pool, self.header.layer, run._replace(scales=False))
            problem = layout.stored_values_problem(values, view)
            if problem is not None:
                return problem
        return None

    def abandoned(self, reason: str, reason_class: str = "truncated") -> None:
        """The bytes did not all arrive (link dropped, pull failed): the runs may hold part
        of them, so the ticket fails. Raises MessageRejected with `reason`."""
        self._close()
        self.receiver._landed(self, reason, reason_class)

    def _close(self) -> None:
        if not self._open:
            raise RuntimeError("a landing is closed once")
        self._open = False


class KVReceiver:
    """`vocab_size`: the decode model's vocabulary; a TransferDone whose token ids are not
    below it is refused (and its transfer failed). None checks only that ids are >= 0."""

    def __init__(self, pool: KVPool, default_timeout: float = 30.0, vocab_size: int | None = None) -> None:
        self.pool = pool
        self.layout = layout.layout_of(pool)
        self.default_timeout = default_timeout
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._live: dict[int, _Live] = {}
        self._ids = itertools.count(1)
        self.rejected: dict[str, int] = dict.fromkeys(REJECTION_REASONS, 0)  # reason -> count, under _lock
        self._probe_pool: KVPool | None = None  # see issue_probe
        self.bytes_received = 0  # accepted chunk payloads, all tickets

    @property
    def num_rejected(self) -> int:
        """Every refusal so far, all reasons together."""
        return sum(self.rejected.values())

    def count_rejection(self, reason: str) -> None:
        """Count a refusal decided outside the receiver (by a listener). `reason` is one of
        REJECTION_REASONS; any other is a bug and raises KeyError."""
        with self._lock:
            self.rejected[reason] += 1

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
            self._live[ticket.ticket_id] = _Live(ticket, self.pool, [set() for _ in range(self.layout.num_layers)])
        return ticket

    def issue_probe(self, num_pages: int, timeout: float | None = None) -> KVTicket:
        """A ticket for a timed test transfer at start-up (a link's transport is chosen by
        measuring one): its pages go to a scratch pool of this layout that this receiver
        owns (made on first use, dropped when no probe ticket is left), never into blocks
        the engine may use. Checked like any ticket. `release` it when done."""
        with self._lock:
            if self._probe_pool is None or self._probe_pool.num_blocks < num_pages:
                num_layers, _, _, block_size, kv_heads, head_dim = self.pool.kv.shape
                self._probe_pool = KVPool(num_layers, num_pages, block_size, kv_heads, head_dim,
                                          self.pool.dtype, self.pool.kv.device)
            probe_pool = self._probe_pool
        ticket = KVTicket(
            request_id=f"probe-{os.urandom(4).hex()}", ticket_id=next(self._ids), secret=os.urandom(16),
            block_ids=tuple(range(num_pages)), first_page=0, num_prompt_tokens=num_pages * self.layout.block_size,
            layout=self.layout, deadline=time.time() + (timeout if timeout is not None else self.default_timeout),
        )
        with self._lock:
            self._live[ticket.ticket_id] = _Live(ticket, probe_pool, [set() for _ in range(self.layout.num_layers)])
        return ticket

    def poll(self, ticket_id: int) -> TransferStatus:
        with self._lock:
            live = self._live[ticket_id]
            return TransferStatus(live.state, live.done, live.reason, live.first_page_at)

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
                    if live.pool is self._probe_pool and not any(x.pool is live.pool for x in self._live.values()):
                        self._probe_pool = None
                    return
                if live.state is not TransferState.FAILED:
                    self._fail(live, "released")
            time.sleep(0.0005)

    @property
    def num_live(self) -> int:
        with self._lock:
            return len(self._live)

    # --------------------------------------------------------------- transport side

    def admit_pages(self, header: PagesHeader, nbytes: int) -> None:
        """Check a chunk's header, announcing `nbytes` of payload, before the payload is
        read: its ticket is live, the secret right, and layer, pages, shape and size fit
        the ticket. A listener allocates staging memory for a connection only after one
        of its chunks passed this. Raises MessageRejected (counted); a wrong chunk under
        the right secret also fails the transfer, as `accept_pages` would. Writes nothing."""
        with self._lock:
            self._admit(header, nbytes)

    def accept_pages(self, header: PagesHeader, payload: bytes | bytearray | memoryview) -> None:
        """Validate and write one chunk. Raises MessageRejected (nothing written)."""
        with self._lock:
            live = self._admit(header, len(payload))
            live.writers += 1
            live.state = TransferState.TRANSFERRING
            if live.first_page_at is None:
                live.first_page_at = time.monotonic()
        try:
            if layout.checksum(payload) != header.checksum:
                with self._lock:
                    self._fail(live, "checksum mismatch: a chunk was corrupted in transit")
                    raise self._reject("checksum", "checksum mismatch: the chunk was corrupted in transit")
            pages = layout.from_bytes(payload, self.layout, header.num_pages)
            if self.layout.scale_dtype:
                problem = layout.stored_values_problem(*layout.split_chunk(self.layout, header.num_pages, pages))
                if problem is not None:
                    with self._lock:
                        self._fail(live, f"refused a chunk's quantized values: {problem}")
                        raise self._reject("bad_layout", f"refused a chunk's quantized values: {problem}")
            blocks = live.ticket.block_ids[header.page_start:header.page_start + header.num_pages]
            layout.write_pages(live.pool, header.layer, blocks, pages)
        finally:
            with self._lock:
                live.writers -= 1
        with self._lock:
            live.pages_received[header.layer].update(range(header.page_start, header.page_start + header.num_pages))
            live.bytes_received += header.nbytes
            self.bytes_received += header.nbytes

    def land_pages(self, header: PagesHeader) -> Landing:
        """Admit a chunk whose `header.nbytes` bytes a transport moves straight into this
        pool: the checks of `accept_pages`, except the checksum, which `Landing.landed`
        verifies over the blocks once the bytes are there. The landing names the
        destination (`runs`: the ticket's blocks as the pool's contiguous runs, in the
        chunk's byte order); until it is closed, by `landed` or `abandoned`, `release`
        waits for it. Bytes may only go into those runs. Raises MessageRejected (counted)."""
        with self._lock:
            live = self._admit(header, header.nbytes)
            live.writers += 1
            live.state = TransferState.TRANSFERRING
            if live.first_page_at is None:
                live.first_page_at = time.monotonic()
        blocks = live.ticket.block_ids[header.page_start:header.page_start + header.num_pages]
        return Landing(self, live, header, blocks, layout.pool_runs(live.pool, blocks))

    def _landed(self, landing: Landing, error: str | None, reason_class: str = "checksum") -> None:
        """Close a landing: its pages count as received, or (`error`) the ticket fails."""
        live, header = landing.live, landing.header
        with self._lock:
            live.writers -= 1
            if error is not None:
                if live.state is not TransferState.FAILED:
                    self._fail(live, error)
                raise self._reject(reason_class, error)
            live.pages_received[header.layer].update(range(header.page_start, header.page_start + header.num_pages))
            live.bytes_received += header.nbytes
            self.bytes_received += header.nbytes

    def accept_done(self, done: TransferDone) -> None:
        """The sender says it sent everything: succeed if every page of every layer is
        here. Otherwise the transfer fails and MessageRejected tells the sender why; it is
        also raised for a foreign message."""
        with self._lock:
            live = self._check_ticket(done.ticket_id, done.secret, done.request_id)
            # Whether the request asked for prompt logprobs is the decode side's to check:
            # here, none, or one per prompt token after the first.
            num_prompt_logprobs = live.ticket.num_prompt_tokens - 1 if done.prompt_logprobs else 0
            problem = first_token_problem(done, self.vocab_size, MAX_LOGPROBS, num_prompt_logprobs, MAX_LOGPROBS)
            if problem is not None:
                reason = f"unusable first token: {problem}"
                self._fail(live, reason)
                raise self._reject("bad_token", reason)
            expected = set(range(len(live.ticket.block_ids)))
            missing = [i for i, got in enumerate(live.pages_received) if got != expected]
            if missing or live.writers:
                reason = f"transfer declared done with layers {missing[:4]} incomplete"
                self._fail(live, reason)
                raise self._reject("incomplete", reason)
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
    # All called under _lock.

    def _admit(self, header: PagesHeader, nbytes: int) -> _Live:
        live = self._check_ticket(header.ticket_id, header.secret, header.request_id)
        try:
            self._check_chunk(live.ticket, header, nbytes)
        except MessageRejected as exc:
            # The sender holds the secret, so it is ours and broken: the transfer
            # cannot complete, and failing it now lets decode recover at once.
            self._fail(live, str(exc))
            raise
        return live

    def _check_ticket(self, ticket_id: int, secret: bytes, request_id: str) -> _Live:
        live = self._live.get(ticket_id)
        if live is None:
            raise self._reject("unknown_ticket", f"no live ticket {ticket_id}")
        if not hmac.compare_digest(live.ticket.secret, secret) or live.ticket.request_id != request_id:
            raise self._reject("bad_secret", f"wrong secret or request id for ticket {ticket_id}")
        if live.state in (TransferState.SUCCEEDED, TransferState.FAILED):
            raise self._reject("settled_ticket", f"ticket {ticket_id} is already {live.state.value}")
        if time.time() > live.ticket.deadline:
            self._fail(live, f"deadline exceeded after {live.bytes_received} bytes")
            raise self._reject("expired", f"ticket {ticket_id} is past its deadline")
        return live

    def _check_chunk(self, ticket: KVTicket, header: PagesHeader, nbytes: int) -> None:
        if not 0 <= header.layer < self.layout.num_layers:
            raise self._reject("out_of_bounds", f"layer {header.layer} out of range [0, {self.layout.num_layers})")
        if header.num_pages <= 0 or header.page_start < 0 or \
                header.page_start + header.num_pages > len(ticket.block_ids):
            raise self._reject("out_of_bounds", f"pages [{header.page_start}, {header.page_start + header.num_pages}) "
                               f"outside the ticket's {len(ticket.block_ids)} pages")
        if header.dtype != self.layout.dtype:
            raise self._reject("bad_layout", f"dtype {header.dtype} != pool dtype {self.layout.dtype}")
        if tuple(header.shape) != layout.chunk_shape(self.layout, header.num_pages):
            raise self._reject("bad_layout", f"shape {tuple(header.shape)} != "
                               f"{layout.chunk_shape(self.layout, header.num_pages)}")
        if header.scale_dtype != self.layout.scale_dtype:
            raise self._reject("bad_layout", f"scale dtype {header.scale_dtype or 'none'} != the pool's "
                               f"{self.layout.scale_dtype or 'none'} (KV cache dtype {self.layout.dtype})")
        if tuple(header.scale_shape) != layout.scale_shape(self.layout, header.num_pages):
            raise self._reject("bad_layout", f"scale shape {tuple(header.scale_shape)} != "
                               f"{layout.scale_shape(self.layout, header.num_pages)}")
        expected = layout.chunk_nbytes(self.layout, header.num_pages)
        if header.nbytes != expected or nbytes != expected:
            raise self._reject("bad_layout", f"payload of {nbytes} bytes (header {header.nbytes}); "
                               f"expected {expected}")

    def _reject(self, reason_class: str, reason: str) -> MessageRejected:
        self.rejected[reason_class] += 1
        return MessageRejected(reason)

    @staticmethod
    def _fail(live: _Live, reason: str) -> None:
        live.state, live.reason = TransferState.FAILED, reason
