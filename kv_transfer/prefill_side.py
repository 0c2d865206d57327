"""The prefill side of the hop: jobs whose prompt KV this worker pushes to a decode worker.

The prefill engine only reports progress; this module decides what to send:

    start(job)                       the pusher learns the ticket and where to send
    computed(request_id, table, n)   prompt tokens [0, n) are computed -> the pages to send
    push_layer(layer, sends)         those pages are ready at `layer` (during the forward)
    prefilled(request_id, token...)  the prompt is done: TransferDone with the first token
                                     (and the prompt logprobs, when asked for)
    settle()                         transfers the decode worker accepted or that failed

Page cursor. The destination holds the ticket's pages [first_page, ...). A chunk ending at
token `end` sends the pages it completed, [next_page, end // block_size); the prompt's last
chunk also sends its partial last page. A page is sent once, when no later chunk can
change it, so a transport may read it out of the pool while the next chunk computes.

    tokens   |=========== chunk 1 ===========|==== chunk 2 (last) ====|
    pages    [  p0  ][  p1  ][  p2  ][  p3 ..        ][  p4  ][ p5.. ]
    sent     ^ chunk 1: p0..p2                ^ chunk 2: p3..p5

Held pages. When the ticket's channel reads the pool in place (`KVPusher.holds_pages`), each
send is `held`: the engine keeps those blocks allocated until the job settles, when
`JobOutcome.held_blocks` gives them back.

Keys. A job is named by its pusher send id (`job_id`), never by its ticket id (unique only
per decode worker) nor its request id: a migrated request may come back for a second
prefill while the first one's aborted transfer is still settling. At most one job per
request id is computing (the scheduler's key).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from pdserve.kv_transfer.messages import TRACEPARENT_CHARS, PrefillJob, TransferDone
from pdserve.kv_transfer.pusher import KVPusher, SendState
from pdserve.runtime.request import PromptLogprob


class PageSend(NamedTuple):
    """Pages of one ticket to push at every layer of this step's forward."""

    job_id: int
    page_start: int  # ticket-relative
    block_ids: list[int]  # this pool's blocks holding them
    held: bool = False  # the engine must hold these blocks until the job settles


class JobOutcome(NamedTuple):
    job_id: int
    request_id: str
    ok: bool
    reason: str  # why it failed; "" when ok
    held_blocks: tuple[int, ...] = ()  # blocks the engine held for the transfer: release them now
    kv_bytes: int = 0  # payload bytes sent for it


@dataclass
class _Job:
    job: PrefillJob
    job_id: int  # its pusher send id
    next_page: int  # absolute page index of the first page not yet sent
    held_blocks: list[int] = field(default_factory=list)


class _Sending(NamedTuple):
    request_id: str
    held_blocks: tuple[int, ...]
    computed_at: float  # time.monotonic() when it stopped computing (prefilled, aborted, failed)


