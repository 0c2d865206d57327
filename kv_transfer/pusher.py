"""`KVPusher`: the prefill side's sender. Ships pages of live tickets from a thread.

The prefill engine copies each layer's pages out of its pool as soon as the layer is done
(`push`, on the engine thread), then calls `finish` with the first token, or `abort`. One
thread drains the queue in order and hands the copies to the ticket's channel, so the
forward pass of later layers overlaps with sending earlier ones.

A ticket's state, as the engine polls it:

    SENDING --finish sent and accepted--> SENT
       \\--rejected, link failed or aborted--> FAILED(reason)

Invariant the engine relies on: the thread never reads the pool, so the engine may free or
reuse a request's blocks as soon as `push` has returned.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.kv_transfer import layout
from pdserve.kv_transfer.messages import KVTicket, MessageRejected, PagesHeader, TransferAbort, TransferDone
from pdserve.kv_transfer.transports.base import KVChannel, TransportError
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


class KVPusher:
    def __init__(self, pool: KVPool, connect: Callable[[str], KVChannel]) -> None:
        self.pool = pool
        self._connect = connect
        self._channels: dict[str, KVChannel] = {}  # pusher thread only
        self._tickets: dict[int, _Outgoing] = {}
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.bytes_sent = 0
        self.send_seconds = 0.0  # time the thread spent in chunk sends (incl. the receiver's checks)
        self._thread = threading.Thread(target=self._run, name="pdserve-kv-pusher", daemon=True)
        self._thread.start()

    def start(self, ticket: KVTicket, address: str) -> None:
        with self._lock:
            self._tickets[ticket.ticket_id] = _Outgoing(ticket, address)

    def push(self, ticket_id: int, layer: int, page_start: int, block_ids: Sequence[int]) -> None:
        """Copy layer `layer` of this pool's `block_ids` now and send them as ticket pages
        [page_start, page_start + len(block_ids)) from the thread."""
        pages = layout.read_pages(self.pool, layer, block_ids)
        self._queue.put(("push", ticket_id, layer, page_start, pages))

    def finish(self, ticket_id: int, done: TransferDone) -> None:
        self._queue.put(("done", ticket_id, done))

    def abort(self, ticket_id: int, reason: str) -> None:
        """Stop sending; tell the receiver (best effort). The ticket becomes FAILED."""
        self._queue.put(("abort", ticket_id, reason))

    def poll(self, ticket_id: int) -> tuple[SendState, str]:
        with self._lock:
            outgoing = self._tickets[ticket_id]
            return outgoing.state, outgoing.reason

    def forget(self, ticket_id: int) -> None:
        """Drop a SENT or FAILED ticket's record."""
        with self._lock:
            self._tickets.pop(ticket_id, None)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        for channel in self._channels.values():
            channel.close()

    # ------------------------------------------------------------------ pusher thread

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, ticket_id, *rest = item
            with self._lock:
                outgoing = self._tickets.get(ticket_id)
            if outgoing is None or outgoing.state is not SendState.SENDING:
                continue  # aborted or failed earlier: drop the rest of its work
            try:
                channel = self._channel(outgoing.address)
                if kind == "push":
                    self._send_pages(channel, outgoing, *rest)
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
                    pages) -> None:
        ticket = outgoing.ticket
        payload = layout.to_bytes(pages)
        header = PagesHeader(
            request_id=ticket.request_id, ticket_id=ticket.ticket_id, secret=ticket.secret,
            layer=layer, page_start=page_start, num_pages=pages.shape[1],
            dtype=layout.dtype_name(pages.dtype), shape=tuple(pages.shape),
            nbytes=len(payload), checksum=layout.checksum(payload),
        )
        started = time.perf_counter()
        channel.send_pages(header, payload)
        self.send_seconds += time.perf_counter() - started
        outgoing.bytes_sent += len(payload)
        self.bytes_sent += len(payload)

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
