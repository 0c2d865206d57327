"""`KVPusher`: the prefill side's sender. Ships pages of live tickets from a thread.

The prefill engine pushes each layer's pages as soon as the layer is done (`push`, on the
engine thread), then calls `finish` with the first token, or `abort`. One thread drains the
queue in order and hands them to the ticket's channel, so the forward pass of later layers
overlaps with sending earlier ones. For a transport that reads the pool itself
(`reads_pool`: nixl and gloo from host memory, nccl from GPU memory), `push` only queues the
block ids and the channel moves the pages out of the pool; for the others, `push` copies
the pages first.

Each `start` names a send by an id of this pusher's own (`send_id`): ticket ids are only
unique per decode worker, and a migrated request may be pushed again before its first
push settled. A send's state, as the engine polls it:

    SENDING --finish sent and accepted--> SENT
       \\--rejected, link failed or aborted--> FAILED(reason)

Invariant the engine relies on: for a send that does not `holds_pages`, the thread never
reads the pool, so the engine may free or reuse its blocks as soon as `push` has returned.
For one that does, the engine keeps every block it pushed unchanged and allocated until the
send is SENT or FAILED (the thread settles a send only between chunks, and skips a settled
send's queued work). Chunks go out without waiting for their verdicts (`wait=False`): a send
settles SENT only after its done's verdict, which follows every chunk's; if it settles
FAILED with chunks still in flight, the decode side may yet read those pages after the
engine reused them, into a ticket that can no longer succeed (no done follows a FAILED
send) and against the checksum taken when the layer was pushed.
"""

from __future__ import annotations

import enum
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pdserve.kv_transfer import layout
from pdserve.kv_transfer.messages import KVTicket, MessageRejected, TransferAbort, TransferDone
from pdserve.kv_transfer.transports.base import KVChannel, TransportError, reads_pool
from pdserve.runtime.kv_pool import KVPool

log = logging.getLogger(__name__)


class SendState(enum.Enum):
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


@dataclass
class _Outgoing:
    ticket: KVTicket
    address: str
    state: SendState = SendState.SENDING
    reason: str = ""
    bytes_sent: int = 0
    reads_pool: bool = False  # its channel reads the pool in place (see the module docstring)


