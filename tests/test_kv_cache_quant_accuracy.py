"""Accuracy of an int8 / fp8 KV cache on the real SmolLM2 GGUF: perplexity over
tests/data/perplexity_text.txt within 1% of the float32 cache's, and how far greedy
continuations of a few chat prompts agree with the float32 cache's.

Perplexity is one prefill of the whole text (runtime/perplexity.py): every position's
keys and values are stored quantized and read back dequantized by attention, as they
are while decoding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_runs import run_to_completion

from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import CacheConfig, DeviceConfig, SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.perplexity import perplexity
from pdserve.runtime.sampling_params import SamplingParams

TEXT = Path(__file__).parent / "data" / "perplexity_text.txt"
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
             "What is 12 times 12?", "Explain what a lighthouse does in one sentence."]
GREEDY_TOKENS = 48


@pytest.fixture(scope="module")
def smollm2_by_kv_dtype():
    return {dtype: load_model("smollm2-135m-instruct", cache=CacheConfig(num_blocks=160, kv_cache_dtype=dtype),
                              device_config=DeviceConfig(device="cpu"))
            for dtype in ("auto", "int8", "fp8")}


def _greedy(loaded) -> list[list[int]]:
    tokenizer = loaded.tokenizer
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
    engine = EngineCore(loaded.runner, loaded.info, SchedulerConfig(max_num_batched_tokens=256, max_prefill_chunk=256),
                        enable_prefix_caching=False)
    requests = {str(i): (tokenizer.encode_chat([{"role": "user", "content": q}]), params)
                for i, q in enumerate(QUESTIONS)}
    out = run_to_completion(engine, requests)
    return [out[str(i)] for i in range(len(QUESTIONS))]


def _first_divergence(ours: list[int], reference: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), len(reference))


@pytest.mark.slow
def test_smollm2_kv_cache_quantization_keeps_perplexity_within_one_percent(smollm2_by_kv_dtype):
    dense = smollm2_by_kv_dtype["auto"]
    assert not dense.runner.pool.quantized
    tokens = dense.tokenizer.encode(TEXT.read_text(), add_special_tokens=False)[:2048]
    assert len(tokens) > 1500
    ppl = {dtype: perplexity(loaded.runner, tokens) for dtype, loaded in smollm2_by_kv_dtype.items()}
    reference = _greedy(dense)
    divergence = {dtype: [_first_divergence(ours, theirs) for ours, theirs in zip(_greedy(loaded), reference)]
                  for dtype, loaded in smollm2_by_kv_dtype.items() if dtype != "auto"}
    print(f"\nperplexity over {len(tokens)} tokens: " + ", ".join(f"{d} {p:.4f}" for d, p in ppl.items()))
    print(f"greedy first divergence from the float32 cache (of {GREEDY_TOKENS}): {divergence}")
    assert 3 < ppl["auto"] < 60, ppl  # a real model reading real text
    assert ppl["int8"] == pytest.approx(ppl["auto"], rel=0.01)
    assert ppl["fp8"] == pytest.approx(ppl["auto"], rel=0.01)