class PrefillJobs:
    """Jobs being computed, then being sent until the decode worker settles them. Engine
    thread only."""

    def __init__(self, pusher: KVPusher, block_size: int) -> None:
        self.pusher = pusher
        self.block_size = block_size
        self._computing: dict[str, _Job] = {}  # request id -> its job being computed
        self._sending: dict[int, _Sending] = {}  # job id -> a job computed (or stopped), until settled
        self.outcome_counts: Counter[str] = Counter()  # settled transfers: "sent" or "failed"
        # Over the "sent" ones: seconds from the prompt's last step to the decode worker's
        # acceptance, what layer-by-layer sending did not hide (the hop's own cost).
        self.sent_tail_seconds = 0.0

    @property
    def has_sending(self) -> bool:
        return bool(self._sending)

    def is_computing(self, request_id: str) -> bool:
        return request_id in self._computing

    def computing_job(self, request_id: str) -> int | None:
        """The id of the request's job being computed, if one is."""
        job = self._computing.get(request_id)
        return job.job_id if job is not None else None

    def start(self, job: PrefillJob) -> int:
        """Begin a job; its id. Raises ValueError if a job for its request is computing."""
        request_id = job.ticket.request_id
        if request_id in self._computing:
            raise ValueError(f"a prefill job for request {request_id} is already computing here")
        job_id = self.pusher.start(job.ticket, job.address)
        self._computing[request_id] = _Job(job, job_id, job.ticket.first_page)
        return job_id

    def computed(self, request_id: str, block_table: Sequence[int], end: int) -> PageSend | None:
        """Prompt tokens [0, end) of the job are computed (or will be, by the forward about
        to run): the pages to push for them, or None when no page is due. A `held` send's
        blocks must stay allocated and unchanged until the job settles."""
        job = self._computing[request_id]
        ticket = job.job.ticket
        last_chunk = end >= ticket.num_prompt_tokens
        first = job.next_page
        last = -(-end // self.block_size) if last_chunk else end // self.block_size  # absolute [first, last)
        if last <= first:
            return None
        job.next_page = last
        blocks = list(block_table[first:last])
        held = self.pusher.holds_pages(job.job_id)
        if held:
            job.held_blocks.extend(blocks)
        return PageSend(job.job_id, first - ticket.first_page, blocks, held)

    def push_layer(self, layer: int, sends: Sequence[PageSend]) -> None:
        """Layer `layer` of every send is computed: copy and queue it now."""
        for send in sends:
            self.pusher.push(send.job_id, layer, send.page_start, send.block_ids)

    def prefilled(self, request_id: str, first_token: int, logprob: float,
                  top_logprobs: tuple[tuple[int, float], ...],
                  prompt_logprobs: tuple[PromptLogprob, ...] = ()) -> None:
        """The prompt is complete and its first token sampled: every page was pushed;
        tell the decode worker, and wait for its verdict. `prompt_logprobs`: one per prompt
        token after the first when the request asked for them, else empty."""
        job = self._computing[request_id]
        ticket = job.job.ticket
        traceparent = job.job.traceparent if len(job.job.traceparent) <= TRACEPARENT_CHARS else ""
        self.pusher.finish(job.job_id, TransferDone(
            ticket.request_id, ticket.ticket_id, ticket.secret, first_token, logprob, top_logprobs,
            prompt_logprobs, traceparent))
        self._stop_computing(job)

    def abort(self, request_id: str, reason: str) -> bool:
        """Stop the request's transfers and tell the decode worker (best effort). False if
        no job of the request is unsettled."""
        job = self._computing.get(request_id)
        if job is not None:
            self._stop_computing(job)
        unsettled = [job_id for job_id, sending in self._sending.items() if sending.request_id == request_id]
        for job_id in unsettled:
            self.pusher.abort(job_id, reason)
        return bool(unsettled)

    def stop_failed(self) -> list[str]:
        """Jobs still computing whose transfer failed (decode refused, link down): they
        stop here; the caller ends their requests."""
        failed = [job for job in self._computing.values() if self.pusher.poll(job.job_id)[0] is SendState.FAILED]
        for job in failed:
            self._stop_computing(job)
        return [job.job.ticket.request_id for job in failed]

    def settled(self) -> list[JobOutcome]:
        """Transfers the decode worker accepted, or that failed, since the last call."""
        outcomes = []
        for job_id, sending in list(self._sending.items()):
            state, reason = self.pusher.poll(job_id)
            if state is not SendState.SENDING:
                del self._sending[job_id]
                kv_bytes = self.pusher.bytes_sent_for(job_id)
                self.pusher.forget(job_id)
                outcomes.append(JobOutcome(job_id, sending.request_id, state is SendState.SENT, reason,
                                           sending.held_blocks, kv_bytes))
                self.outcome_counts["sent" if state is SendState.SENT else "failed"] += 1
                if state is SendState.SENT:
                    self.sent_tail_seconds += time.monotonic() - sending.computed_at
        return outcomes

    def _stop_computing(self, job: _Job) -> None:
        request_id = job.job.ticket.request_id
        del self._computing[request_id]
        self._sending[job.job_id] = _Sending(request_id, tuple(job.held_blocks), time.monotonic())
