"""Speculative decoding in the decode engine: greedy output is token-identical with it on
or off, sampled output keeps its distribution, and no KV block leaks."""

from __future__ import annotations

import math

import pytest
import torch
from engine_runs import run_to_completion

from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams

BLOCK = 4


def _engine(model_dir, speculative, num_blocks=512, **scheduler):
    loaded = load_model(str(model_dir), cache=CacheConfig(block_size=BLOCK, num_blocks=num_blocks))
    return EngineCore(loaded.runner, loaded.info, SchedulerConfig(**scheduler), speculative=speculative)


_run = run_to_completion


def _repetitive(seed: int, n: int) -> list[int]:
    """Prompts with repeated phrases, so that prompt lookup finds matches."""
    phrase = [(seed * 37 + i * 11) % 250 + 40 for i in range(7)]
    return (phrase * (n // 7 + 1))[:n]


def _used_blocks(engine: EngineCore) -> int:
    s = engine.scheduler
    return s.allocator.num_used - s.prefix_cache.num_cached_blocks


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_greedy_output_is_identical_with_speculation(request, model, k):
    model_dir = request.getfixturevalue(model)
    greedy = {"temperature": 0.0, "ignore_eos": True}
    requests = {
        f"r{i}": (_repetitive(i, 20 + 9 * i), SamplingParams(max_tokens=12 + 5 * i, **greedy)) for i in range(5)
    }
    requests["opted-out"] = (_repetitive(9, 30), SamplingParams(max_tokens=20, speculate=False, **greedy))
    requests["long-prefill"] = (list(range(40, 140)), SamplingParams(max_tokens=9, **greedy))  # chunked
    # The model's own greedy continuation repeats itself: prompt lookup finds it.
    requests["stop-token"] = (_repetitive(3, 40), SamplingParams(max_tokens=30, temperature=0.0))
    baseline = _run(_engine(model_dir, None, max_prefill_chunk=16, max_num_batched_tokens=48), requests)
    engine = _engine(model_dir, SpeculativeConfig(num_tokens=k, ngram_min=1),
                     max_prefill_chunk=16, max_num_batched_tokens=48)
    assert _run(engine, requests) == baseline
    assert engine.speculator.proposed > 0, "the prompts are repetitive: drafts must have been proposed"
    assert _used_blocks(engine) == 0


def test_stop_token_and_max_tokens_inside_an_accepted_run(tiny_llama_dir):
    """A model continuing its own repetition: drafts are accepted in runs; a stop token
    or max_tokens in the middle of one ends the output exactly there."""
    prompt = _repetitive(5, 60)
    plain = _run(_engine(tiny_llama_dir, None), {"a": (prompt, SamplingParams(max_tokens=40, temperature=0.0,
                                                                              ignore_eos=True))})["a"]
    stop_token = plain[len(plain) // 2]
    cut = plain[:plain.index(stop_token) + 1]
    cases = {
        "stop": (prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                        stop_token_ids=[stop_token])),
        "max": (prompt, SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)),
    }
    engine = _engine(tiny_llama_dir, SpeculativeConfig(num_tokens=5, ngram_min=1))
    out = _run(engine, cases)
    assert out["stop"] == cut
    assert out["max"] == plain[:7]
    assert _used_blocks(engine) == 0


def test_rejected_tokens_never_reach_the_prefix_cache(tiny_llama_dir):
    """After a speculative run, every cached page holds tokens of the real sequence: a
    second identical request hits the cache and still produces the same output."""
    prompt = _repetitive(8, 33)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    engine = _engine(tiny_llama_dir, SpeculativeConfig(num_tokens=4, ngram_min=1))
    first = _run(engine, {"a": (prompt, params)})["a"]
    second_prompt = prompt + first[:20]
    again = _run(engine, {"b": (second_prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))})
    reference = _run(_engine(tiny_llama_dir, None), {"b": (second_prompt, SamplingParams(
        max_tokens=4, temperature=0.0, ignore_eos=True))})
    assert again == reference
    assert engine.scheduler.prefix_hit_tokens >= 48  # whole pages of prompt + output were reused


def _pair_counts(model_dir, speculative, seeds, prompt) -> dict[tuple[int, ...], int]:
    engine = _engine(model_dir, speculative, max_num_seqs=64)
    requests = {f"s{seed}": (prompt, SamplingParams(max_tokens=3, temperature=1.0, top_k=2, seed=seed,
                                                    ignore_eos=True)) for seed in seeds}
    out = _run(engine, requests)
    counts: dict[tuple[int, ...], int] = {}
    for tokens in out.values():
        counts[tuple(tokens[1:3])] = counts.get(tuple(tokens[1:3]), 0) + 1
    return counts, engine


def test_sampled_distribution_of_the_next_two_tokens_is_unchanged(tiny_llama_dir):
    """Two-sample chi-square test of homogeneity on the 2nd and 3rd output tokens (the
    1st comes from prefill, before any draft), temperature 1 with top_k 2: at most 4
    cells per token pair. Seeds are fixed, so the test is deterministic."""
    # The model's own greedy text: its followers are likely next tokens, so prompt
    # lookup proposes drafts that are sometimes accepted and sometimes rejected.
    seed_prompt = list(range(60, 80))
    greedy = _run(_engine(tiny_llama_dir, None), {"g": (seed_prompt, SamplingParams(
        max_tokens=80, temperature=0.0, ignore_eos=True))})["g"]
    prompt = seed_prompt + greedy
    seeds_off, seeds_on = range(1200), range(10_000, 11_200)
    off, _ = _pair_counts(tiny_llama_dir, None, seeds_off, prompt)
    on, engine = _pair_counts(tiny_llama_dir, SpeculativeConfig(num_tokens=2, ngram_min=1, max_batch_size=64),
                             seeds_on, prompt)
    assert engine.speculator.proposed > 300
    assert 50 < engine.speculator.accepted < engine.speculator.proposed - 50
    cells = sorted(set(off) | set(on))
    n_off, n_on = sum(off.values()), sum(on.values())
    statistic = 0.0
    for cell in cells:
        a, b = off.get(cell, 0), on.get(cell, 0)
        pooled = (a + b) / (n_off + n_on)
        for observed, total in ((a, n_off), (b, n_on)):
            expected = pooled * total
            statistic += (observed - expected) ** 2 / expected
    dof = len(cells) - 1
    p_value = 1.0 - torch.distributions.Chi2(torch.tensor(float(dof))).cdf(torch.tensor(statistic)).item()
    assert p_value > 0.01, (p_value, off, on)
    assert not math.isnan(p_value)
