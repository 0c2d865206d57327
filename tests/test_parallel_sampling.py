"""n sequences of one prompt (OpenAI's `n`, `best_of`) share the prompt's KV: computed and
transferred once, then served to the group's followers from the decode worker's prefix
cache. In the engine (`follows=`: held while the leader waits for its KV), over a prefill
-> decode pair in one process, through `LocalBackend.generate_group`, and through
`ClusterBackend.generate_group` with fake workers (the fakes of test_control_plane.py)."""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple

import pytest
import torch
from ray.exceptions import RayActorError
from test_control_plane import _controller, _Method, _Stream
from test_disaggregated import BLOCK, Pair

from pdserve.cluster.control.cluster_backend import ClusterBackend
from pdserve.cluster.control.controller import WorkerHandle
from pdserve.cluster.control.router import RoundRobin, Router
from pdserve.cluster.gateway.backend import LocalBackend
from pdserve.cluster.gateway.errors import RequestError
from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.cluster.workers.actors import Refused, WorkerInfo
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import EngineCore
from pdserve.kv_transfer import layout
from pdserve.kv_transfer.decode_side import OnTransferFailure
from pdserve.kv_transfer.messages import PrefillJob
from pdserve.kv_transfer.transports.select import PeerInfo
from pdserve.runtime.config import CacheConfig, SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.request import TokenDelta
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
# 10 tokens: two full pages of 4 and a partial one. A request computes at least its last
# prompt token, so a follower finds (10 - 1) // 4 * 4 = 8 tokens cached: every full page.
PROMPT = torch.randint(3, 300, (10,), generator=torch.Generator().manual_seed(21)).tolist()
FULL_PAGES_TOKENS = 8


def _engine(loaded, prefix_caching: bool = True) -> EngineCore:
    return EngineCore(loaded.runner, loaded.info, SchedulerConfig(max_num_batched_tokens=32, max_prefill_chunk=8),
                      enable_prefix_caching=prefix_caching)


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), cache=CacheConfig(block_size=BLOCK, num_blocks=256))


@pytest.fixture(scope="module")
def solo(loaded) -> list[int]:
    """PROMPT's greedy continuation, as one request on an engine without a prefix cache."""
    engine = _engine(loaded, prefix_caching=False)
    engine.add_request("solo", PROMPT, GREEDY)
    return _drain(engine).tokens["solo"]


class _Run(NamedTuple):
    tokens: dict[str, list[int]]  # request id -> its output tokens
    last: dict[str, TokenDelta]  # request id -> its final delta


def _drain(engine: EngineCore, pair: Pair | None = None, max_steps: int = 1000) -> _Run:
    """Step until nothing is left (the pair's prefill side too)."""
    run = _Run({}, {})
    for _ in range(max_steps):
        if pair is not None and pair.prefill.has_unfinished:
            pair.prefill.step()
        for delta in engine.step():
            run.tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
            run.last[delta.request_id] = delta
        if not engine.has_unfinished and (pair is None or not pair.prefill.has_unfinished):
            return run
        if pair is not None:
            time.sleep(0.001)  # let the pusher thread run
    raise AssertionError("the engine did not finish its requests")


def _unshared_blocks(scheduler) -> int:
    """Blocks in use beyond what the prefix cache holds (0 when nothing leaks)."""
    return scheduler.allocator.num_used - scheduler.prefix_cache.num_cached_blocks


# ------------------------------------------------------------------ engine, colocated


def test_a_greedy_group_decodes_like_one_request_and_computes_the_prompt_once(loaded, solo):
    engine = _engine(loaded)
    engine.add_request("lead", PROMPT, GREEDY)
    for i in (1, 2, 3):
        engine.add_request(f"f{i}", PROMPT, GREEDY, follows="lead")
    run = _drain(engine)
    assert run.tokens == {name: solo for name in ("lead", "f1", "f2", "f3")}
    # The leader computed the whole prompt; each follower found every full page cached.
    assert engine.scheduler.prefix_hit_tokens == 3 * FULL_PAGES_TOKENS
    assert [run.last[f"f{i}"].num_cached_tokens for i in (1, 2, 3)] == [FULL_PAGES_TOKENS] * 3
    assert run.last["lead"].num_cached_tokens == 0
    assert _unshared_blocks(engine.scheduler) == 0


