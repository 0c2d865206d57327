r"""Continuous-batching scheduler shared by both workers: decides, each step, which tokens
of which requests run.

It owns the block allocator and the prefix cache; nothing else allocates or frees KV, and
it holds the one request state machine:

    WAITING --admitted--> RUNNING --finish--> FINISHED(reason)
       ^                  |   ^
       +---preempted------+   |
    WAITING_FOR_KV --start_remote (KV and first token arrived)
       \--fall_back_to_local (the transfer failed)--> WAITING

A remote request (its prompt is prefilled by a prefill worker) enters WAITING_FOR_KV
through `reserve_remote`; the decode side of the hop (`pdserve.kv_transfer.decode_side`)
drives its transitions. The prefill worker uses the scheduler for local prompts only and
finishes each request once its first token is sampled.

One step, in order:
  1. Running requests that are decoding (one uncomputed token) get that token, oldest
     first. Then running requests still prefilling get a chunk of at most
     `max_prefill_chunk` tokens. Together they stay within `max_num_batched_tokens`, and
     when anybody decodes in the step, its prompt tokens within
     `max_prefill_tokens_while_decoding`.
  2. If nobody was preempted, waiting requests are admitted in their order (below)
     while sequences, tokens and blocks allow; a request reuses the longest cached
     prefix of its tokens and computes only the rest (a request that wants prompt
     logprobs computes its whole prompt: cached pages have no logits).
Prompt order: first come, first served by default. With `prompt_deadline_factor` K > 0 the
earliest due goes first, a prompt of L tokens falling due once this scheduler has
scheduled K x L prompt tokens since it arrived (the prompt clock: time measured in the
worker's own prompt work, so the order does not depend on how fast the machine is). A short
prompt then overtakes a long one queued or half computed before it (the long one's chunks
yield it the step's budget first) instead of waiting behind all of it; and every prompt is
served once the clock passes its due, whatever arrives later. In this order a step carries
at most `max_prefill_chunk` prompt tokens in all, not per prompt: prompts are computed one
after another rather than side by side (each then finishes as early as its place allows,
instead of all of them late together), and a prompt arriving waits for at most one chunk's
step. And a step that finishes a prompt carries after it only prompts it finishes too (no
chunk of a longer one due later): a short prompt's first token waits for its own compute,
not a long one's chunk. Resumed and preempted requests keep their place ahead of new
arrivals in either order.
Blocks are allocated on demand for the tokens scheduled. When none are free, the prefix
cache evicts unlocked entries; when that is not enough, the youngest running request is
preempted: its computed pages go to the prefix cache, its blocks are released, and it
returns to the front of the waiting queue to be recomputed. Since the oldest requests are
never the victims and preempted requests are readmitted before any newer one, every
request eventually runs to completion (no starvation).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from pdserve.runtime.block_allocator import BlockAllocator
from pdserve.runtime.config import RuntimeInfo, SchedulerConfig
from pdserve.runtime.forward_batch import ForwardBatch, SeqChunk
from pdserve.runtime.radix_cache import DisabledRadixCache, PrefixCache, RadixCache
from pdserve.runtime.request import PromptLogprob, Request, RequestState
from pdserve.runtime.stopping import FinishReason


class RequestRejected(ValueError):
    """A request can never run on this worker (too long for the context or the pool)."""


class ScheduledChunk(NamedTuple):
    """Tokens [start, start + num_tokens) of the request, then (decode only) speculative
    draft tokens at the positions after them, whose logits verify the draft."""

    request: Request
    start: int  # == request.num_computed_tokens when scheduled
    num_tokens: int
    draft: tuple[int, ...] = ()

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the sequence, so its last logits are sampled."""
        return self.start + self.num_tokens == self.request.num_tokens

    @property
    def num_input_tokens(self) -> int:
        return self.num_tokens + len(self.draft)

    @property
    def num_prompt_logprobs(self) -> int:
        """Prompt logprobs this chunk's logits give (prompt tokens start + 1 ..., from the
        logits of positions start ...): the whole chunk's, except the last prompt token's
        logits, which predict the first output token. 0 unless the request wants them."""
        if not self.request.wants_prompt_logprobs:
            return 0
        return max(0, min(self.start + self.num_tokens, self.request.num_prompt_tokens - 1) - self.start)

    @property
    def num_logits(self) -> int:
        """Logits rows the forward returns for the chunk's last input tokens: its prompt
        logprob rows, then, when it samples, the row of its last committed token and one per
        draft token. (A chunk with prompt logprobs has no draft, so its rows are all of its
        tokens.)"""
        return self.num_prompt_logprobs + (1 + len(self.draft) if self.samples else 0)


