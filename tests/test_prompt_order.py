"""The scheduler's prompt order: first come, first served, or earliest due on the prompt
clock (`SchedulerConfig.prompt_deadline_factor`). Pure scheduling: no model runs; a step's
chunks are marked computed with `update`."""

from __future__ import annotations

import pytest
import torch

from pdserve.runtime.config import ConfigError, RuntimeInfo, SchedulerConfig
from pdserve.runtime.request import Request, resumed_arrival
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.scheduler import BatchScheduler

BLOCK = 16


def _scheduler(factor: float, budget: int = 64, chunk: int = 64, blocks: int = 256) -> BatchScheduler:
    info = RuntimeInfo(num_blocks=blocks, block_size=BLOCK, max_model_len=4096, eos_token_ids=frozenset(),
                       bos_token_id=None, device=torch.device("cpu"))
    config = SchedulerConfig(max_num_batched_tokens=budget, max_prefill_chunk=chunk, prompt_deadline_factor=factor)
    return BatchScheduler(config, info, enable_prefix_caching=False)


def _request(name: str, prompt_tokens: int, **kwargs) -> Request:
    # distinct tokens per request: no shared prefix
    base = 1000 * (1 + sum(map(ord, name)) % 40)
    return Request(name, [base + i for i in range(prompt_tokens)], SamplingParams(max_tokens=4, ignore_eos=True),
                   **kwargs)


def _step(scheduler: BatchScheduler) -> list[tuple[str, int]]:
    chunks = scheduler.schedule()
    scheduler.update(chunks)
    return [(c.request.request_id, c.num_tokens) for c in chunks]


def _first_token_steps(scheduler: BatchScheduler, steps: int) -> dict[str, int]:
    """Step `steps` times; the step at which each request's prompt was computed in full."""
    done: dict[str, int] = {}
    for i in range(steps):
        _step(scheduler)
        for request in scheduler.running:
            if not request.is_prefilling and request.request_id not in done:
                done[request.request_id] = i
    return done


def test_first_come_first_served_by_default():
    scheduler = _scheduler(0.0)
    scheduler.add(_request("long", 256))
    assert _step(scheduler) == [("long", 64)]
    scheduler.add(_request("short", 16))
    # the long prompt keeps the step's budget until it is done
    assert _step(scheduler) == [("long", 64)]
    assert _step(scheduler) == [("long", 64)]
    assert _step(scheduler) == [("long", 64)]
    assert _step(scheduler)[-1] == ("short", 16)


def test_a_short_prompt_overtakes_a_long_one_half_computed():
    scheduler = _scheduler(4.0)
    scheduler.add(_request("long", 256))
    assert _step(scheduler) == [("long", 64)]
    scheduler.add(_request("short", 16))  # due at 64 + 4 x 16 = 128; the long one at 0 + 4 x 256
    # the short one is admitted ahead of the long one and finishes its prompt alone: the
    # long one's next chunk would make its first token wait
    assert _step(scheduler) == [("short", 16)]
    assert ("long", 64) in _step(scheduler)  # resumed a step later
    assert scheduler.prompt_clock == 64 + 16 + 64


def _prompt_clock_at_first_token(scheduler: BatchScheduler, steps: int) -> dict[str, int]:
    """Step `steps` times; the prompt tokens computed by the end of the step in which each
    request's prompt was computed in full (time, measured in prompt work)."""
    done: dict[str, int] = {}
    for _ in range(steps):
        _step(scheduler)
        for request in scheduler.running:
            if not request.is_prefilling:
                done.setdefault(request.request_id, scheduler.prompt_clock)
    return done


def test_deadline_order_computes_queued_prompts_one_after_another():
    """Two 256-token prompts queued together, a budget of 256 and chunks of 64: first come,
    first served computes them side by side, both done after 512 prompt tokens; deadline
    order computes a chunk's worth per step, the first done after 256 and the second after
    512."""
    for factor, expected in ((0.0, {"a": 512, "b": 512}), (4.0, {"a": 256, "b": 512})):
        scheduler = _scheduler(factor, budget=256, chunk=64)
        scheduler.add(_request("a", 256))
        scheduler.add(_request("b", 256))
        assert _prompt_clock_at_first_token(scheduler, 8) == expected
    # a step in deadline order: one chunk's worth, several prompts when they are short
    # (not a part of the third: the step finishes prompts, so it carries only finished ones)
    scheduler = _scheduler(4.0, budget=256, chunk=64)
    for name in ("c", "d", "e"):
        scheduler.add(_request(name, 24))
    assert _step(scheduler) == [("c", 24), ("d", 24)]
    assert ("e", 24) in _step(scheduler)  # the next step


