"""The decode side of the hop: remote requests, whose prompt KV a prefill worker computes.

    add      -> scheduler.reserve_remote (decode first: blocks before any prefill work)
                -> receiver.issue -> KVTicket for the prefill worker; a request whose
                prompt logprobs could not ride a TransferDone is left to local prefill
    poll     -> each step: expire tickets past their deadline; a SUCCEEDED transfer starts
                decoding with the first token the prefill worker sampled
                (scheduler.start_remote) once that token, its logprobs and the prompt
                logprobs are in range for the model and the request (the prompt logprobs
                go to the request); a FAILED one, or one whose first token is
                unusable, is prefilled here (policy RECOMPUTE, the default:
                scheduler.fall_back_to_local) or ends with ERROR
    fail     -> the prefill side gave up: the transfer fails now, settled at the next poll
    abort    -> the ticket is refused from then on and the blocks are free at once

The scheduler keeps the request's state machine; this module only decides, from the
receiver's verdict, which transition to take. Outcomes are counted in `counts` (the
`pdserve_worker_transfer_outcomes` metric reads them).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, NamedTuple

from pdserve.kv_transfer.messages import (
    MAX_DONE_BYTES,
    KVTicket,
    TransferDone,
    done_bytes_bound,
    first_token_problem,
)
from pdserve.kv_transfer.receiver import KVReceiver, TransferState
from pdserve.runtime.request import Request, TokenDelta
from pdserve.runtime.stopping import FinishReason

if TYPE_CHECKING:  # the engine's; worker specs read this module's policy without it
    from pdserve.runtime.scheduler import BatchScheduler

log = logging.getLogger(__name__)


class OnTransferFailure(enum.Enum):
    RECOMPUTE = "recompute"  # prefill the prompt on this decode worker instead
    FAIL = "fail"  # end the request with finish reason "error" and the transfer's reason


class Started(NamedTuple):
    """A remote request whose KV arrived: it is RUNNING with its first token appended."""

    request: Request
    done: TransferDone  # the prefill worker's message: first token, its logprobs
    kv_wait_seconds: float  # ticket issued .. transfer settled


class RemoteRequests:
    def __init__(self, scheduler: BatchScheduler, receiver: KVReceiver,
                 on_failure: OnTransferFailure = OnTransferFailure.RECOMPUTE,
                 timeout: float = 30.0) -> None:
        self.scheduler = scheduler
        self.receiver = receiver
        self.on_failure = on_failure
        self.timeout = timeout
        self._tickets: dict[str, int] = {}  # request id -> ticket id, while WAITING_FOR_KV
        self._issued_at: dict[str, float] = {}  # request id -> when its ticket was issued
        self.total_kv_wait_seconds = 0.0  # ticket issued .. transfer settled, summed
        # first page received .. transfer settled, summed over transfers that got a page:
        # the transfer itself (overlapping the prefill's later layers and chunks)
        self.total_receive_seconds = 0.0
        self.counts: Counter[str] = Counter()
        self.failure_reasons: dict[str, str] = {}  # request id -> last transfer failure

    def add(self, request: Request) -> KVTicket | None:
        """Reserve blocks and issue a ticket, or None when the pool cannot hold the
        request now, or when its prompt logprobs would make the TransferDone larger than a
        transport may carry (nothing is held then; the caller may retry or prefill locally)."""
        if not _done_fits_the_hop(request):
            self.counts["prompt_logprobs_too_large"] += 1
            return None
        if not self.scheduler.reserve_remote(request):
            self.counts["no_room"] += 1
            return None
        first_page = request.num_computed_tokens // self.scheduler.block_size
        ticket = self.receiver.issue(request.request_id, request.block_table[first_page:],
                                     first_page, request.num_prompt_tokens, self.timeout)
        self._tickets[request.request_id] = ticket.ticket_id
        self._issued_at[request.request_id] = time.monotonic()
        return ticket

    def fail(self, request_id: str, reason: str) -> None:
        """The prefill side gave up on this request's transfer (its worker died or
        refused the job): settle it at the next poll, per policy, instead of at its
        deadline. A no-op for a request that is not waiting for KV."""
        ticket_id = self._tickets.get(request_id)
        if ticket_id is not None:
            self.receiver.abort(ticket_id, reason)

    def abort(self, request_id: str) -> None:
        """The request ends (cancelled): refuse its ticket from now on and wait out
        in-flight writes, so its blocks may be freed as soon as this returns."""
        ticket_id = self._tickets.pop(request_id, None)
        self._issued_at.pop(request_id, None)
        if ticket_id is not None:
            self.receiver.abort(ticket_id, "request cancelled by the decode side")
            self.receiver.release(ticket_id)
            self.counts["aborted"] += 1

    def poll(self) -> tuple[list[Started], list[TokenDelta]]:
        """Settle finished transfers. Returns the requests that start decoding and the
        final deltas of those that ended with an error."""
        self.receiver.expire()
        started, failed = [], []
        for request_id, ticket_id in list(self._tickets.items()):
            status = self.receiver.poll(ticket_id)
            if status.state not in (TransferState.SUCCEEDED, TransferState.FAILED):
                continue
            del self._tickets[request_id]
            self.receiver.release(ticket_id)
            now = time.monotonic()
            waited = now - self._issued_at.pop(request_id)
            self.total_kv_wait_seconds += waited
            if status.first_page_at is not None:
                self.total_receive_seconds += now - status.first_page_at
            reason = status.reason
            if status.state is TransferState.SUCCEEDED:
                reason = self._unusable(request_id, status.done)
                if reason is None:
                    request = self.scheduler.start_remote(request_id, status.done.first_token)
                    request.record_prompt_logprobs(0, status.done.prompt_logprobs)
                    started.append(Started(request, status.done, waited))
                    self.counts["succeeded"] += 1
                    continue
            self.failure_reasons[request_id] = reason
            trace = status.done.traceparent if status.done is not None else ""
            log.info("request %s: its KV transfer failed (%s)%s; on failure: %s", request_id, reason,
                     f", trace {trace}" if trace else "", self.on_failure.value)
            delta = self._settle_failure(request_id)
            if delta is not None:
                failed.append(delta)
        return started, failed

    def _unusable(self, request_id: str, done: TransferDone) -> str | None:
        """Why the engine must not start from `done` (a token id outside the vocabulary,
        more top logprobs than the request asked for, a logprob that is not one, prompt
        logprobs it did not ask for or not one per prompt token after the first); None if
        it may. The receiver has checked the vocabulary already when it knows it; this
        check also knows the request."""
        request = self.scheduler.waiting_for_kv[request_id]
        params = request.params
        num_prompt_logprobs = request.num_prompt_tokens - 1 if request.wants_prompt_logprobs else 0
        problem = first_token_problem(done, self.receiver.vocab_size, params.logprobs or 0,
                                      num_prompt_logprobs, params.prompt_logprobs or 0)
        if problem is None:
            return None
        self.receiver.count_rejection("bad_token")
        return f"the prefill worker's first token is unusable: {problem}"

    def _settle_failure(self, request_id: str) -> TokenDelta | None:
        if self.on_failure is OnTransferFailure.RECOMPUTE:
            self.scheduler.fall_back_to_local(request_id)
            self.counts["failed_recomputed"] += 1
            return None
        request = self.scheduler.finish(request_id, FinishReason.ERROR)
        self.counts["failed"] += 1
        return TokenDelta(request_id, (), (), None, FinishReason.ERROR, request.num_prompt_tokens,
                          request.num_cached_tokens)


def _done_fits_the_hop(request: Request) -> bool:
    """Whether every transport carries the request's TransferDone, with the prompt logprobs
    it wants (`MAX_DONE_BYTES`)."""
    if not request.wants_prompt_logprobs:
        return True
    bound = done_bytes_bound(request.request_id, request.num_prompt_tokens - 1, request.params.prompt_logprobs)
    return bound <= MAX_DONE_BYTES
