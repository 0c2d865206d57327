"""`LLM`: the in-process offline API, named as vLLM users know it.

    from pdserve import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    outputs = llm.generate(["Hello", "The sky is"], SamplingParams(max_tokens=32))

All prompts of one call run through the continuous-batching engine together; outputs come
back in prompt order. `stream` yields one prompt's text as it is generated (what
`pdserve generate` prints).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import CacheConfig, DeviceConfig, SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.request import TokenDelta
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason
from pdserve.runtime.structured_output import GrammarCompiler
from pdserve.runtime.text_stream import TextStream
from pdserve.runtime.tokenizer import Tokenizer
from pdserve.runtime.weights.checkpoint import DEFAULT_MODEL


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
        quantization: str = "auto",
        kv_cache_dtype: str = "auto",
    ) -> None:
        """`quantization`: how weights are held (see DeviceConfig.quantization): auto,
        none, gguf (or q4), int8. `kv_cache_dtype`: how the KV cache is stored (see
        CacheConfig.kv_cache_dtype): auto, int8, fp8."""
        cache = CacheConfig(block_size=block_size, num_blocks=num_kv_blocks,
                            memory_bytes=kv_cache_memory_bytes, kv_cache_dtype=kv_cache_dtype)
        scheduler = SchedulerConfig(max_num_seqs=max_num_seqs,
                                    max_num_batched_tokens=max_num_batched_tokens,
                                    max_prefill_chunk=min(max_prefill_chunk, max_num_batched_tokens))
        self._loaded = load_model(model, cache=cache, max_model_len=max_model_len,
                                  device_config=DeviceConfig(device="cpu", dtype=torch.float32,
                                                             quantization=quantization))
        grammars = GrammarCompiler(self._loaded.tokenizer, self._loaded.runner.config.vocab_size,
                                   self._loaded.info.eos_token_ids)
        self.engine = EngineCore(self._loaded.runner, self._loaded.info, scheduler, enable_prefix_caching,
                                 grammars=grammars)
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

    def stream(self, prompt_token_ids: Sequence[int],
               sampling_params: SamplingParams | None = None) -> Iterator[tuple[str, RequestOutput]]:
        """Queue one prompt now (raises ValueError if it can never run here) and return an
        iterator of (text that became final, the output so far), one per engine step that
        produced tokens; the last has its finish_reason set. Closing the iterator early
        aborts the request."""
        requests = self._add([None], [list(prompt_token_ids)], [sampling_params or SamplingParams()])
        return _texts(self._steps(requests))

    def _run(self, texts, token_lists, sampling_params) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(token_lists)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(token_lists):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(token_lists)} prompts; "
                                 "give one for all or one per prompt")
        requests = self._add(texts, token_lists, params_list)
        for _ in self._steps(requests):
            pass
        return [output for output, _ in requests.values()]

    def _add(self, texts, token_lists, params_list) -> dict[str, tuple[RequestOutput, TextStream]]:
        """Queue the prompts; their outputs and text streams by request id, in prompt order.
        On an error none of them is left queued."""
        requests: dict[str, tuple[RequestOutput, TextStream]] = {}
        try:
            for text, ids, params in zip(texts, token_lists, params_list):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, ids, params)
                requests[request_id] = (RequestOutput(request_id, text, ids, "", [], "", [], 0),
                                        TextStream(self._loaded.tokenizer, params, self._loaded.info.eos_token_ids))
        except BaseException:
            self._abort(requests)
            raise
        return requests

    def _steps(self, requests: dict[str, tuple[RequestOutput, TextStream]]) -> Iterator[tuple[str, str, RequestOutput]]:
        """Step the engine until every request ended; yield (request id, text that became
        final, its output so far) per engine delta."""
        try:
            with torch.inference_mode():
                while self.engine.has_unfinished:
                    for delta in self.engine.step():
                        output, stream = requests[delta.request_id]
                        text = self._consume(delta, output, stream)
                        output.text = stream.text
                        yield delta.request_id, text, output
        except BaseException:  # an error, or the caller left early: leave nothing running
            self._abort(requests)
            raise

    def _abort(self, requests) -> None:
        for request_id in requests:
            self.engine.finish_request(request_id, FinishReason.ABORT)

    def _consume(self, delta: TokenDelta, output: RequestOutput, stream: TextStream) -> str:
        output.token_ids.extend(delta.token_ids)
        output.logprobs.extend(delta.logprobs)
        output.num_cached_tokens = delta.num_cached_tokens
        text, _, finish = stream.take(delta.token_ids, delta.finish_reason)
        if finish is FinishReason.STOP and delta.finish_reason is None:
            self.engine.finish_request(delta.request_id, FinishReason.STOP)  # a stop string
        if finish is not None:
            output.finish_reason = finish.value
        return text


def _texts(steps: Iterator[tuple[str, str, RequestOutput]]) -> Iterator[tuple[str, RequestOutput]]:
    with contextlib.closing(steps):  # closing this closes the steps, which aborts the request
        for _, text, output in steps:
            yield text, output
