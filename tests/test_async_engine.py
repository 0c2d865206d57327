"""Streaming through `AsyncEngine`: concurrent streams, cancellation, rejections."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import CacheConfig, SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), cache=CacheConfig(block_size=4, num_blocks=256))
    core = EngineCore(loaded.runner, loaded.info, SchedulerConfig(max_prefill_chunk=8, max_num_batched_tokens=32),
                      enable_prefix_caching=False)
    engine = AsyncEngine(core)
    yield engine
    engine.shutdown()


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_concurrent_streams_equal_their_solo_runs(engine):
    prompts = [[5, 6, 7, 8, 9], list(range(10, 40)), [42]]

    async def collect(prompt):
        tokens, reasons = [], []
        async for chunk in engine.generate(prompt, _greedy(9)):
            tokens.extend(chunk.token_ids)
            reasons.append(chunk.finish_reason)
        return tokens, reasons

    async def together():
        return await asyncio.gather(*(collect(p) for p in prompts))

    async def one_by_one():
        return [await collect(p) for p in prompts]

    concurrent, solo = asyncio.run(together()), asyncio.run(one_by_one())
    assert concurrent == solo
    for tokens, reasons in concurrent:
        assert len(tokens) == 9
        assert reasons[-1] is FinishReason.LENGTH and all(r is None for r in reasons[:-1])


def test_leaving_a_stream_aborts_the_request_and_frees_its_blocks(engine):
    allocator = engine.core.scheduler.allocator

    async def scenario():
        received = 0
        stream = engine.generate(list(range(5, 25)), _greedy(200), request_id="cancel-me")
        async for _ in stream:
            received += 1
            if received == 3:
                break
        await stream.aclose()
        for _ in range(200):  # the engine thread applies the abort before its next step
            if not engine.core.scheduler.requests:
                break
            await asyncio.sleep(0.01)
        return received

    assert asyncio.run(scenario()) == 3
    assert "cancel-me" not in engine.core.scheduler.requests
    assert allocator.num_used == 0


def test_abort_from_another_task_ends_the_stream_with_abort(engine):
    async def scenario():
        chunks = []

        async def consume():
            async for chunk in engine.generate([7, 8, 9], _greedy(500), request_id="victim"):
                chunks.append(chunk)
                if len(chunks) == 2:
                    engine.abort("victim")

        await asyncio.wait_for(consume(), timeout=60)
        return chunks

    chunks = asyncio.run(scenario())
    assert chunks[-1].finish_reason is FinishReason.ABORT
    assert len(chunks) < 500


def test_rejected_request_raises_in_the_caller(engine):
    async def scenario():
        async for _ in engine.generate([], _greedy(1)):
            pass

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(scenario())
