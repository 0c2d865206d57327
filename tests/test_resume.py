"""A request continued from elsewhere (`resume_at`, what a migration sends): its output
continues exactly - greedy and seeded alike - and it queues ahead of new arrivals."""

from __future__ import annotations

import pytest

from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import CacheConfig, SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), cache=CacheConfig(block_size=4, num_blocks=256))


def _run(engine: EngineCore, request_id: str, prompt: list[int], params: SamplingParams,
         resume_at: int | None = None) -> list[int]:
    engine.add_request(request_id, prompt, params, resume_at)
    tokens = []
    while engine.has_unfinished:
        for delta in engine.step():
            tokens.extend(delta.token_ids)
    return tokens


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "seed": 77},
                                      {"temperature": 1.0, "top_k": 20, "seed": 3}])
@pytest.mark.parametrize("cut", [1, 7, 19])
def test_a_resumed_request_continues_exactly(loaded, sampling, cut):
    engine = EngineCore(loaded.runner, loaded.info, enable_prefix_caching=False)
    prompt = [5, 17, 42, 99, 100, 7, 8]
    whole = _run(engine, "whole", prompt, SamplingParams(max_tokens=24, ignore_eos=True, **sampling))
    rest = _run(engine, "rest", prompt + whole[:cut],
                SamplingParams(max_tokens=24 - cut, ignore_eos=True, **sampling), resume_at=cut)
    assert whole[:cut] + rest == whole


def test_a_seeded_stream_does_not_depend_on_the_engine_that_draws_it(loaded):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    first = _run(EngineCore(loaded.runner, loaded.info), "a", [3, 4, 5], params)
    second = _run(EngineCore(loaded.runner, loaded.info), "b", [3, 4, 5], params)
    assert first == second  # a seed is a pure function of (seed, position), not of the engine


def test_a_resumed_request_queues_ahead_of_new_arrivals(loaded):
    engine = EngineCore(loaded.runner, loaded.info, SchedulerConfig(max_num_seqs=1))
    params = SamplingParams(max_tokens=4, temperature=0.0)
    for i in range(3):
        engine.add_request(f"new-{i}", [10 + i, 11, 12], params)
    engine.add_request("moved-1", [20, 21, 22, 23], params, resume_at=2)
    engine.add_request("moved-2", [30, 31, 32], params, resume_at=0)
    waiting = [r.request_id for r in engine.scheduler.waiting]
    assert waiting == ["moved-1", "moved-2", "new-0", "new-1", "new-2"]
