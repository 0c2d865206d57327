"""`EngineCore`: the synchronous heart of a decode worker.

One step is three calls: `scheduler.schedule()` -> `runner.execute(batch)` ->
`_postprocess()`. The core is single-threaded; `AsyncEngine` drives it from a thread and
`LLM` drives it in a loop.
"""

from __future__ import annotations

from pdserve.decode_worker.scheduler import Scheduler
from pdserve.runtime.config import RuntimeInfo, SchedulerConfig
from pdserve.runtime.forward_batch import ForwardBatch, SeqChunk
from pdserve.runtime.model_runner import ModelRunner
from pdserve.runtime.request import Request, TokenChunk
from pdserve.runtime.sampler import Sampler, SamplerOutput, make_generator
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason, check_stop_token


class EngineCore:
    def __init__(
        self,
        runner: ModelRunner,
        info: RuntimeInfo,
        config: SchedulerConfig | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.runner = runner
        self.info = info
        self.scheduler = Scheduler(config or SchedulerConfig(), info, enable_prefix_caching)
        self.sampler = Sampler()

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request for local prefill and decode. Raises RequestRejected (a
        ValueError saying why) if it can never run here."""
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request(request_id, list(prompt_ids), params,
                          make_generator(params.seed, self.runner.pool.kv.device))
        self.scheduler.add(request)
        return request

    def finish_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> TokenChunk | None:
        """End a request now (abort, or a stop string found by the caller); its blocks are
        free when this returns. Returns its final chunk, or None if it had already ended."""
        request = self.scheduler.finish(request_id, reason)
        if request is None:
            return None
        return TokenChunk(request_id, (), (), None, reason, request.num_prompt_tokens,
                          request.num_cached_tokens)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[TokenChunk]:
        """Run one forward over the scheduled work; return one chunk per request that
        produced a token (and finished ones with their reason)."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        batch = ForwardBatch.build(
            [SeqChunk(c.request.token_ids(c.start, c.start + c.num_tokens), c.start,
                      c.request.block_table, c.samples) for c in chunks],
            self.info.block_size, self.runner.pool.kv.device)
        logits = self.runner.execute(batch)
        self.scheduler.update(chunks)
        sampling = [c.request for c in chunks if c.samples]
        if not sampling:
            return []
        out = self.sampler(logits, [r.params for r in sampling], [r.generator for r in sampling])
        return [self._append_token(request, out, row) for row, request in enumerate(sampling)]

    def _append_token(self, request: Request, out: SamplerOutput, row: int) -> TokenChunk:
        token = int(out.token_ids[row])
        request.output_ids.append(token)
        reason = check_stop_token(token, request.num_output_tokens, request.params,
                                  self.info.eos_token_ids)
        if reason is None and request.num_tokens >= self.info.max_model_len:
            reason = FinishReason.LENGTH
        top = None
        if out.top_logprob_ids is not None and request.params.logprobs:
            n = request.params.logprobs
            top = (tuple(zip(out.top_logprob_ids[row, :n].tolist(), out.top_logprobs[row, :n].tolist())),)
        if reason is not None:
            self.scheduler.finish(request.request_id, reason)
        return TokenChunk(request.request_id, (token,), (float(out.logprobs[row]),), top, reason,
                          request.num_prompt_tokens, request.num_cached_tokens)