def test_a_follower_of_an_unknown_leader_is_queued_at_once(loaded):
    engine = _engine(loaded)
    request = engine.add_request("orphan", PROMPT, GREEDY, follows="nobody")
    assert list(engine.scheduler.waiting) == [request]
    assert engine.num_held_followers == 0
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("orphan", PROMPT, GREEDY, follows="nobody")
    engine.finish_request("orphan")


# ------------------------------------------------------------------ engine, disaggregated


@pytest.fixture
def pair(tiny_llama_dir):
    pair = Pair(tiny_llama_dir)
    yield pair
    pair.close()


def _start_group(pair: Pair, followers: tuple[str, ...]):
    """The leader as a remote request (its ticket to the prefill side) and its followers."""
    ticket = pair.decode.add_remote_request("lead", PROMPT, GREEDY)
    assert ticket is not None
    for name in followers:
        pair.decode.add_request(name, PROMPT, GREEDY, follows="lead")
    pair.prefill.add_job(PrefillJob(ticket, "loopback", PROMPT, GREEDY))
    return ticket


def test_followers_wait_for_the_leaders_kv_which_travels_once(pair, solo):
    ticket = _start_group(pair, ("f1", "f2", "f3"))
    decode = pair.decode
    decode.step()  # the transfer has not begun: the followers stay out of the scheduler
    assert decode.num_held_followers == 3
    assert not decode.scheduler.has_work and decode.has_unfinished
    tokens = _drain(decode, pair).tokens
    assert tokens == {name: solo for name in ("lead", "f1", "f2", "f3")}
    # One ticket, the prompt's three pages sent once, and each follower served every full page.
    assert decode.remote.counts["succeeded"] == 1
    assert len(ticket.block_ids) == 3
    lay = ticket.layout
    assert pair.receiver.bytes_received == lay.num_layers * layout.chunk_nbytes(lay, 3)
    assert decode.scheduler.prefix_hit_tokens == 3 * FULL_PAGES_TOKENS
    assert _unshared_blocks(decode.scheduler) == 0 and decode.num_held_followers == 0


def test_aborting_a_held_follower_frees_everything(pair, solo):
    _start_group(pair, ("f1", "f2"))
    final = pair.decode.finish_request("f1")
    assert final.request_id == "f1" and final.finish_reason is FinishReason.ABORT and final.token_ids == ()
    assert pair.decode.finish_request("f1") is None  # already ended
    assert pair.decode.num_held_followers == 1
    tokens = _drain(pair.decode, pair).tokens
    assert tokens == {"lead": solo, "f2": solo}
    assert _unshared_blocks(pair.decode.scheduler) == 0 and _unshared_blocks(pair.prefill.scheduler) == 0
    assert pair.receiver.num_live == 0


def test_followers_of_an_aborted_leader_are_released_and_complete(pair, solo):
    _start_group(pair, ("f1", "f2"))
    pair.decode.finish_request("lead")
    # Only held followers are left, and they are unfinished work: the next step queues them.
    assert not pair.decode.scheduler.has_work and not pair.decode.scheduler.waiting_for_kv
    assert pair.decode.has_unfinished
    tokens = _drain(pair.decode, pair).tokens
    assert tokens == {"f1": solo, "f2": solo}
    # The first follower computed the prompt; the second found its full pages.
    assert pair.decode.scheduler.prefix_hit_tokens == FULL_PAGES_TOKENS
    assert _unshared_blocks(pair.decode.scheduler) == 0


