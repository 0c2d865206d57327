"""`PrefillEngine`: computes prompts' KV for decode workers.

One step: the shared batch scheduler picks prompt chunks under the token budget (its own
radix cache skips prefixes this worker computed before); the forward pass runs, and as
each layer finishes, the pages that layer completed are pushed while the later layers
compute. A job that asked for prompt logprobs reads them off every chunk's logits (and
reuses no cached prefix). A job whose prompt is complete samples its first token and ends
with FinishReason.PREFILLED; its blocks go back at once (its pages stay in the radix cache
for later prompts), except those a transport still reads in place (held until the job's
transfer settles, see `prefill_side`).

What is sent, and when a job's transfer settles, is the hop's business
(`pdserve.kv_transfer.prefill_side`): the engine only says which prompt tokens are
computed and which first tokens were sampled.
"""

from __future__ import annotations

import time

from pdserve.kv_transfer.layout import layout_of
from pdserve.kv_transfer.messages import PrefillJob
from pdserve.kv_transfer.prefill_side import JobOutcome, PrefillJobs
from pdserve.kv_transfer.pusher import KVPusher
from pdserve.runtime.config import RuntimeInfo, SchedulerConfig
from pdserve.runtime.model_runner import ModelRunner
from pdserve.runtime.request import Request, resumed_arrival
from pdserve.runtime.sampler import Sampler, make_generator
from pdserve.runtime.scheduler import BatchScheduler, StepLogits, build_forward_batch
from pdserve.runtime.stopping import FinishReason
from pdserve.runtime.structured_output import GrammarCompiler, start_grammar


class PrefillEngine:
    def __init__(self, runner: ModelRunner, info: RuntimeInfo, pusher: KVPusher,
                 config: SchedulerConfig | None = None, enable_prefix_caching: bool = True,
                 grammars: GrammarCompiler | None = None) -> None:
        self.runner = runner
        self.grammars = grammars  # None: jobs with structured output are refused
        self.info = info
        self.pusher = pusher
        self.scheduler = BatchScheduler(config or SchedulerConfig(), info, enable_prefix_caching)
        self.sampler = Sampler(info.eos_token_ids)
        self.jobs = PrefillJobs(pusher, info.block_size)
        self.num_steps = 0  # forward passes run
        self.step_seconds = 0.0  # ... and the time they took
        self.prompt_tokens_computed = 0  # ... the prompt tokens they computed
        self.batch_requests_stepped = 0  # ... and the requests in them, summed over steps

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or self.jobs.has_sending

    def add_job(self, job: PrefillJob) -> int:
        """Queue a job; its id (`JobOutcome.job_id`). Raises ValueError if its ticket does
        not fit this worker's KV layout, the prompt can never run here, or a job of the same
        request is computing here."""
        ticket = job.ticket
        if self.jobs.is_computing(ticket.request_id):
            raise ValueError(f"a prefill job for request {ticket.request_id} is already computing here")
        if ticket.layout != layout_of(self.runner.pool):
            raise ValueError(f"ticket layout {ticket.layout} differs from this prefill worker's "
                             f"{layout_of(self.runner.pool)}: the workers serve different models")
        if ticket.num_prompt_tokens != len(job.prompt_ids):
            raise ValueError(f"ticket is for {ticket.num_prompt_tokens} prompt tokens, job has {len(job.prompt_ids)}")
        job.params.check_vocab(self.runner.config.vocab_size)
        resumed = {} if job.resume_at is None else {"arrival": resumed_arrival(), "output_offset": job.resume_at}
        # The first token is sampled under the request's grammar; the decode worker builds
        # its own matcher and advances it by that token.
        grammar = start_grammar(self.grammars, job.params, job.prompt_ids, job.resume_at)
        request = Request(ticket.request_id, list(job.prompt_ids), job.params,
                          make_generator(job.params.seed, self.runner.device), grammar=grammar, **resumed)
        self.scheduler.add(request)
        return self.jobs.start(job)

    def abort(self, request_id: str, reason: str = "aborted") -> bool:
        """Stop the request's job now: its blocks are free when this returns (those a
        transport reads in place, once its transfer settles) and the decode worker is told
        (best effort). False if no job of the request is unsettled."""
        if self.jobs.is_computing(request_id):
            self.scheduler.finish(request_id, FinishReason.ABORT)
        return self.jobs.abort(request_id, reason)

    def step(self) -> list[JobOutcome]:
        """One forward over scheduled chunks; return the jobs whose transfer settled
        (the decode worker accepted everything, or the transfer failed)."""
        outcomes = self._settle()
        chunks = self.scheduler.schedule()
        if not chunks:
            return outcomes
        started = time.perf_counter()
        batch = build_forward_batch(chunks, self.info.block_size, self.runner.device)
        sends = [send for c in chunks
                 if (send := self.jobs.computed(c.request.request_id, c.request.block_table,
                                                c.start + c.num_tokens)) is not None]
        for send in sends:
            if send.held:
                self.scheduler.hold_blocks(send.block_ids)

        def on_layer_done(layer: int) -> None:
            self.jobs.push_layer(layer, sends)

        logits = StepLogits(chunks, self.runner.execute(batch, on_layer_done))
        self.scheduler.update(chunks)
        for chunk in chunks:
            if chunk.request.wants_prompt_logprobs:
                chunk.request.record_prompt_logprobs(chunk.start, logits.prompt_logprobs(chunk))
        sampling = [c for c in chunks if c.samples]
        if sampling:
            requests = [c.request for c in sampling]
            # The first token sees the same logits controls as on a decode worker: the
            # prompt, and as output only the tokens a resumed request carries.
            out = self.sampler(logits.sampled(sampling), [r.params for r in requests],
                               [r.generator_for_next_token() for r in requests], requests,
                               [r.grammar for r in requests])
            token_ids, logprobs = out.token_ids.tolist(), out.logprobs.tolist()
            for row, request in enumerate(requests):
                top = out.top_for(row, request.params.logprobs)
                prompt_logprobs = tuple(request.prompt_logprobs) if request.asked_prompt_logprobs else ()
                self.jobs.prefilled(request.request_id, token_ids[row], logprobs[row], top, prompt_logprobs)
                self.scheduler.finish(request.request_id, FinishReason.PREFILLED)
        self.num_steps += 1
        self.step_seconds += time.perf_counter() - started
        self.prompt_tokens_computed += sum(c.num_tokens for c in chunks)
        self.batch_requests_stepped += len(chunks)
        return outcomes

    def _settle(self) -> list[JobOutcome]:
        """Stop computing jobs whose sending failed (decode refused, link down), and
        report sent transfers once the decode worker accepted or refused them."""
        for request_id in self.jobs.stop_failed():
            self.scheduler.finish(request_id, FinishReason.ABORT)
        outcomes = self.jobs.settled()
        for outcome in outcomes:
            self.scheduler.release_blocks(outcome.held_blocks)
        return outcomes