def build_forward_batch(chunks: list[ScheduledChunk], block_size: int, device) -> ForwardBatch:
    """The forward batch of a step's chunks, in order; chunk c returns `c.num_logits` rows
    (see `StepLogits` for what they are)."""
    return ForwardBatch.build(
        [SeqChunk(c.request.token_ids(c.start, c.start + c.num_tokens) + list(c.draft), c.start,
                  c.request.block_table, c.num_logits > 0, c.num_logits) for c in chunks],
        block_size, device)


class StepLogits:
    """The logits of one step's forward, by chunk. Chunk c owns `c.num_logits` consecutive
    rows, chunks in batch order:

        rows of c   | prompt logprobs (m rows) | sampled (1) | draft tokens (k) |
        positions     start .. start + m - 1     last committed token, then each draft token

    Build it right after the forward, before any token of the step is appended (the row
    counts are read off the chunks, whose requests the step then changes)."""

    def __init__(self, chunks: Sequence[ScheduledChunk], logits: torch.Tensor) -> None:
        self.logits = logits
        # request id -> (first row, prompt logprob rows, all rows)
        self._rows: dict[str, tuple[int, int, int]] = {}
        first = 0
        for chunk in chunks:
            self._rows[chunk.request.request_id] = (first, chunk.num_prompt_logprobs, chunk.num_logits)
            first += chunk.num_logits
        if first != logits.shape[0]:
            raise ValueError(f"the chunks own {first} logits rows but the forward returned {logits.shape[0]}")

    def sampled(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """[len(chunks), vocab]: the logits after each chunk's last committed token."""
        rows = []
        for chunk in chunks:
            first, _, count = self._rows[chunk.request.request_id]
            rows.append(first + count - 1 - len(chunk.draft))
        if rows == list(range(self.logits.shape[0])):
            return self.logits  # every row is sampled: no copy
        return self.logits[torch.tensor(rows, device=self.logits.device)]

    def verified(self, chunk: ScheduledChunk) -> torch.Tensor:
        """[1 + len(chunk.draft), vocab]: the logits after the chunk's last committed token
        and after each of its draft tokens."""
        first, _, count = self._rows[chunk.request.request_id]
        return self.logits[first + count - 1 - len(chunk.draft):first + count]

    def prompt_logprobs(self, chunk: ScheduledChunk) -> list[PromptLogprob]:
        """The chunk's prompt logprobs: prompt tokens chunk.start + 1 ... under log_softmax
        of the raw logits before them, with the request's k alternatives; [] when none."""
        first, m, _ = self._rows[chunk.request.request_id]
        if m == 0:
            return []
        request = chunk.request
        logprobs = torch.log_softmax(self.logits[first:first + m].float(), dim=-1)
        targets = torch.tensor(request.prompt_ids[chunk.start + 1:chunk.start + 1 + m], device=logprobs.device)
        chosen = logprobs.gather(1, targets.unsqueeze(1))
        ranks = (logprobs > chosen).sum(dim=1) + 1
        top_values, top_ids = logprobs.topk(request.params.prompt_logprobs, dim=-1)  # k = 0: empty rows
        # One host copy per tensor, not one per row.
        return [PromptLogprob(value, rank, tuple(zip(ids, values)))
                for value, rank, ids, values in zip(chosen.squeeze(1).tolist(), ranks.tolist(),
                                                    top_ids.tolist(), top_values.tolist())]


def _prompt_order(request: Request) -> tuple[float, int]:
    """Who gets prompt compute first: the earliest due, then the oldest."""
    return request.prompt_due, request.arrival


class _Step:
    """The chunks of the step being built and the token budgets they leave: all tokens,
    and prompt tokens (`prefill_budget`)."""

    def __init__(self, budget: int, prefill_budget: int) -> None:
        self.budget = budget
        self.prefill_budget = prefill_budget
        self.chunks: list[ScheduledChunk] = []
        self.prefills: set[str] = set()  # ids of the requests whose chunk is prompt tokens
        self.preempted = False
        self.finishes_prompt = False  # a prefill chunk in it is its prompt's last

    def add(self, chunk: ScheduledChunk, prefill: bool) -> None:
        self.chunks.append(chunk)
        self.budget -= chunk.num_input_tokens
        if prefill:
            self.prefill_budget -= chunk.num_tokens
            self.prefills.add(chunk.request.request_id)
            self.finishes_prompt |= chunk.num_tokens == chunk.request.num_uncomputed_tokens

    def remove(self, request: Request) -> None:
        for chunk in self.chunks:
            if chunk.request is request:
                self.chunks.remove(chunk)
                self.budget += chunk.num_input_tokens
                if request.request_id in self.prefills:
                    self.prefills.discard(request.request_id)
                    self.prefill_budget += chunk.num_tokens
                return


class BatchScheduler:
    def __init__(self, config: SchedulerConfig, info: RuntimeInfo, enable_prefix_caching: bool = True) -> None:
        self.config = config
        self.info = info
        self.block_size = info.block_size
        self.allocator = BlockAllocator(info.num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        cache_class = RadixCache if enable_prefix_caching else DisabledRadixCache
        self.prefix_cache: PrefixCache = cache_class(self.allocator, info.block_size)
        self.waiting: deque[Request] = deque()  # local prefill; preempted ones at the front
        self.waiting_for_kv: dict[str, Request] = {}  # remote requests whose KV is on its way
        self.running: list[Request] = []  # in arrival order, oldest first
        self.requests: dict[str, Request] = {}
        self.prefix_query_tokens = 0  # prompt tokens looked up at first admission
        self.prefix_hit_tokens = 0  # ... of which the prefix cache held
        self.prompt_clock = 0  # prompt tokens scheduled so far (the deadline order's clock)
        self.num_finished = 0  # requests ended here, whatever the reason

    # ----------------------------------------------------------------- intake and exit

    def add(self, request: Request) -> None:
        """Queue a request for local prefill. Raises RequestRejected if it can never run."""
        self.validate(request)
        self.requests[request.request_id] = request
        factor = self.config.prompt_deadline_factor
        if request.is_resumed:
            request.prompt_due = -math.inf  # ahead of new arrivals, as its arrival says
        elif factor:
            request.prompt_due = self.prompt_clock + factor * request.num_prompt_tokens
        self._requeue(request)

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        """End a request in any state and release its blocks now. Finished requests'
        computed tokens stay reusable in the prefix cache. None if the id is unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.num_finished += 1
        self._unqueue(request)
        self._release(request, cache_pages=self._pages_are_valid(request))
        request.state = RequestState.FINISHED
        request.finish_reason = reason
        return request

    def hold_blocks(self, blocks: Sequence[int]) -> None:
        """Keep allocated blocks from being freed or reused (another holder, e.g. a
        transport still reading them) until `release_blocks`, whatever happens to the
        requests and cache entries that hold them too."""
        self.allocator.incref(blocks)

    def release_blocks(self, blocks: Sequence[int]) -> None:
        """Drop a `hold_blocks` hold."""
        self.allocator.free(blocks)

    def _unqueue(self, request: Request) -> None:
        if request.state is RequestState.WAITING_FOR_KV:
            del self.waiting_for_kv[request.request_id]
        elif request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def _pages_are_valid(self, request: Request) -> bool:
        """Whether the request's computed pages may be cached when it ends: not while a
        transfer that did not complete may have left them half written."""
        return request.state is not RequestState.WAITING_FOR_KV

    # ------------------------------------------------------------- remote requests

    def reserve_remote(self, request: Request) -> bool:
        """Reuse the cached prefix and reserve blocks for the rest of the prompt (decode
        first: no prefill work anywhere for a request this pool cannot hold). On success
        the request is WAITING_FOR_KV, its block table covers the whole prompt, and KV
        for positions [request.num_computed_tokens, num_prompt_tokens) must be written
        into those blocks before `start_remote`. False (nothing held) when the blocks
        are not free."""
        self.validate(request)
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self._attach_prefix(request, computes_prompt=False)
        if not self._allocate_for(request, request.num_prompt_tokens):
            self._detach(request)
            return False
        request.state = RequestState.WAITING_FOR_KV
        self.requests[request.request_id] = request
        self.waiting_for_kv[request.request_id] = request
        return True

    def start_remote(self, request_id: str, first_token: int) -> Request:
        """The prompt's KV has arrived with the first sampled token: start decoding."""
        request = self.waiting_for_kv.pop(request_id)
        request.num_computed_tokens = request.num_prompt_tokens
        request.output_ids.append(first_token)
        request.state = RequestState.RUNNING
        self.running.append(request)
        self.running.sort(key=lambda r: r.arrival)
        if request.num_prompt_tokens // self.block_size:
            self._cache_computed_pages(request)
        return request

    def fall_back_to_local(self, request_id: str) -> Request:
        """The transfer failed: drop the reserved blocks (their content is unknown) and
        queue the request to be prefilled here, ahead of newer arrivals."""
        request = self.waiting_for_kv.pop(request_id)
        self._release(request, cache_pages=False)
        request.num_computed_tokens = 0
        request.state = RequestState.WAITING
        self._put_ahead(request)
        self._requeue(request)
        return request

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ----------------------------------------------------------------------- one step

    def schedule(self, drafts: Mapping[str, Sequence[int]] | None = None) -> list[ScheduledChunk]:
        """Pick this step's work and allocate its blocks. The returned chunks are in the
        order their tokens appear in the forward batch. `drafts` (request id -> proposed
        tokens) adds speculative tokens to decoding requests, cut to what the budget,
        the context and max_tokens leave."""
        decoding = [r for r in self.running if not r.is_prefilling]
        prefilling = sorted((r for r in self.running if r.is_prefilling), key=_prompt_order)
        limit = self.config.max_prefill_tokens_while_decoding
        prefill_budget = limit if decoding and limit is not None else self.config.max_num_batched_tokens
        if self.config.prompt_deadline_factor:  # one chunk's worth of prompt tokens in all
            prefill_budget = min(prefill_budget, self.config.max_prefill_chunk)
        step = _Step(self.config.max_num_batched_tokens, prefill_budget)
        for request in decoding + prefilling:
            if step.budget == 0:
                break
            if request not in self.running:
                continue  # preempted earlier in this step
            prefill = request.is_prefilling
            if prefill and not step.preempted:
                self._admit(step, ahead_of=request)  # waiting prompts due before it go first
                if step.budget == 0:
                    break
            n = min(request.num_uncomputed_tokens, self.config.max_prefill_chunk, step.budget)
            if prefill:
                n = min(n, step.prefill_budget)
                if n == 0 or self._holds_back(step, request, n):
                    continue
            draft = ()
            if drafts and not prefill:
                draft = self._fit_draft(request, drafts.get(request.request_id, ()), step.budget - n)
            if self._allocate_or_preempt(request, request.num_computed_tokens + n + len(draft), step):
                step.add(ScheduledChunk(request, request.num_computed_tokens, n, draft), prefill)
        if not step.preempted:
            self._admit(step)
        self.prompt_clock += sum(c.num_tokens for c in step.chunks if c.request.request_id in step.prefills)
        return step.chunks

    def _admit(self, step: _Step, ahead_of: Request | None = None) -> None:
        """Admit waiting requests in prompt order (all of them that fit, or only those
        ordered before `ahead_of`)."""
        while (self.waiting and step.budget > 0 and step.prefill_budget > 0
               and len(self.running) < self.config.max_num_seqs
               and (ahead_of is None or _prompt_order(self.waiting[0]) < _prompt_order(ahead_of))):
            request = self.waiting[0]
            self._attach_prefix(request)
            if self._prefix_in_flight(request):
                self._detach(request)
                break  # its prefix will be in the cache in a step or two: wait for it
            n = min(request.num_uncomputed_tokens, self.config.max_prefill_chunk, step.budget, step.prefill_budget)
            if self._holds_back(step, request, n) or not self._allocate_for(request, request.num_computed_tokens + n):
                self._detach(request)
                break  # nobody overtakes the head of the queue
            self.waiting.popleft()
            request.state = RequestState.RUNNING
            self.running.append(request)
            step.add(ScheduledChunk(request, request.num_computed_tokens, n), prefill=True)
        self.running.sort(key=lambda r: r.arrival)

    def _holds_back(self, step: _Step, request: Request, n: int) -> bool:
        """In deadline order, a step that finishes a prompt carries after it only prompts it
        finishes too, no part of a longer one due later: the finished prompt's first token
        then waits for no more than its own compute (and that of prompts like it), and the
        longer one resumes a step later."""
        return bool(self.config.prompt_deadline_factor) and step.finishes_prompt and n < request.num_uncomputed_tokens

    def _allocate_or_preempt(self, request: Request, num_tokens: int, step: _Step) -> bool:
        """Grow `request`'s block table to `num_tokens`, preempting younger running
        requests (youngest first, unscheduling them if needed) until it fits. If only
        older requests are left, `request` itself is preempted and False returned."""
        while not self._allocate_for(request, num_tokens):
            step.preempted = True
            victim = max((r for r in self.running if r is not request), key=lambda r: r.arrival, default=None)
            if victim is None or victim.arrival < request.arrival:
                self._preempt(request)
                return False
            step.remove(victim)
            self._preempt(victim)
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request, cache_pages=True)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.state = RequestState.PREEMPTED
        self._put_ahead(request)
        self._requeue(request)

    def _put_ahead(self, request: Request) -> None:
        """Order a request that was served once (preempted, or its transfer failed) ahead of
        every new arrival: first come, first served does by its older arrival already."""
        if self.config.prompt_deadline_factor:
            request.prompt_due = -math.inf

    def _requeue(self, request: Request) -> None:
        """Into the waiting queue at its place in prompt order (the queue stays sorted: a
        preempted request goes back ahead of the newer arrivals)."""
        key = _prompt_order(request)
        index = len(self.waiting)  # new arrivals mostly go last: search from the back
        while index and _prompt_order(self.waiting[index - 1]) > key:
            index -= 1
        self.waiting.insert(index, request)

    def _fit_draft(self, request: Request, draft: Sequence[int], budget: int) -> tuple[int, ...]:
        # A step emits at most len(draft) + 1 tokens: all of them must fit the context
        # and max_tokens.
        room = min(budget, self.info.max_model_len - request.num_tokens - 1,
                   request.params.max_tokens - request.num_output_tokens - 1)
        return tuple(draft[:max(room, 0)])

    def commit_draft(self, request: Request, num_accepted: int) -> None:
        """After `update`: the first `num_accepted` draft tokens of the request's last
        chunk were accepted and appended to its output by the caller, so their KV is
        valid. Blocks that held only rejected tokens go back to the pool now; the prefix
        cache only ever sees committed tokens."""
        start = request.num_computed_tokens
        request.num_computed_tokens += num_accepted
        keep = -(-request.num_tokens // self.block_size)
        if len(request.block_table) > keep:
            self.allocator.free(request.block_table[keep:])
            del request.block_table[keep:]
        if request.num_computed_tokens // self.block_size > start // self.block_size:
            self._cache_computed_pages(request)

    def update(self, chunks: list[ScheduledChunk]) -> None:
        """Record that the forward pass computed every scheduled token, and offer pages
        that became full to the prefix cache at once, so that requests sharing a prefix
        with one still running reuse it without waiting for it to finish."""
        for chunk in chunks:
            request = chunk.request
            request.num_computed_tokens += chunk.num_tokens
            if request.num_computed_tokens // self.block_size > chunk.start // self.block_size:
                self._cache_computed_pages(request)

    def _cache_computed_pages(self, request: Request) -> None:
        """Insert the request's full computed pages and move its lock to the longer path,
        so the pages it is using are never counted as evictable."""
        computed = request.token_ids(0, request.num_computed_tokens // self.block_size * self.block_size)
        self.prefix_cache.insert(computed, request.block_table)
        match = self.prefix_cache.match_prefix(computed)
        self.prefix_cache.lock(match.handle)
        if request.prefix_handle is not None:
            self.prefix_cache.unlock(request.prefix_handle)
        request.prefix_handle = match.handle

    # ------------------------------------------------------------------------ blocks

    def _prefix_in_flight(self, request: Request) -> bool:
        """Whether a running request is still computing a page-aligned prefix that
        `request` shares beyond what it found cached."""
        if not self.enable_prefix_caching or request.wants_prompt_logprobs:
            return False  # nothing to wait for, or it reuses nothing anyway
        cached = request.num_computed_tokens
        bs = self.block_size
        for other in self.running:
            if other.num_computed_tokens >= other.num_prompt_tokens:
                continue  # prompt done: its pages are already in the cache
            start = cached
            while (start + bs <= min(request.num_tokens - 1, other.num_prompt_tokens)
                   and request.token_ids(start, start + bs) == other.prompt_ids[start:start + bs]):
                start += bs
            if start > max(cached, other.num_computed_tokens // bs * bs):
                return True
        return False

    def _attach_prefix(self, request: Request, computes_prompt: bool = True) -> None:
        """Reuse the longest cached prefix; at least one token is left to compute so the
        request gets logits to sample from. A request whose prompt logprobs this worker
        computes (`computes_prompt`) reuses nothing: cached pages come without logits."""
        if request.block_table:
            return
        reusable = 0 if computes_prompt and request.wants_prompt_logprobs else request.num_tokens - 1
        match = self.prefix_cache.match_prefix(request.token_ids(0, reusable))
        self.prefix_cache.lock(match.handle)
        self.allocator.incref(match.block_ids)
        request.prefix_handle = match.handle
        request.block_table = list(match.block_ids)
        request.num_computed_tokens = match.num_tokens
        if request.num_preemptions == 0:
            request.num_cached_tokens = match.num_tokens
            self.prefix_query_tokens += request.num_prompt_tokens
            self.prefix_hit_tokens += match.num_tokens

    def _detach(self, request: Request) -> None:
        """Undo `_attach_prefix` (and any allocation) for a request that could not start."""
        if request.num_preemptions == 0:  # it will be looked up (and counted) again
            self.prefix_query_tokens -= request.num_prompt_tokens
            self.prefix_hit_tokens -= request.num_cached_tokens
        self._release(request, cache_pages=False)
        request.num_computed_tokens = 0

    def _allocate_for(self, request: Request, num_tokens: int) -> bool:
        """Make the block table cover `num_tokens`, evicting cached prefixes if needed."""
        needed = -(-num_tokens // self.block_size) - len(request.block_table)
        if needed <= 0:
            return True
        if self.allocator.num_free < needed:
            self.prefix_cache.evict(needed - self.allocator.num_free)
            if self.allocator.num_free < needed:
                return False
        request.block_table.extend(self.allocator.allocate(needed))
        return True

    def _release(self, request: Request, cache_pages: bool) -> None:
        """Drop every block reference and prefix lock `request` holds. With `cache_pages`,
        its computed full pages are first offered to the prefix cache."""
        if cache_pages and request.num_computed_tokens >= self.block_size:
            computed = request.token_ids(0, request.num_computed_tokens)
            pages = request.num_computed_tokens // self.block_size
            self.prefix_cache.insert(computed, request.block_table[:pages])
        if request.prefix_handle is not None:
            self.prefix_cache.unlock(request.prefix_handle)
            request.prefix_handle = None
        self.allocator.free(request.block_table)
        request.block_table = []

    def validate(self, request: Request) -> None:
        """Raise RequestRejected if `request` can never run here; changes nothing."""
        n, limit = request.num_prompt_tokens, self.info.max_model_len
        if n == 0:
            raise RequestRejected(f"request {request.request_id}: the prompt is empty")
        if n >= limit:
            raise RequestRejected(
                f"request {request.request_id}: the prompt has {n} tokens but the model's "
                f"context is {limit} tokens (prompt + at least one output token); shorten it")
        budget = min(n + request.params.max_tokens, limit)
        if -(-budget // self.block_size) > self.info.num_blocks:
            raise RequestRejected(
                f"request {request.request_id}: {budget} tokens need more KV blocks than the "
                f"pool's {self.info.num_blocks}; lower max_tokens or enlarge the KV cache")