class KVPusher:
    def __init__(self, pool: KVPool, connect: Callable[[str], KVChannel]) -> None:
        self.pool = pool
        self.layout = layout.layout_of(pool)
        self._connect = connect
        self._channels: dict[str, KVChannel] = {}  # pusher thread only
        self._sends: dict[int, _Outgoing] = {}  # send id -> its state, under _lock
        self._send_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.bytes_sent = 0
        self.send_seconds = 0.0  # time the thread spent in chunk sends (incl. the receiver's checks)
        self._thread = threading.Thread(target=self._run, name="pdserve-kv-pusher", daemon=True)
        self._thread.start()

    def start(self, ticket: KVTicket, address: str) -> int:
        """Begin sending `ticket`'s pages to the listener at `address`; the send's id."""
        in_place = reads_pool(address, self.pool.kv.device.type)
        with self._lock:
            send_id = next(self._send_ids)
            self._sends[send_id] = _Outgoing(ticket, address, reads_pool=in_place)
        return send_id

    def holds_pages(self, send_id: int) -> bool:
        """Whether the send's pages are read from the pool by the thread: the engine must
        then keep every block it pushed until the send settles."""
        with self._lock:
            return self._sends[send_id].reads_pool

    def push(self, send_id: int, layer: int, page_start: int, block_ids: Sequence[int]) -> None:
        """Send layer `layer` of this pool's `block_ids` as ticket pages [page_start,
        page_start + len(block_ids)) from the thread: copied now, unless the send
        `holds_pages`."""
        if self.holds_pages(send_id):
            if self.pool.kv.device.type == "cpu":
                # Hashed here, while the layer just computed is still in the cache (a 1k-token
                # layer is 1.5 MB for SmolLM2): from memory the hash reads at ~7 GB/s on the VM.
                checksum, ready = layout.checksum_pages(self.pool, layer, block_ids), None
            else:
                # On a GPU the channel hashes the pages where they lie, once the work this
                # thread queued so far (the layer's compute) is done: `ready` marks that point.
                checksum, ready = None, torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.pool.kv.device))
            self._queue.put(("push_pool", send_id, layer, page_start, tuple(block_ids), checksum, ready))
        else:
            pages = layout.read_pages(self.pool, layer, block_ids)
            self._queue.put(("push", send_id, layer, page_start, len(block_ids), pages))

    def finish(self, send_id: int, done: TransferDone) -> None:
        self._queue.put(("done", send_id, done))

    def abort(self, send_id: int, reason: str) -> None:
        """Stop sending; tell the receiver (best effort). The send becomes FAILED."""
        self._queue.put(("abort", send_id, reason))

    def poll(self, send_id: int) -> tuple[SendState, str]:
        with self._lock:
            outgoing = self._sends[send_id]
            return outgoing.state, outgoing.reason

    def bytes_sent_for(self, send_id: int) -> int:
        """Payload bytes of the send's chunks that went on the link so far."""
        with self._lock:
            return self._sends[send_id].bytes_sent

    def forget(self, send_id: int) -> None:
        """Drop a SENT or FAILED send's record."""
        with self._lock:
            self._sends.pop(send_id, None)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        for channel in self._channels.values():
            channel.close()

    # ------------------------------------------------------------------ pusher thread

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, send_id, *rest = item
            with self._lock:
                outgoing = self._sends.get(send_id)
            if outgoing is None or outgoing.state is not SendState.SENDING:
                continue  # aborted or failed earlier: drop the rest of its work
            try:
                channel = self._channel(outgoing.address)
                if kind == "push":
                    self._send_pages(channel, outgoing, *rest)
                elif kind == "push_pool":
                    self._send_pool_pages(channel, outgoing, *rest)
                elif kind == "done":
                    channel.send_done(rest[0])
                    self._settle(outgoing, SendState.SENT, "")
                else:
                    self._settle(outgoing, SendState.FAILED, f"aborted: {rest[0]}")
                    ticket = outgoing.ticket
                    channel.send_abort(TransferAbort(ticket.request_id, ticket.ticket_id, ticket.secret, rest[0]))
            except MessageRejected as exc:
                self._settle(outgoing, SendState.FAILED, f"rejected by the decode worker: {exc}")
            except TransportError as exc:
                self._settle(outgoing, SendState.FAILED, f"link to {outgoing.address} failed: {exc}")
                self._drop_channel(outgoing.address)
            except Exception as exc:  # never let the thread die: fail the ticket, keep serving
                log.exception("KV push failed")
                self._settle(outgoing, SendState.FAILED, f"{type(exc).__name__}: {exc}")

    def _send_pages(self, channel: KVChannel, outgoing: _Outgoing, layer: int, page_start: int,
                    num_pages: int, pages) -> None:
        payload = layout.to_bytes(pages)
        # Described as this pool lays them out: the receiver refuses a layout not its own.
        header = layout.pages_header(outgoing.ticket, self.layout, layer, page_start, num_pages,
                                     layout.checksum(payload))
        started = time.perf_counter()
        channel.send_pages(header, payload, wait=False)  # a refusal raises from a later call
        self.send_seconds += time.perf_counter() - started
        outgoing.bytes_sent += len(payload)
        self.bytes_sent += len(payload)

    def _send_pool_pages(self, channel: KVChannel, outgoing: _Outgoing, layer: int, page_start: int,
                         block_ids: tuple[int, ...], checksum: int | None, ready) -> None:
        header = layout.pages_header(outgoing.ticket, self.layout, layer, page_start, len(block_ids), checksum)
        nbytes = header.nbytes
        started = time.perf_counter()
        if ready is not None:  # a CUDA event: the channel's reads queue after it
            torch.cuda.current_stream(self.pool.kv.device).wait_event(ready)
        channel.send_pool_pages(header, self.pool, block_ids, wait=False)
        self.send_seconds += time.perf_counter() - started
        outgoing.bytes_sent += nbytes
        self.bytes_sent += nbytes

    def _settle(self, outgoing: _Outgoing, state: SendState, reason: str) -> None:
        with self._lock:
            outgoing.state, outgoing.reason = state, reason

    def _channel(self, address: str) -> KVChannel:
        if address not in self._channels:
            self._channels[address] = self._connect(address)
        return self._channels[address]

    def _drop_channel(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            try:
                channel.close()
            except (OSError, RuntimeError) as exc:  # a broken link may fail to close; it is gone anyway
                log.debug("closing the link to %s failed: %s", address, exc)
