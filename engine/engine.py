"""`EngineCore`: the synchronous heart of a decode worker.

One step is three calls: `scheduler.schedule()` -> `runner.execute(batch)` ->
`_emit()` per sampled row. With a `Speculator`, decoding requests first get draft tokens;
the same forward computes the target's logits at every draft position, `verify` keeps
the longest acceptable prefix plus one token, and `scheduler.commit_draft` makes exactly
the accepted tokens' KV part of the sequence. With a KV receiver it also takes remote
requests, whose prompt a prefill worker computes (`add_remote_request`); the decode side
of the hop (`pdserve.kv_transfer.decode_side`) settles their transfers at the start of each
step. The core is single-threaded; `AsyncEngine` drives it from a thread and `LLM` drives
it in a loop.

Parallel sampling (n sequences of one prompt): the group's first request (the leader)
arrives as usual, the others with `follows=` its id. While the leader waits for its
prompt's KV from a prefill worker, a follower is held here, outside the scheduler; once
the leader's KV is here (it started decoding, fell back to local prefill, ended, or was
never known) the follower is queued, so it finds the prompt's full pages in the prefix
cache (or, while the leader still computes them, waits for them: the scheduler never lets
a waiting request recompute a prefix a running one is computing). The prompt's KV is
computed and transferred once; each follower computes only its last, partial page.

Prompt logprobs: a request that asks for them computes its whole prompt (cached pages have
no logits), every chunk returning the logits of all its tokens; `StepLogits` says which
rows are whose, and each chunk's prompt logprobs go into the request until its first
token's delta carries them. A remote request's come in the prefill worker's TransferDone.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import torch

from pdserve.engine.proposers import Draft
from pdserve.engine.speculation import Speculator, make_proposer
from pdserve.engine.verification import Verified, verify
from pdserve.kv_transfer.decode_side import OnTransferFailure, RemoteRequests
from pdserve.kv_transfer.messages import KVTicket
from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.runtime.config import RuntimeInfo, SchedulerConfig, SpeculativeConfig
from pdserve.runtime.model_runner import ModelRunner
from pdserve.runtime.request import Request, RequestState, TokenDelta, resumed_arrival
from pdserve.runtime.sampler import Sampler, make_generator
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.scheduler import (
    BatchScheduler,
    RequestRejected,
    ScheduledChunk,
    StepLogits,
    build_forward_batch,
)
from pdserve.runtime.stopping import FinishReason, check_stop_token
from pdserve.runtime.structured_output import GrammarCompiler, start_grammar

log = logging.getLogger(__name__)


class HeldFollower(NamedTuple):
    """A follower waiting, outside the scheduler, for its leader's prompt KV."""

    request: Request
    leader_id: str


