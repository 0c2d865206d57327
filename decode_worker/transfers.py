"""Remote admission: requests whose prompt KV is computed by a prefill worker.

    submit   -> scheduler.reserve_for_transfer (decode first: blocks before any prefill
                work) -> receiver.issue -> KVTicket for the prefill worker
    poll     -> each step: fail tickets past their deadline; a SUCCEEDED ticket starts
                decoding with the first token the prefill worker sampled; a FAILED one
                is recomputed here (policy RECOMPUTE, the default) or ends with ERROR
    abort    -> the ticket is refused from then on and the blocks are free at once

Outcomes are counted in `counts` (the metrics read them).
"""

from __future__ import annotations

import enum
import time
from collections import Counter

from pdserve.decode_worker.scheduler import DecodeScheduler
from pdserve.kv_transfer.messages import KVTicket, TransferDone
from pdserve.kv_transfer.receiver import KVReceiver, TransferState
from pdserve.runtime.request import Request, TokenChunk
from pdserve.runtime.stopping import FinishReason


class OnTransferFailure(enum.Enum):
    RECOMPUTE = "recompute"  # prefill the prompt on this decode worker instead
    FAIL = "fail"  # end the request with finish reason "error" and the transfer's reason


class RemoteAdmission:
    def __init__(self, scheduler: DecodeScheduler, receiver: KVReceiver,
                 on_failure: OnTransferFailure = OnTransferFailure.RECOMPUTE,
                 timeout: float = 30.0) -> None:
        self.scheduler = scheduler
        self.receiver = receiver
        self.on_failure = on_failure
        self.timeout = timeout
        self._tickets: dict[str, int] = {}  # request id -> ticket id, while WAITING_FOR_KV
        self._issued_at: dict[str, float] = {}  # request id -> when its ticket was issued
        self.total_kv_wait_seconds = 0.0  # ticket issued .. transfer settled, summed
        self.counts: Counter[str] = Counter()
        self.failure_reasons: dict[str, str] = {}  # request id -> last transfer failure

    def submit(self, request: Request) -> KVTicket | None:
        """Reserve blocks and issue a ticket, or None when the pool cannot hold the
        request now (nothing is held then; the caller may retry or prefill locally)."""
        if not self.scheduler.reserve_for_transfer(request):
            self.counts["no_room"] += 1
            return None
        bs = self.scheduler.block_size
        first_page = request.num_computed_tokens // bs
        ticket = self.receiver.issue(request.request_id, request.block_table[first_page:],
                                     first_page, request.num_prompt_tokens, self.timeout)
        self._tickets[request.request_id] = ticket.ticket_id
        self._issued_at[request.request_id] = time.monotonic()
        return ticket

    def fail(self, request_id: str, reason: str) -> None:
        """The prefill side gave up on this request's transfer (its worker died or
        refused the job): settle it now, per policy, instead of at its deadline."""
        ticket_id = self._tickets.get(request_id)
        if ticket_id is not None:
            self.receiver.abort(ticket_id, reason)

    def abort(self, request_id: str) -> None:
        ticket_id = self._tickets.pop(request_id, None)
        self._issued_at.pop(request_id, None)
        if ticket_id is not None:
            self.receiver.abort(ticket_id, "request cancelled by the decode side")
            self.receiver.release(ticket_id)  # waits out in-flight writes to its blocks
            self.counts["aborted"] += 1

    def poll(self) -> tuple[list[tuple[Request, TransferDone, float]], list[TokenChunk]]:
        """Settle finished transfers. Returns (requests that start decoding, with their
        first token appended, the prefill worker's message about it and the seconds since
        the ticket was issued; chunks for requests that ended with an error)."""
        self.receiver.expire()
        started, failed = [], []
        for request_id, ticket_id in list(self._tickets.items()):
            status = self.receiver.poll(ticket_id)
            if status.state in (TransferState.SUCCEEDED, TransferState.FAILED):
                waited = time.monotonic() - self._issued_at.pop(request_id)
                self.total_kv_wait_seconds += waited
            if status.state is TransferState.SUCCEEDED:
                del self._tickets[request_id]
                self.receiver.release(ticket_id)
                request = self.scheduler.complete_transfer(request_id, status.done.first_token)
                started.append((request, status.done, waited))
                self.counts["succeeded"] += 1
            elif status.state is TransferState.FAILED:
                del self._tickets[request_id]
                self.receiver.release(ticket_id)
                self.failure_reasons[request_id] = status.reason
                if self.on_failure is OnTransferFailure.RECOMPUTE:
                    self.scheduler.fall_back_to_local(request_id)
                    self.counts["failed_recomputed"] += 1
                else:
                    request = self.scheduler.finish(request_id, FinishReason.ERROR)
                    failed.append(TokenChunk(request_id, (), (), None, FinishReason.ERROR,
                                             request.num_prompt_tokens, request.num_cached_tokens))
                    self.counts["failed"] += 1
        return started, failed
