"""The engine loop's liveness on its own thread: a bad command fails only its request, an
error publishing stats is survived, a hang shows as a growing heartbeat age, a crash as
a dead loop with its reason; and the worker-side fault plan that tests inject with."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import types

import pytest

from pdserve.cluster.workers.faults import EngineFault, InjectedCrash, planned_fault
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.draft_model import DraftModelProposer, draft_kv_share
from pdserve.engine.engine import EngineCore
from pdserve.prefill_worker.async_engine import AsyncPrefillEngine
from pdserve.runtime.config import CacheConfig, SpeculativeConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), cache=CacheConfig(block_size=4, num_blocks=256))


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


async def _collect(engine: AsyncEngine, prompt: list[int], request_id: str, n: int = 12) -> list[int]:
    tokens = []
    async for delta in engine.generate(prompt, _greedy(n), request_id=request_id):
        tokens.extend(delta.token_ids)
    return tokens


def test_a_command_that_raises_fails_only_its_request(loaded):
    core = EngineCore(loaded.runner, loaded.info)
    real_add = core.add_request

    def add_request(request_id, prompt_ids, params, *args, **kwargs):
        if request_id == "poison":
            real_add(request_id, prompt_ids, params, *args, **kwargs)  # half done: it holds state when it fails
            raise KeyError("a bug in admission")
        return real_add(request_id, prompt_ids, params, *args, **kwargs)

    core.add_request = add_request
    engine = AsyncEngine(core)
    try:
        async def run():
            return await asyncio.gather(_collect(engine, [5, 6, 7, 8], "ok-1"), _collect(engine, [9, 10], "poison"),
                                        _collect(engine, [11, 12, 13], "ok-2"), return_exceptions=True)

        ok1, poisoned, ok2 = asyncio.run(run())
        assert len(ok1) == 12 and len(ok2) == 12
        assert isinstance(poisoned, RuntimeError) and "a bug in admission" in str(poisoned)
        health = engine.health()
        assert health.alive and health.failure is None and health.num_errors == 1
        assert "poison" not in core.scheduler.requests  # its blocks went back
        assert asyncio.run(_collect(engine, [5, 6, 7, 8], "after")) == ok1  # still serving, same output
    finally:
        engine.shutdown()


def test_an_error_publishing_stats_is_survived_and_counted(loaded):
    calls = []

    def on_iteration(core):
        calls.append(core.num_steps)
        if len(calls) == 3:
            raise RuntimeError("a bug in a snapshot")

    engine = AsyncEngine(EngineCore(loaded.runner, loaded.info), on_iteration=on_iteration)
    try:
        assert len(asyncio.run(_collect(engine, [5, 6, 7], "r"))) == 12
        assert engine.health().alive and engine.health().num_errors == 1
    finally:
        engine.shutdown()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected crash
def test_a_hung_engine_shows_a_growing_heartbeat_age_and_a_crash_a_dead_loop(loaded):
    hung, release = threading.Event(), threading.Event()

    def hang(core):
        if core.num_steps >= 3:
            hung.set()
            release.wait()

    engine = AsyncEngine(EngineCore(loaded.runner, loaded.info), on_iteration=hang)
    try:
        # A client on its own thread keeps the request running (it ends at the shutdown).
        client = threading.Thread(target=lambda: asyncio.run(_collect(engine, [5, 6, 7], "stuck", 50)), daemon=True)
        client.start()
        assert hung.wait(60)
        time.sleep(1.2)
        health = engine.health()
        assert health.alive and health.heartbeat_age >= 1.2
    finally:
        release.set()
        engine.shutdown()

    fault = EngineFault("crash", at_step=2)
    crashing = AsyncEngine(EngineCore(loaded.runner, loaded.info), on_iteration=lambda core: fault.maybe_fire(
        core.num_steps))

    async def until_crash():
        async for _ in crashing.generate([5, 6, 7], _greedy(50), request_id="doomed"):
            pass

    with pytest.raises(Exception):  # noqa: B017 - the stream is left hanging: bounded by the wait below
        asyncio.run(asyncio.wait_for(until_crash(), 3.0))
    health = crashing.health()
    assert not health.alive and "InjectedCrash" in health.failure
    # An idle engine beats too: its heartbeat stays fresh while nothing runs.
    idle = AsyncEngine(EngineCore(loaded.runner, loaded.info))
    try:
        time.sleep(2.5)
        assert idle.health().alive and idle.health().heartbeat_age < 2.5
    finally:
        idle.shutdown()


def test_a_shut_down_engine_is_not_a_failure(loaded):
    engine = AsyncEngine(EngineCore(loaded.runner, loaded.info))
    engine.shutdown()
    health = engine.health()
    assert not health.alive and health.failure is None


def test_a_prefill_job_whose_command_raises_fails_alone(loaded):
    from pdserve.kv_transfer.messages import PrefillJob
    from pdserve.prefill_worker.engine import PrefillEngine

    class _NoPusher:
        bytes_sent, send_seconds = 0, 0.0

    engine = PrefillEngine(loaded.runner, loaded.info, _NoPusher())
    real_add = engine.add_job

    def add_job(job):
        raise KeyError("a bug in job admission")

    engine.add_job = add_job
    prefill = AsyncPrefillEngine(engine)
    try:
        ticket = types.SimpleNamespace(request_id="job-1")  # admission fails before reading the rest
        job = PrefillJob(ticket, "tcp://127.0.0.1:1", [1, 2, 3, 4], _greedy(1))
        with pytest.raises(RuntimeError, match="a bug in job admission"):
            asyncio.run(prefill.prefill(job))
        assert prefill.health().alive and prefill.health().num_errors == 1
    finally:
        engine.add_job = real_add
        prefill.shutdown()


def test_the_fault_plan_names_one_worker_and_refuses_typos():
    plan = "decode-0:hang@20, prefill-1:crash@3"
    assert planned_fault("decode-0", plan) == EngineFault("hang", 20)
    assert planned_fault("prefill-1", plan) == EngineFault("crash", 3)
    assert planned_fault("decode-1", plan) is None
    assert planned_fault("decode-0", "") is None
    for bad in ("decode-0:explode@3", "decode-0:hang", "decode-0:hang@x", "decode-0"):
        with pytest.raises(ValueError, match="PDSERVE_FAULT_PLAN"):
            planned_fault("decode-0", bad)
    EngineFault("crash", 5).maybe_fire(4)  # not yet
    with pytest.raises(InjectedCrash):
        EngineFault("crash", 5).maybe_fire(5)


def test_the_kv_memory_limit_covers_a_draft_pool(loaded):
    config = loaded.runner.config
    share = draft_kv_share(SpeculativeConfig(method="draft", draft_layers=1), config)
    assert share == pytest.approx(1 / config.num_layers)
    assert draft_kv_share(SpeculativeConfig(method="ngram"), config) == 0.0
    assert draft_kv_share(None, config) == 0.0
    from pdserve.runtime.kv_pool import KVPool

    memory = 2 * 1024**2
    target = KVPool.for_model(config, CacheConfig(block_size=4, memory_bytes=memory, draft_kv_share=share), "cpu")
    alone = KVPool.for_model(config, CacheConfig(block_size=4, memory_bytes=memory), "cpu")
    assert target.num_blocks < alone.num_blocks
    info = dataclasses.replace(loaded.info, num_blocks=target.num_blocks)
    draft = DraftModelProposer.from_target_layers(loaded.runner, info, 1)
    both = target.kv.numel() * target.kv.element_size() + draft.runner.pool.kv.numel() * \
        draft.runner.pool.kv.element_size()
    assert both <= memory