class EngineCore:
    def __init__(
        self,
        runner: ModelRunner,
        info: RuntimeInfo,
        config: SchedulerConfig | None = None,
        enable_prefix_caching: bool = True,
        kv_receiver: KVReceiver | None = None,
        on_transfer_failure: OnTransferFailure = OnTransferFailure.RECOMPUTE,
        transfer_timeout: float = 30.0,
        speculative: SpeculativeConfig | None = None,
        grammars: GrammarCompiler | None = None,
    ) -> None:
        self.runner = runner
        self.grammars = grammars  # None: requests with structured output are refused
        self.info = info
        self.scheduler = BatchScheduler(config or SchedulerConfig(), info, enable_prefix_caching)
        self.sampler = Sampler(info.eos_token_ids)
        self.num_steps = 0  # forward passes run
        self.step_seconds = 0.0  # ... and the time they took, sampling included
        self.prompt_tokens_computed = 0  # ... the tokens of their prefill chunks (local prefills, recomputes)
        self.batch_requests_stepped = 0  # ... and the requests in them, summed over steps
        self.speculator = (Speculator(speculative, make_proposer(speculative, runner, info))
                           if speculative is not None else None)
        self.remote = None
        # follower id -> the follower, while its leader waits for KV (insertion order:
        # a follower is released no later than one added after it)
        self._held: dict[str, HeldFollower] = {}
        if kv_receiver is not None:
            self.remote = RemoteRequests(self.scheduler, kv_receiver, on_transfer_failure, transfer_timeout)

    def fail_remote(self, request_id: str, reason: str) -> None:
        """The prefill side cannot deliver this remote request's KV: settle it at the next
        step (recompute here or fail, per policy) instead of waiting for its deadline. A
        no-op for a request that is not waiting for KV."""
        if self.remote is not None:
            self.remote.fail(request_id, reason)

    def add_remote_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                           resume_at: int | None = None) -> KVTicket | None:
        """Take a remote request (a prefill worker computes its prompt): reserve its
        blocks and return the ticket to hand to that worker, or None when there is no
        room now or its prompt logprobs are too many to ship (`RemoteRequests.add`).
        `resume_at`: see `add_request`."""
        if self.remote is None:
            raise RuntimeError("this engine has no KV receiver; create it with kv_receiver=")
        return self.remote.add(self._new_request(request_id, prompt_ids, params, resume_at))

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    resume_at: int | None = None, follows: str | None = None) -> Request:
        """Queue a request for local prefill and decode. Raises RequestRejected (a
        ValueError saying why) if it can never run here. `resume_at`: the request
        continues one that was running elsewhere (a migration) whose first `resume_at`
        output tokens end `prompt_ids`; it queues ahead of new arrivals and its seeded
        draws continue from that output position. `follows`: the id of a request added
        before this one with the same prompt (its group's leader); while the leader waits
        for its prompt's KV, this request is held (see the module docstring), then queued."""
        request = self._new_request(request_id, prompt_ids, params, resume_at)
        if follows is not None and self._kv_pending(follows):
            self.scheduler.validate(request)  # refused now, as a queued request would be
            self._held[request_id] = HeldFollower(request, follows)
        else:
            self.scheduler.add(request)
        return request

    @property
    def num_held_followers(self) -> int:
        """Followers waiting for their leader's prompt KV (not in the scheduler yet)."""
        return len(self._held)

    def _kv_pending(self, request_id: str) -> bool:
        """Whether the request's prompt KV is still to come: it waits for a prefill
        worker's transfer, or is a follower held until its own leader's KV is here."""
        return request_id in self.scheduler.waiting_for_kv or request_id in self._held

    def _release_followers(self) -> None:
        """Queue every held follower whose leader's prompt KV is here now, or never will be
        (the leader ended). In insertion order, so a follower of a follower follows at once."""
        for request_id, held in list(self._held.items()):
            if not self._kv_pending(held.leader_id):
                del self._held[request_id]
                self.scheduler.add(held.request)

    def _new_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     resume_at: int | None) -> Request:
        if request_id in self.scheduler.requests or request_id in self._held:
            raise ValueError(f"request id {request_id!r} is already in use")
        try:
            params.check_vocab(self.runner.config.vocab_size)
        except ValueError as exc:
            raise RequestRejected(str(exc)) from None
        resumed = {} if resume_at is None else {"arrival": resumed_arrival(), "output_offset": resume_at}
        try:
            grammar = start_grammar(self.grammars, params, prompt_ids, resume_at)
        except ValueError as exc:
            raise RequestRejected(str(exc)) from None
        return Request(request_id, list(prompt_ids), params, make_generator(params.seed, self.runner.device),
                       grammar=grammar, **resumed)

    def finish_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> TokenDelta | None:
        """End a request now (abort, or a stop string found by the caller); its blocks are
        free when this returns. Returns its final delta, or None if it had already ended."""
        if self.remote is not None:
            self.remote.abort(request_id)
        held = self._held.pop(request_id, None)
        if held is not None:  # it holds no blocks yet: nothing to free
            request = held.request
            request.state, request.finish_reason = RequestState.FINISHED, reason
        else:
            request = self.scheduler.finish(request_id, reason)
        if request is None:
            return None
        if self.speculator is not None:
            self.speculator.forget(request_id)
        return TokenDelta(request_id, (), (), None, reason, request.num_prompt_tokens,
                          request.num_cached_tokens)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or bool(self.scheduler.waiting_for_kv) or bool(self._held)

    def step(self) -> list[TokenDelta]:
        """Run one forward over the scheduled work; return one delta per request that
        produced tokens (and finished ones with their reason)."""
        outputs = self._settle_remote()
        self._release_followers()  # after the transfers settled: this step may admit them
        drafts: dict[str, Draft] = {}
        if self.speculator is not None:
            drafts = self.speculator.propose([r for r in self.scheduler.running if not r.is_prefilling])
        chunks = self.scheduler.schedule({request_id: d.token_ids for request_id, d in drafts.items()})
        if not chunks:
            return outputs
        started = time.perf_counter()
        # A chunk that starts inside the prompt is (part of) a prefill, or a recompute after
        # preemption; decode rows and speculative verifies start past it.
        prefill_tokens = sum(c.num_tokens for c in chunks if c.start < c.request.num_prompt_tokens)
        batch = build_forward_batch(chunks, self.info.block_size, self.runner.device)
        logits = StepLogits(chunks, self.runner.execute(batch))
        self.scheduler.update(chunks)
        for chunk in chunks:
            if chunk.request.wants_prompt_logprobs:
                chunk.request.record_prompt_logprobs(chunk.start, logits.prompt_logprobs(chunk))
        sampling = [c for c in chunks if c.samples]
        plain = [c for c in sampling if not c.draft]
        if plain:
            outputs += self._sample(plain, logits.sampled(plain))
        for chunk in sampling:
            if chunk.draft:
                outputs.append(self._verify(chunk, drafts[chunk.request.request_id], logits.verified(chunk)))
        self.num_steps += 1
        self.step_seconds += time.perf_counter() - started
        self.prompt_tokens_computed += prefill_tokens
        self.batch_requests_stepped += len(chunks)
        return outputs

    def _sample(self, chunks: list[ScheduledChunk], logits: torch.Tensor) -> list[TokenDelta]:
        """Sample one token for each chunk (row i of `logits` is chunk i's) and emit it."""
        requests = [c.request for c in chunks]
        out = self.sampler(logits, [r.params for r in requests], [r.generator_for_next_token() for r in requests],
                           requests, [r.grammar for r in requests])
        # One host copy per step, not one per row.
        token_ids, logprobs = out.token_ids.tolist(), out.logprobs.tolist()
        deltas = []
        for row, request in enumerate(requests):
            request.output_ids.append(token_ids[row])
            deltas.append(self._emit(request, logprobs[row], out.top_for(row, request.params.logprobs)))
        return deltas

    def _verify(self, chunk: ScheduledChunk, draft: Draft, logits: torch.Tensor) -> TokenDelta:
        """Verify the chunk's draft against `logits` (after its last committed token and
        each draft token) and emit the tokens kept."""
        request = chunk.request
        # The scheduler may have cut the draft short, and the grammar cuts it at its first
        # forbidden token; q is cut with it. The KV of the tokens cut is computed but never
        # committed.
        kept, masks = chunk.draft, None
        if request.grammar is not None:
            kept = kept[:request.grammar.validate_prefix(kept)]
            masks = request.grammar.masks_along(kept, logits.shape[1])
        probs = draft.probs[:len(kept)] if draft.probs is not None else None
        # Only requests whose controls do not depend on the draft position are speculated
        # (`Speculator.propose`): verify needs no history.
        verified = verify(logits[:len(kept) + 1], Draft(kept, probs), request.params,
                          request.generator_for_next_token(), masks)
        return self._emit_verified(request, chunk.draft, verified)

    def _emit_verified(self, request: Request, draft: tuple[int, ...], verified: Verified) -> TokenDelta:
        """Append a verified run of tokens, stopping at the first that ends the request;
        commit the KV of the accepted draft tokens that were kept."""
        reason, kept = None, 0
        for token in verified.token_ids:
            request.output_ids.append(token)
            kept += 1
            reason = self._advance(request, token)
            if reason is not None:
                break
        self.scheduler.commit_draft(request, min(verified.num_accepted, kept - 1))
        self.speculator.record(request.request_id, len(draft), verified.num_accepted)
        if reason is not None:
            self.finish_request(request.request_id, reason)
        tops = verified.top_logprobs[:kept] if verified.top_logprobs is not None else None
        return TokenDelta(request.request_id, verified.token_ids[:kept], verified.logprobs[:kept], tops,
                          reason, request.num_prompt_tokens, request.num_cached_tokens)

    def _advance(self, request: Request, token: int) -> FinishReason | None:
        """`token` was just appended to the request's output: move its grammar past it, and
        say why the request ends here (None: it goes on)."""
        if request.grammar is not None:
            if not request.grammar.accept(token):
                log.error("request %s: token %d is not allowed by its grammar: %s", request.request_id, token,
                          request.grammar.error)
                return FinishReason.ERROR
            if request.grammar.is_terminated:
                return FinishReason.STOP
        reason = check_stop_token(token, request.num_output_tokens, request.params, self.info.eos_token_ids,
                                  request.output_offset)
        if reason is None and request.num_tokens >= self.info.max_model_len:
            reason = FinishReason.LENGTH
        return reason

    def _settle_remote(self) -> list[TokenDelta]:
        if self.remote is None:
            return []
        started, failed = self.remote.poll()
        for request, done, waited in started:
            # The prefill worker drew the first token (seeded draws are keyed by position).
            failed.append(self._emit(request, done.logprob, done.top_logprobs or None)._replace(
                kv_wait_seconds=waited))
        return failed

    def _emit(self, request: Request, logprob: float, top) -> TokenDelta:
        """The delta for the token just appended to `request`; finishes it if that token
        ends it. The first token's delta carries the prompt logprobs asked for."""
        token = request.output_ids[-1]
        reason = self._advance(request, token)
        if reason is not None:
            self.finish_request(request.request_id, reason)
        prompt_logprobs = None
        if request.num_output_tokens == 1 and request.asked_prompt_logprobs:
            # Handed over once: the request need not hold them while it decodes.
            prompt_logprobs, request.prompt_logprobs = tuple(request.prompt_logprobs), []
        return TokenDelta(request.request_id, (token,), (logprob,), (top,) if top else None, reason,
                          request.num_prompt_tokens, request.num_cached_tokens, prompt_logprobs=prompt_logprobs)


