"""`LLM`: the in-process offline API, named as vLLM users know it.

    from pdserve import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    outputs = llm.generate(["Hello", "The sky is"], SamplingParams(max_tokens=32))

All prompts of one call run through the continuous-batching engine together; outputs come
back in prompt order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.decode_worker.engine import EngineCore
from pdserve.runtime.config import CacheConfig, SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason
from pdserve.runtime.text_stream import TextStream
from pdserve.runtime.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float]
    num_cached_tokens: int  # prompt tokens served from the prefix cache


class LLM:
    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_prefill_chunk: int = 512,
        block_size: int = 16,
        kv_cache_memory_bytes: int = 512 * 1024**2,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        cache = CacheConfig(block_size=block_size, num_blocks=num_kv_blocks,
                            memory_bytes=kv_cache_memory_bytes)
        scheduler = SchedulerConfig(max_num_seqs=max_num_seqs,
                                    max_num_batched_tokens=max_num_batched_tokens,
                                    max_prefill_chunk=min(max_prefill_chunk, max_num_batched_tokens))
        self._loaded = load_model(model, cache=cache, max_model_len=max_model_len)
        self.engine = EngineCore(self._loaded.runner, self._loaded.info, scheduler, enable_prefix_caching)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self._loaded.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids) at once; outputs in prompt order.
        One SamplingParams applies to all prompts, or give one per prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        token_lists = [self._loaded.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str)
                       else [int(t) for t in p] for p in prompts]
        return self._run(texts, token_lists, sampling_params)

    def chat(
        self,
        messages: Sequence[dict] | Sequence[Sequence[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Like `generate`, for one conversation or a list of them, rendered with the
        model's chat template and a generation prompt."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self._loaded.tokenizer
        texts = [tokenizer.apply_chat_template(list(c)) for c in conversations]
        return self._run(texts, [tokenizer.encode(t) for t in texts], sampling_params)

    def _run(self, texts, token_lists, sampling_params) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(token_lists)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(token_lists):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(token_lists)} prompts; "
                                 "give one for all or one per prompt")
        outputs: dict[str, RequestOutput] = {}
        streams: dict[str, TextStream] = {}
        order = []
        try:
            for text, ids, params in zip(texts, token_lists, params_list):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, ids, params)
                order.append(request_id)
                outputs[request_id] = RequestOutput(request_id, text, ids, "", [], "", [], 0)
                streams[request_id] = TextStream(self._loaded.tokenizer, params, self._loaded.info.eos_token_ids)
            with torch.inference_mode():
                while self.engine.has_unfinished:
                    for chunk in self.engine.step():
                        self._consume(chunk, outputs[chunk.request_id], streams[chunk.request_id])
        except BaseException:
            for request_id in order:  # leave nothing running behind an error
                self.engine.finish_request(request_id, FinishReason.ABORT)
            raise
        for request_id, stream in streams.items():
            outputs[request_id].text = stream.text
        return [outputs[r] for r in order]

    def _consume(self, chunk, output: RequestOutput, stream: TextStream) -> None:
        output.token_ids.extend(chunk.token_ids)
        output.logprobs.extend(chunk.logprobs)
        output.num_cached_tokens = chunk.num_cached_tokens
        for token in chunk.token_ids:
            stream.push(token)
            if stream.stopped:
                break
        if stream.stopped:
            if chunk.finish_reason is None:
                self.engine.finish_request(chunk.request_id, FinishReason.STOP)
            output.finish_reason = FinishReason.STOP.value
        elif chunk.finish_reason is not None:
            stream.finish()
            output.finish_reason = chunk.finish_reason.value
