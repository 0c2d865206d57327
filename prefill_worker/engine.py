"""`PrefillEngine`: computes prompts' KV and pushes it, layer by layer, to decode workers.

One step: the shared batch scheduler picks prompt chunks under the token budget (its own
radix cache skips prefixes this worker computed before); the forward pass runs, and as
each layer finishes, the pages of that layer that some ticket wants are copied out and
queued for sending while the later layers compute. A job whose prompt is complete samples
its first token and sends TransferDone; its blocks go back at once (its pages stay in the
radix cache for later prompts).

Pages sent for a ticket whose destination holds pages [first_page, ...): after a chunk
ending at token `end`, pages [next_page, ceil(end / block_size)) are sent, then next_page
= end // block_size; the page holding `end` is partial and is sent again, complete, with
the next chunk.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from pdserve.kv_transfer.layout import layout_of
from pdserve.kv_transfer.messages import KVTicket, TransferDone
from pdserve.kv_transfer.pusher import KVPusher, SendState
from pdserve.runtime.config import RuntimeInfo, SchedulerConfig
from pdserve.runtime.model_runner import ModelRunner
from pdserve.runtime.request import Request
from pdserve.runtime.sampler import Sampler, make_generator
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.scheduler import BatchScheduler, ScheduledChunk, build_forward_batch
from pdserve.runtime.stopping import FinishReason


class PrefillJob(NamedTuple):
    """Compute `prompt_ids` and ship its KV for `ticket` to the listener at `address`."""

    ticket: KVTicket
    address: str
    prompt_ids: list[int]
    params: SamplingParams


class JobOutcome(NamedTuple):
    request_id: str
    ok: bool
    reason: str  # why it failed; "" when ok


@dataclass
class _Job:
    job: PrefillJob
    next_page: int  # absolute page index of the first page not yet sent in full


class PrefillEngine:
    def __init__(self, runner: ModelRunner, info: RuntimeInfo, pusher: KVPusher,
                 config: SchedulerConfig | None = None, enable_prefix_caching: bool = True) -> None:
        self.runner = runner
        self.info = info
        self.pusher = pusher
        self.scheduler = BatchScheduler(config or SchedulerConfig(), info, enable_prefix_caching)
        self.sampler = Sampler()
        self._jobs: dict[str, _Job] = {}  # being computed
        self._sending: dict[str, int] = {}  # computed; request id -> ticket id until settled
        self.num_steps = 0  # forward passes run
        self.step_seconds = 0.0  # ... and the time they took
        self.outcome_counts: Counter[str] = Counter()  # settled transfers: "sent" or "failed"

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or bool(self._sending)

    def add_job(self, job: PrefillJob) -> None:
        """Queue a job. Raises ValueError if its ticket does not fit this worker's KV
        layout or the prompt can never run here."""
        ticket = job.ticket
        if ticket.layout != layout_of(self.runner.pool):
            raise ValueError(f"ticket layout {ticket.layout} differs from this prefill worker's "
                             f"{layout_of(self.runner.pool)}: the workers serve different models")
        if ticket.num_prompt_tokens != len(job.prompt_ids):
            raise ValueError(f"ticket is for {ticket.num_prompt_tokens} prompt tokens, job has {len(job.prompt_ids)}")
        request = Request(ticket.request_id, list(job.prompt_ids), job.params,
                          make_generator(job.params.seed, self.runner.device))
        self.scheduler.add(request)
        self.pusher.start(ticket, job.address)
        self._jobs[ticket.request_id] = _Job(job, ticket.first_page)

    def abort(self, request_id: str, reason: str = "aborted") -> bool:
        """Stop a job now: its blocks are free when this returns and the decode worker is
        told (best effort). False if the job is unknown or already done."""
        job = self._jobs.pop(request_id, None)
        if job is not None:
            self.scheduler.finish(request_id, FinishReason.ABORT)
            self._sending[request_id] = job.job.ticket.ticket_id
            self.pusher.abort(job.job.ticket.ticket_id, reason)
            return True
        if request_id in self._sending:
            self.pusher.abort(self._sending[request_id], reason)
            return True
        return False

    def step(self) -> list[JobOutcome]:
        """One forward over scheduled chunks; return the jobs whose transfer settled
        (the decode worker accepted everything, or the transfer failed)."""
        outcomes = self._settle()
        chunks = self.scheduler.schedule()
        if not chunks:
            return outcomes
        started = time.perf_counter()
        batch = build_forward_batch(chunks, self.info.block_size, self.runner.device)
        sends = self._pages_to_send(chunks)

        def on_layer_done(layer: int) -> None:
            for ticket_id, page_start, blocks in sends:
                self.pusher.push(ticket_id, layer, page_start, blocks)

        logits = self.runner.execute(batch, on_layer_done)
        self.scheduler.update(chunks)
        sampling = [c.request for c in chunks if c.samples]
        if sampling:
            out = self.sampler(logits, [r.params for r in sampling], [r.generator for r in sampling])
            token_ids, logprobs = out.token_ids.tolist(), out.logprobs.tolist()
            for row, request in enumerate(sampling):
                job = self._jobs.pop(request.request_id)
                ticket = job.job.ticket
                top = out.top_for(row, request.params.logprobs)
                self.pusher.finish(ticket.ticket_id, TransferDone(
                    ticket.request_id, ticket.ticket_id, ticket.secret,
                    token_ids[row], logprobs[row], top))
                self.scheduler.finish(request.request_id, FinishReason.LENGTH)
                self._sending[request.request_id] = ticket.ticket_id
        self.num_steps += 1
        self.step_seconds += time.perf_counter() - started
        return outcomes

    def _pages_to_send(self, chunks: list[ScheduledChunk]) -> list[tuple[int, int, list[int]]]:
        """(ticket id, ticket-relative first page, this pool's blocks) for each chunk."""
        sends = []
        bs = self.info.block_size
        for chunk in chunks:
            job = self._jobs[chunk.request.request_id]
            ticket = job.job.ticket
            end = chunk.start + chunk.num_tokens
            first, last = job.next_page, -(-end // bs)  # absolute pages [first, last)
            if last > first:
                sends.append((ticket.ticket_id, first - ticket.first_page, chunk.request.block_table[first:last]))
            job.next_page = max(job.next_page, end // bs)
        return sends

    def _settle(self) -> list[JobOutcome]:
        """Stop computing jobs whose sending failed (decode refused, link down), and
        report sent transfers once the decode worker accepted or refused them."""
        outcomes = []
        for request_id, job in list(self._jobs.items()):
            state, reason = self.pusher.poll(job.job.ticket.ticket_id)
            if state is SendState.FAILED:
                del self._jobs[request_id]
                self.scheduler.finish(request_id, FinishReason.ABORT)
                self._sending[request_id] = job.job.ticket.ticket_id
        for request_id, ticket_id in list(self._sending.items()):
            state, reason = self.pusher.poll(ticket_id)
            if state is not SendState.SENDING:
                del self._sending[request_id]
                self.pusher.forget(ticket_id)
                outcomes.append(JobOutcome(request_id, state is SendState.SENT, reason))
                self.outcome_counts["sent" if state is SendState.SENT else "failed"] += 1
        return outcomes
