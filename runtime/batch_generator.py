"""`BatchGenerator`: runs a set of requests to completion on one `ModelRunner`.

Each step builds one mixed forward: every running sequence that is decoding contributes
its last token, and sequences still prefilling contribute the next chunk of their prompt
(at most `max_prefill_chunk` tokens each, `max_num_batched_tokens` in all). A request is
admitted only when blocks for its whole budget (prompt + max_tokens, capped at the
context) are free, so it never runs out of KV mid-way and nothing is ever preempted;
admission is first come, first served. The continuous-batching scheduler of the decode
worker replaces this reservation with on-demand allocation and preemption.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

from pdserve.runtime.block_allocator import BlockAllocator
from pdserve.runtime.config import RuntimeInfo, SchedulerConfig
from pdserve.runtime.forward_batch import ForwardBatch, SeqChunk
from pdserve.runtime.model_runner import ModelRunner
from pdserve.runtime.request import Request, RequestState
from pdserve.runtime.sampler import Sampler
from pdserve.runtime.stopping import FinishReason, check_stop_token


class PromptTooLongError(ValueError):
    """The prompt does not fit the model's context; nothing was scheduled."""


class TokenEvent(NamedTuple):
    """One sampled token of one request, in the order requests produce them."""

    request_id: str
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None  # (token id, logprob), best first
    finish_reason: FinishReason | None


class BatchGenerator:
    def __init__(self, runner: ModelRunner, info: RuntimeInfo, config: SchedulerConfig) -> None:
        self.runner = runner
        self.info = info
        self.config = config
        self.allocator = BlockAllocator(info.num_blocks)
        self.sampler = Sampler()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        """Queue a request. Raises PromptTooLongError if it can never run."""
        n, limit = request.num_prompt_tokens, self.info.max_model_len
        if n == 0:
            raise ValueError(f"request {request.request_id}: the prompt is empty")
        if n >= limit:
            raise PromptTooLongError(
                f"request {request.request_id}: the prompt has {n} tokens but the model's "
                f"context is {limit} tokens (prompt + at least one output token); shorten it"
            )
        if self._blocks_needed(request) > self.info.num_blocks:
            raise PromptTooLongError(
                f"request {request.request_id} needs {self._blocks_needed(request)} KV blocks "
                f"but the pool has {self.info.num_blocks}; lower max_tokens or enlarge the cache"
            )
        self.waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Finish a request now with reason ABORT and free its blocks. False if unknown."""
        for queue in (self.waiting, self.running):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    self._finish(request, FinishReason.ABORT)
                    return True
        return False

    def run(self) -> Iterator[TokenEvent]:
        """Step until every request has finished, yielding tokens as they are sampled."""
        while self.has_unfinished:
            yield from self.step()

    def step(self) -> list[TokenEvent]:
        self._admit()
        scheduled = self._schedule()
        if not scheduled:
            return []
        chunks = [chunk for _, chunk in scheduled]
        batch = ForwardBatch.build(chunks, self.info.block_size, self.runner.pool.kv.device)
        logits = self.runner.execute(batch)
        for request, chunk in scheduled:
            request.num_computed_tokens += len(chunk.token_ids)
        sampling = [r for r, c in scheduled if c.sample]
        if not sampling:
            return []
        out = self.sampler(logits, [r.params for r in sampling], [r.generator for r in sampling])
        events = []
        for row, request in enumerate(sampling):
            events.append(self._append_token(request, out, row))
        return events

    def _blocks_needed(self, request: Request) -> int:
        budget = min(request.num_prompt_tokens + request.params.max_tokens, self.info.max_model_len)
        return -(-budget // self.info.block_size)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            needed = self._blocks_needed(request)
            if not self.allocator.can_allocate(needed):
                return  # first come, first served: no overtaking
            self.waiting.popleft()
            request.block_table = self.allocator.allocate(needed)
            request.state = RequestState.RUNNING
            self.running.append(request)

    def _schedule(self) -> list[tuple[Request, SeqChunk]]:
        """Decoding sequences first (one token each), then prompt chunks in arrival order."""
        budget = self.config.max_num_batched_tokens
        scheduled = []
        for request in self.running:
            if not request.is_prefilling and budget > 0:
                start = request.num_computed_tokens
                scheduled.append((request, SeqChunk(
                    request.token_ids(start, start + 1), start, request.block_table, True)))
                budget -= 1
        for request in self.running:
            if request.is_prefilling and budget > 0:
                start = request.num_computed_tokens
                n = min(request.num_prompt_tokens - start, self.config.max_prefill_chunk, budget)
                end = start + n
                scheduled.append((request, SeqChunk(
                    request.prompt_ids[start:end], start, request.block_table,
                    end == request.num_prompt_tokens)))
                budget -= n
        return scheduled

    def _append_token(self, request: Request, out, row: int) -> TokenEvent:
        token = int(out.token_ids[row])
        request.output_ids.append(token)
        reason = check_stop_token(token, request.num_output_tokens, request.params,
                                  self.info.eos_token_ids)
        if reason is None and request.num_tokens >= self.info.max_model_len:
            reason = FinishReason.LENGTH
        top = None
        if out.top_logprob_ids is not None and request.params.logprobs:
            n = request.params.logprobs
            top = list(zip(out.top_logprob_ids[row, :n].tolist(), out.top_logprobs[row, :n].tolist()))
        if reason is not None:
            self.running.remove(request)
            self._finish(request, reason)
        return TokenEvent(request.request_id, token, float(out.logprobs[row]), top, reason)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.state = RequestState.FINISHED
        request.finish_reason = reason
        self.allocator.free(request.block_table)
        request.block_table = []