def test_prompts_finished_in_a_step_batch_together():
    scheduler = _scheduler(4.0, budget=256, chunk=256)
    scheduler.add(_request("long", 1000))
    _step(scheduler)
    for name in ("a", "b", "c"):
        scheduler.add(_request(name, 40))
    # all three finish in the step; the long one's chunk (due later) waits for the next
    assert _step(scheduler) == [("a", 40), ("b", 40), ("c", 40)]
    # first come, first served batches the long one's chunk first and the short ones behind it
    fcfs = _scheduler(0.0, budget=256, chunk=256)
    fcfs.add(_request("long", 1000))
    _step(fcfs)
    for name in ("a", "b", "c"):
        fcfs.add(_request(name, 40))
    assert _step(fcfs) == [("long", 256)]


def test_deadline_order_never_starves_a_long_prompt():
    """Short prompts keep arriving, one per step, enough to fill the budget: the long
    prompt still gets served once the clock passes its due (factor x its length)."""
    factor, long_tokens = 2.0, 128
    scheduler = _scheduler(factor, budget=32, chunk=32)
    scheduler.add(_request("long", long_tokens))
    finished_long_at = None
    for i in range(200):
        scheduler.add(_request(f"s{i}", 32))
        _step(scheduler)
        long = scheduler.requests.get("long")
        if long is not None and not long.is_prefilling:
            finished_long_at = scheduler.prompt_clock
            break
        for request in list(scheduler.running):
            if not request.is_prefilling:
                scheduler.finish(request.request_id, None)
    assert finished_long_at is not None
    # due at 256 on the clock; after that nothing new goes ahead of it: its 128 tokens
    # (and at most one step of others due before it) follow
    assert finished_long_at <= factor * long_tokens + long_tokens + 32


def test_shorter_prompts_finish_first_among_queued_ones():
    scheduler = _scheduler(8.0, budget=64, chunk=64)
    for name, tokens in (("a", 512), ("b", 384), ("c", 32), ("d", 64)):
        scheduler.add(_request(name, tokens))
    done = _first_token_steps(scheduler, 40)
    assert sorted(done, key=done.get) == ["c", "d", "b", "a"]
    # first come, first served: in arrival order
    fcfs = _scheduler(0.0, budget=64, chunk=64)
    for name, tokens in (("a", 512), ("b", 384), ("c", 32), ("d", 64)):
        fcfs.add(_request(name, tokens))
    done = _first_token_steps(fcfs, 40)
    assert sorted(done, key=done.get) == ["a", "b", "c", "d"]


def test_resumed_and_preempted_requests_stay_ahead_of_new_arrivals():
    scheduler = _scheduler(4.0, budget=64, chunk=64)
    scheduler.add(_request("short", 16))
    scheduler.add(_request("resumed", 200, arrival=resumed_arrival()))
    assert [r.request_id for r in scheduler.waiting] == ["resumed", "short"]
    # preemption: a pool of 5 blocks (80 tokens) that both prompts fill; their decodes
    # outgrow it and the younger arrival is the victim: it goes back ahead of a new one
    small = _scheduler(4.0, budget=64, chunk=64, blocks=5)
    small.add(_request("old", 40))
    small.add(_request("young", 24))
    young = small.requests["young"]
    for _ in range(20):
        chunks = small.schedule()
        small.update(chunks)
        for chunk in chunks:
            if not chunk.request.is_prefilling:
                chunk.request.output_ids.append(7)  # the token its logits would sample
        if young.num_preemptions:
            break
    assert young.num_preemptions == 1
    small.add(_request("newer", 8))  # due at once, but after a preempted request
    assert small.waiting[0] is young


def test_the_factor_is_checked():
    with pytest.raises(ConfigError, match="prompt_deadline_factor"):
        SchedulerConfig(prompt_deadline_factor=-1)
    with pytest.raises(ConfigError, match="prompt_deadline_factor"):
        SchedulerConfig(prompt_deadline_factor=float("nan"))