def _flip_a_byte(header, payload):
    payload = bytearray(payload)
    payload[len(payload) // 2] ^= 0xFF
    return header, payload


@pytest.mark.parametrize("policy", [OnTransferFailure.RECOMPUTE, OnTransferFailure.FAIL])
def test_followers_complete_when_the_leaders_transfer_fails(tiny_llama_dir, solo, policy):
    pair = Pair(tiny_llama_dir, tamper=_flip_a_byte, on_failure=policy)
    try:
        _start_group(pair, ("f1", "f2"))
        run = _drain(pair.decode, pair)
        tokens = run.tokens
        assert pair.receiver.num_rejected >= 1
        assert tokens["f1"] == solo and tokens["f2"] == solo
        if policy is OnTransferFailure.RECOMPUTE:  # the leader recomputes here, the followers share it
            assert pair.decode.remote.counts["failed_recomputed"] == 1
            assert tokens["lead"] == solo
            assert pair.decode.scheduler.prefix_hit_tokens == 2 * FULL_PAGES_TOKENS
        else:  # the leader ends with an error; its followers compute the prompt here, once
            assert pair.decode.remote.counts["failed"] == 1
            assert run.last["lead"].finish_reason is FinishReason.ERROR
            assert pair.decode.scheduler.prefix_hit_tokens == FULL_PAGES_TOKENS
        assert _unshared_blocks(pair.decode.scheduler) == 0 and pair.decode.num_held_followers == 0
    finally:
        pair.close()


# ------------------------------------------------------------------ LocalBackend


@pytest.fixture
def local_engine(loaded):
    engine = AsyncEngine(_engine(loaded))
    yield engine
    engine.shutdown()


async def _consume(stream, stop_after: int | None = None) -> list[TokenDelta]:
    deltas = []
    async for delta in stream:
        deltas.append(delta)
        if stop_after is not None and len(deltas) == stop_after:
            break
    await stream.aclose()
    return deltas


def test_local_backend_group_streams_each_sequence(local_engine, solo):
    backend = LocalBackend(local_engine)

    async def run():
        streams = backend.generate_group(["g-0", "g-1", "g-2"], PROMPT, [GREEDY] * 3)
        return await asyncio.gather(*(_consume(s) for s in streams))

    results = asyncio.run(run())
    for deltas, name in zip(results, ("g-0", "g-1", "g-2")):
        assert {d.request_id for d in deltas} == {name}
        assert [t for d in deltas for t in d.token_ids] == solo
        assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert local_engine.core.scheduler.prefix_hit_tokens == 2 * FULL_PAGES_TOKENS


def test_closing_one_stream_of_a_group_aborts_only_it(local_engine, solo):
    backend = LocalBackend(local_engine)
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def run():
        streams = backend.generate_group(["c-0", "c-1", "c-2"], PROMPT, [GREEDY, long, GREEDY])
        results = await asyncio.gather(_consume(streams[0]), _consume(streams[1], stop_after=2),
                                       _consume(streams[2]))
        for _ in range(200):  # the engine thread applies the abort before its next step
            if not local_engine.core.has_unfinished:
                break
            await asyncio.sleep(0.01)
        return results

    first, closed, last = asyncio.run(run())
    assert [t for d in first for t in d.token_ids] == solo == [t for d in last for t in d.token_ids]
    assert len(closed) == 2 and all(d.finish_reason is None for d in closed)
    assert not local_engine.core.scheduler.requests
    assert _unshared_blocks(local_engine.core.scheduler) == 0


def test_a_group_needs_one_params_per_sequence(local_engine):
    with pytest.raises(ValueError, match="2 ids, 1 params"):
        LocalBackend(local_engine).generate_group(["a", "b"], PROMPT, [GREEDY])


# ------------------------------------------------------------------ ClusterBackend, fake workers


class _Call(NamedTuple):
    worker_id: str
    request_id: str
    remote: bool
    resume_at: int | None
    follows: str | None


class _FakeDecode:
    """A decode worker's generate/abort/fail_remote: records each call, answers a remote
    request's ticket with None (no room: it prefills here), then one token; refuses the
    ids in `refuse`, dies (RayActorError) under the ids in `die_under`."""

    def __init__(self, worker_id: str, calls: list[_Call], refuse=(), die_under=()) -> None:
        self.worker_id, self.calls, self.refuse, self.die_under = worker_id, calls, refuse, die_under
        self.generate = _Stream(self._generate)
        self.abort = _Method(self._noop)
        self.fail_remote = _Method(self._noop)

    async def _generate(self, request_id, prompt_ids, params, remote, resume_at=None, follows=None):
        self.calls.append(_Call(self.worker_id, request_id, remote, resume_at, follows))
        if request_id in self.refuse:
            yield Refused("OVERLOADED", f"{self.worker_id} is busy")
            return
        if remote:
            yield None
        if request_id in self.die_under:
            raise RayActorError()
        yield TokenDelta(request_id, (7,), (0.0,), None, FinishReason.LENGTH, len(prompt_ids), 0)

    async def _noop(self, *args):
        return None


def _cluster(calls: list[_Call], **decode_options) -> tuple[ClusterBackend, GatewayMetrics]:
    """Two fake decode workers and a prefill worker linked to both; every prompt is routed
    to the prefill worker (local_prefill_tokens=0), decode workers in turn."""
    controller = _controller(1, 2)
    for worker_id in ("decode-0", "decode-1"):
        info = WorkerInfo(worker_id, "decode", PeerInfo.local("cpu"), BLOCK, 1, (0,), 1)
        actor = _FakeDecode(worker_id, calls, **decode_options.get(worker_id, {}))
        controller.workers[worker_id] = WorkerHandle(worker_id, "decode", actor, info, None, ready=True)
        controller.links.begin(("prefill-0", worker_id))
        controller.links.succeeded(("prefill-0", worker_id), f"tcp://127.0.0.1:1/{worker_id}")
    info = WorkerInfo("prefill-0", "prefill", PeerInfo.local("cpu"), BLOCK, 1, (0,), 1)
    controller.workers["prefill-0"] = WorkerHandle("prefill-0", "prefill", None, info, None, ready=True)
    controller.worker_died = lambda handle, why, reason="process_died": controller.workers.pop(handle.worker_id)
    metrics = GatewayMetrics()
    return ClusterBackend(controller, Router(RoundRobin(), BLOCK, local_prefill_tokens=0), metrics), metrics


async def _gather_group(streams):
    return await asyncio.gather(*(_consume(s) for s in streams), return_exceptions=True)


def test_followers_join_the_leaders_decode_worker_without_a_prefill_worker():
    calls: list[_Call] = []
    backend, metrics = _cluster(calls)
    results = asyncio.run(_gather_group(backend.generate_group(["g-0", "g-1", "g-2"], PROMPT, [GREEDY] * 3)))
    assert [[d.token_ids for d in deltas] for deltas in results] == [[(7,)]] * 3
    # Round robin would have spread them; the followers go where the leader went, prefilled there.
    assert sorted(calls) == [_Call("decode-0", "g-0", True, None, None),
                             _Call("decode-0", "g-1", False, None, "g-0"),
                             _Call("decode-0", "g-2", False, None, "g-0")]
    assert calls[0].request_id == "g-0"  # the leader is in D's engine before any follower is sent
    rendered = metrics.render().decode()
    assert 'pdserve_routes_total{decode_worker="decode-0",prefill="remote"} 1.0' in rendered
    assert 'pdserve_routes_total{decode_worker="decode-0",prefill="group"} 2.0' in rendered


def test_followers_of_a_leader_refused_before_it_was_placed_route_on_their_own():
    calls: list[_Call] = []
    backend, _ = _cluster(calls, **{"decode-0": {"refuse": ("g-0",)}})
    leader, *followers = asyncio.run(_gather_group(backend.generate_group(["g-0", "g-1", "g-2"], PROMPT,
                                                                          [GREEDY] * 3)))
    assert isinstance(leader, RequestError) and "busy" in str(leader)
    assert [[d.token_ids for d in deltas] for deltas in followers] == [[(7,)]] * 2
    # Each routed as a new request: a prefill worker of its own, decode workers in turn, no leader.
    assert sorted(calls) == [_Call("decode-0", "g-0", True, None, None),
                             _Call("decode-0", "g-2", True, None, None),
                             _Call("decode-1", "g-1", True, None, None)]


def test_a_follower_whose_decode_worker_dies_migrates_on_its_own():
    calls: list[_Call] = []
    backend, _ = _cluster(calls, **{"decode-0": {"die_under": ("g-1",)}})
    results = asyncio.run(_gather_group(backend.generate_group(["g-0", "g-1"], PROMPT, [GREEDY] * 2)))
    assert [[d.token_ids for d in deltas] for deltas in results] == [[(7,)]] * 2
    assert calls == [_Call("decode-0", "g-0", True, None, None),
                     _Call("decode-0", "g-1", False, None, "g-0"),
                     _Call("decode-1", "g-1.m1", True, 0, None)]  # its own route, from its first token


def test_a_follower_consumed_before_its_leader_is_served_on_its_own():
    calls: list[_Call] = []
    backend, _ = _cluster(calls)

    async def run():
        leader, follower = backend.generate_group(["g-0", "g-1"], PROMPT, [GREEDY] * 2)
        return await _consume(follower), await _consume(leader)

    follower, leader = asyncio.run(run())
    assert follower[-1].token_ids == (7,) and leader[-1].token_ids == (7,)
    assert calls == [_Call("decode-0", "g-1", True, None, None), _Call("decode-1", "g-0", True, None, None)]
