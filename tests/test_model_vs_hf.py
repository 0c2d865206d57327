"""pdserve's runtime against HF transformers on the same tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
from hf_oracle import explain_divergence, hf_greedy, hf_logits
from transformers import AutoModelForCausalLM

from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import CacheConfig, DeviceConfig, SchedulerConfig
from pdserve.runtime.forward_batch import ForwardBatch, SeqChunk
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams

# Logits of the two implementations differ only by float32 reduction order (fused q/k/v
# and gate/up matmuls, paged gather vs contiguous attention); over a few layers of width
# 64 that stays below 1e-4 on logits of magnitude ~1-10.
LOGIT_ATOL = 1e-4

PROMPT_LENGTHS = [1, 3, 8, 13, 21, 34]


# Each model eager and with compiled layers (torch.compile): both must match the oracle.
@pytest.fixture(scope="module", params=[("tiny_llama_dir", False), ("tiny_qwen2_dir", False),
                                        ("tiny_llama_dir", True), ("tiny_qwen2_dir", True)],
                ids=["llama", "qwen2", "llama-compiled", "qwen2-compiled"])
def models(request):
    fixture, compiled = request.param
    path = request.getfixturevalue(fixture)
    ours = load_model(str(path), cache=CacheConfig(block_size=4, num_blocks=512),
                      device_config=DeviceConfig(device="cpu", compile=compiled))
    assert ours.runner.placement.compiled == compiled
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, hf


def _prompts(vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def test_logits_of_a_mixed_batch_match(models):
    ours, hf = models
    runner, block_size = ours.runner, ours.info.block_size
    a, b, c = _prompts(ours.runner.config.vocab_size)[3:]
    tables = [list(range(i * 16, i * 16 + 16)) for i in range(3)]
    a_next, b_next = 7, 11
    # Step 1: prompts a and b whole, and the first 10 tokens of c (no logits needed).
    step1 = ForwardBatch.build([
        SeqChunk(a, 0, tables[0], True), SeqChunk(b, 0, tables[1], True),
        SeqChunk(c[:10], 0, tables[2], False),
    ], block_size, "cpu")
    logits1 = runner.execute(step1)
    # Step 2: a and b decode one token each while c's prompt finishes.
    step2 = ForwardBatch.build([
        SeqChunk([a_next], len(a), tables[0], True), SeqChunk([b_next], len(b), tables[1], True),
        SeqChunk(c[10:], 10, tables[2], True),
    ], block_size, "cpu")
    logits2 = runner.execute(step2)
    expected = [hf_logits(hf, a)[-1], hf_logits(hf, b)[-1]]
    expected2 = [hf_logits(hf, a + [a_next])[-1], hf_logits(hf, b + [b_next])[-1], hf_logits(hf, c)[-1]]
    torch.testing.assert_close(logits1, torch.stack(expected), atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(logits2, torch.stack(expected2), atol=LOGIT_ATOL, rtol=0)


def test_greedy_tokens_of_a_mixed_batch_match_generate(models):
    ours, hf = models
    prompts = _prompts(ours.runner.config.vocab_size)
    max_tokens = 12
    # Small chunks and a small token budget force chunked prefill beside decoding.
    engine = EngineCore(ours.runner, ours.info, SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=24, max_prefill_chunk=8), enable_prefix_caching=False)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs = {str(i): [] for i in range(len(prompts))}
    mixed_steps = 0
    while engine.has_unfinished:
        running = engine.scheduler.running
        prefilling = sum(r.is_prefilling for r in running)
        for chunk in engine.step():
            outputs[chunk.request_id].extend(chunk.token_ids)
        mixed_steps += bool(prefilling and len(running) > prefilling)
    assert mixed_steps > 0, "the schedule never mixed prefill with decode"
    assert engine.scheduler.allocator.num_used == 0
    for i, prompt in enumerate(prompts):
        expected = hf_greedy(hf, prompt, max_tokens)
        got = outputs[str(i)]
        assert got == expected, explain_divergence(hf, prompt, got, expected)


def test_prompt_longer_than_context_is_rejected(models):
    ours, _ = models
    engine = EngineCore(ours.runner, ours.info)
    too_long = [1] * ours.info.max_model_len
    with pytest.raises(ValueError, match=f"prompt has {len(too_long)} tokens but the model's context is"):
        engine.add_request("x", too_long, SamplingParams())
