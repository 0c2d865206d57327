"""The controller's bookkeeping without Ray: prefix-cache event numbering and resync, the
KV link table, start-up linking whatever the order, the monitor loop surviving its own
errors, and a retry's own request id. Workers are fakes with the actor methods the
controller and the gateway call (`method.remote(...)` returns an awaitable); the real
actors are covered end to end in test_cluster_resilience.py."""

from __future__ import annotations

import asyncio
import random

import pytest
from ray.exceptions import RayActorError

from pdserve.cluster.control import controller as controller_module
from pdserve.cluster.control import kv_links
from pdserve.cluster.control.autoscaler import ScalingPolicy
from pdserve.cluster.control.cluster_backend import ClusterBackend
from pdserve.cluster.control.controller import Controller, WorkerStartError
from pdserve.cluster.control.kv_links import KVLinks
from pdserve.cluster.control.router import PrefixIndex, RoundRobin, Router
from pdserve.cluster.gateway.errors import RequestError
from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.cluster.workers.actors import WorkerInfo
from pdserve.cluster.workers.cache_events import CacheEventLog
from pdserve.cluster.workers.spec import ROLES, WorkerSpec
from pdserve.cluster.workers.stats import WorkerStats
from pdserve.kv_transfer.messages import KVLayout, KVTicket
from pdserve.kv_transfer.transports.select import PeerInfo, candidate_transports
from pdserve.runtime.block_allocator import BlockAllocator
from pdserve.runtime.radix_cache import RadixCache, page_hashes
from pdserve.runtime.request import TokenDelta
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason
from pdserve.runtime.threads import UnpinnedPlan

BLOCK = 4
CANDIDATES = candidate_transports(PeerInfo.local("cpu"), PeerInfo.local("cpu"))  # the fake workers share a host


# ------------------------------------------------------------------ prefix-cache events


def _cache_with_history(seed: int, rounds: int = 40) -> tuple[RadixCache, BlockAllocator, list]:
    """A radix cache after random inserts and evictions; returns it and its events."""
    rng = random.Random(seed)
    allocator = BlockAllocator(64)
    cache = RadixCache(allocator, BLOCK)
    events = []
    for _ in range(rounds):
        if rng.random() < 0.7:
            tokens = [rng.randrange(4) for _ in range(BLOCK * rng.randint(1, 4))]
            if allocator.num_free < 4:
                cache.evict(4)
            table = allocator.allocate(len(tokens) // BLOCK)
            cache.insert(tokens, table)
            allocator.free(table)
        else:
            cache.evict(rng.randint(1, 3))
        events.extend(cache.drain_events())
    return cache, allocator, events


def _pages_of(events) -> set[int]:
    pages: set[int] = set()
    for event in events:
        (pages.update if event.kind == "stored" else pages.difference_update)(event.page_hashes)
    return pages


def test_events_are_kept_until_acknowledged_so_a_lost_reply_loses_nothing():
    _, _, events = _cache_with_history(1)
    log, index = CacheEventLog(), PrefixIndex()
    log.record(events[:10])
    lost = log.since(index.seq("d0"))  # the reply to this poll never arrives
    assert lost.first_seq == 1 and len(lost.events) == 10
    log.record(events[10:])
    batch = log.since(index.seq("d0"))  # asked again with the same ack: everything comes again
    assert index.apply_batch("d0", batch)
    assert index.seq("d0") == len(events)
    assert index.pages("d0") == _pages_of(events)
    assert log.since(index.seq("d0")).events == ()  # acknowledged: forgotten


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_dropped_events_are_a_gap_and_a_snapshot_resynchronises_the_index(seed):
    _, _, events = _cache_with_history(seed, rounds=60)
    log, index = CacheEventLog(max_pending=5), PrefixIndex()
    log.record(events[:3])
    assert index.apply_batch("d0", log.since(0))
    log.record(events[3:])  # more than 5 unacknowledged: the oldest are dropped
    batch = log.since(index.seq("d0"))
    assert batch.first_seq > index.seq("d0") + 1
    assert not index.apply_batch("d0", batch)  # the gap is noticed, nothing applied
    index.reset("d0", log.snapshot())
    assert index.pages("d0") == _pages_of(events)
    assert index.num_resyncs == 1
    # From the snapshot on, numbered batches apply again.
    more = _cache_with_history(seed + 100, rounds=5)[2]
    log.record(more)
    assert index.apply_batch("d0", log.since(index.seq("d0")))
    assert index.pages("d0") == _pages_of(events + more)


def test_the_index_of_a_real_cache_matches_after_a_resync():
    cache, _, events = _cache_with_history(7)
    log, index = CacheEventLog(max_pending=2), PrefixIndex()
    log.record(events)
    assert not index.apply_batch("d0", log.since(0))
    index.reset("d0", log.snapshot())
    # Every page the cache can match is in the index, and nothing else.
    rng = random.Random(8)
    queries = [[rng.randrange(4) for _ in range(16)] for _ in range(200)]
    assert any(cache.match_prefix(q).block_ids for q in queries), "some queries hit the cache"
    for tokens in queries:
        hashes = page_hashes(tokens, BLOCK)
        matched = cache.match_prefix(tokens)
        assert index.num_cached_pages("d0", hashes) == len(matched.block_ids)


# ------------------------------------------------------------------ the link table


def test_link_table_states_backoff_and_forget():
    links = KVLinks()
    links.begin(("p0", "d0"))
    links.begin(("p0", "d1"))
    assert links.counts() == {"linking": 2, "up": 0, "down": 0}
    links.succeeded(("p0", "d0"), "tcp://127.0.0.1:1")
    assert links.address("p0", "d0") == "tcp://127.0.0.1:1" and links.has_up("p0")
    assert links.failed(("p0", "d1"), "refused", now=100.0) == kv_links.RETRY_FIRST_S
    assert links.address("p0", "d1") is None
    assert links.due(100.0) == [] and links.due(100.0 + kv_links.RETRY_FIRST_S) == [("p0", "d1")]
    delays = [links.failed(("p0", "d1"), "refused", now=200.0) for _ in range(8)]
    assert delays == sorted(delays) and delays[-1] == kv_links.RETRY_MAX_S
    assert links.counts() == {"linking": 0, "up": 1, "down": 1}
    links.forget("d1")
    assert links.counts() == {"linking": 0, "up": 1, "down": 0}
    links.forget("p0")
    assert not links.has_up("p0") and links.counts()["up"] == 0


# ------------------------------------------------------------------ fake workers


class _Method:
    def __init__(self, fn) -> None:
        self._fn = fn

    def remote(self, *args):
        return asyncio.ensure_future(self._fn(*args))


class _FakeActor:
    """A worker actor's surface: info, listen, probe_ticket, release_probe, measure, stats,
    cache_snapshot, shutdown."""

    def __init__(self, world: _World, role: str, worker_id: str) -> None:
        self.world, self.role, self.worker_id = world, role, worker_id
        for name in ("info", "listen", "probe_ticket", "release_probe", "measure", "stats", "cache_snapshot",
                     "shutdown"):
            setattr(self, name, _Method(getattr(self, f"_{name}")))

    async def _info(self):
        await asyncio.sleep(self.world.start_delay(self.worker_id))
        return WorkerInfo(self.worker_id, self.role, PeerInfo.local("cpu"), BLOCK, 1, (0,), 1)

    async def _listen(self, kind):
        await asyncio.sleep(self.world.link_delay)
        if self.world.refuse_listen.get(self.worker_id, 0) > 0:
            if kind == CANDIDATES[-1]:  # refuse_listen counts link attempts: every kind fails in one
                self.world.refuse_listen[self.worker_id] -= 1
            raise ConnectionRefusedError(f"{self.worker_id} refused")
        return f"{kind}://{self.worker_id}-{len(self.world.listened)}"

    async def _probe_ticket(self, num_pages):
        self.world.tickets += 1
        return KVTicket("probe", self.world.tickets, b"s" * 16, tuple(range(num_pages)), 0, num_pages * BLOCK,
                        KVLayout(2, BLOCK, 1, 8, "float32"), 1e18)

    async def _release_probe(self, ticket_id):
        self.world.released.append(ticket_id)

    async def _measure(self, address, ticket):
        await asyncio.sleep(self.world.link_delay)
        self.world.listened.append((self.worker_id, address))
        seconds = self.world.seconds[address.partition("://")[0]]
        if isinstance(seconds, Exception):
            raise seconds
        return seconds

    async def _stats(self, acked):
        raise AssertionError("not polled in these tests")

    async def _cache_snapshot(self):
        raise AssertionError("not polled in these tests")

    async def _shutdown(self):
        return None


class _World:
    def __init__(self, start_delays: dict[str, float], link_delay: float = 0.01) -> None:
        self.start_delays = start_delays
        self.link_delay = link_delay
        self.refuse_listen: dict[str, int] = {}
        self.listened: list = []  # (prefill worker, address) per probe transfer
        self.seconds: dict[str, float | Exception] = dict.fromkeys(CANDIDATES, 0.001)  # a probe's time per kind
        self.tickets = 0
        self.released: list[int] = []
        self.actors: dict[str, _FakeActor] = {}

    def start_delay(self, worker_id: str) -> float:
        return self.start_delays.get(worker_id, 0.0)

    def remote(self, cls):
        world = self
        role = "prefill" if cls.__name__.startswith("Prefill") else "decode"

        class _Options:
            def options(self, name, **_):
                worker_id = name.removeprefix("pdserve-")

                class _Ctor:
                    def remote(self, *_args):
                        world.actors[worker_id] = _FakeActor(world, role, worker_id)
                        return world.actors[worker_id]
                return _Ctor()
        return _Options()


@pytest.fixture
def fake_ray(monkeypatch):
    def install(world: _World) -> None:
        monkeypatch.setattr(controller_module.ray, "remote", world.remote)
        monkeypatch.setattr(controller_module.ray, "kill", lambda actor: None)
    return install


def _controller(num_prefill: int, num_decode: int, **options) -> Controller:
    controller = Controller(WorkerSpec(model="unused"), num_prefill, num_decode, PrefixIndex(),
                            poll_interval=0.01, **options)
    controller._cpus = dict.fromkeys(ROLES, UnpinnedPlan(1, 1))
    return controller


@pytest.mark.parametrize("start_delays", [
    {},  # all at once
    {"prefill-0": 0.05, "decode-1": 0.05},  # the race: some finish starting while others link
    {"decode-0": 0.03, "prefill-1": 0.06, "decode-1": 0.02},
])
def test_every_pair_is_linked_whatever_the_start_order(fake_ray, start_delays):
    world = _World(start_delays, link_delay=0.02)
    fake_ray(world)
    controller = _controller(2, 2)

    async def start():
        roles = ["prefill", "decode", "prefill", "decode"]
        await asyncio.gather(*(controller._add_worker(role, strict=True) for role in roles))

    asyncio.run(start())
    pairs = {(p, d) for p in ("prefill-0", "prefill-1") for d in ("decode-0", "decode-1")}
    assert {pair for pair in pairs if controller.links.address(*pair)} == pairs
    assert controller.links.counts() == {"linking": 0, "up": 4, "down": 0}
    assert len(world.listened) == 4 * len(CANDIDATES), "each pair linked once (every candidate measured)"
    assert sorted(world.released) == list(range(1, world.tickets + 1)), "every probe ticket released"


@pytest.mark.parametrize("seconds, chosen", [
    ({"shm": 0.004, "nixl": 0.001}, "nixl"),
    ({"shm": 0.001, "nixl": 0.004}, "shm"),
    ({"shm": 0.004, "nixl": RuntimeError("NIXL is not installed")}, "shm"),
])
def test_each_pair_takes_the_transport_that_measured_fastest(fake_ray, seconds, chosen):
    world = _World({})
    world.seconds.update(seconds)
    fake_ray(world)
    controller = _controller(1, 1)

    async def start():
        await asyncio.gather(controller._add_worker("prefill", strict=True),
                             controller._add_worker("decode", strict=True))

    asyncio.run(start())
    assert controller.links.address("prefill-0", "decode-0").startswith(f"{chosen}://")


def test_a_forced_transport_is_the_only_one_measured(fake_ray):
    world = _World({})
    world.seconds.update({"shm": 0.001, "nixl": 0.004})
    fake_ray(world)
    controller = Controller(WorkerSpec(model="unused", kv_transport="nixl"), 1, 1, PrefixIndex(), poll_interval=0.01)
    controller._cpus = dict.fromkeys(ROLES, UnpinnedPlan(1, 1))

    async def start():
        await asyncio.gather(controller._add_worker("prefill", strict=True),
                             controller._add_worker("decode", strict=True))

    asyncio.run(start())
    assert controller.links.address("prefill-0", "decode-0").startswith("nixl://")
    assert [address.partition("://")[0] for _, address in world.listened] == ["nixl"]


def test_a_failed_link_after_start_up_is_down_visible_and_retried(fake_ray, monkeypatch):
    monkeypatch.setattr(kv_links, "RETRY_FIRST_S", 0.01)
    world = _World({})
    fake_ray(world)
    controller = _controller(1, 1)
    metrics = GatewayMetrics(control_status=controller.status)

    async def scenario():
        await controller._add_worker("prefill", strict=True)
        world.refuse_listen["decode-0"] = 2  # the new worker's listener fails twice
        await controller._add_worker("decode")  # not strict: it serves, its link is down
        assert controller.links.counts()["down"] == 1
        assert 'pdserve_kv_links{state="down"} 1.0' in metrics.render().decode()
        for _ in range(200):
            controller._retry_links()
            await asyncio.sleep(0.01)
            if controller.links.address("prefill-0", "decode-0"):
                break

    asyncio.run(scenario())
    assert controller.links.address("prefill-0", "decode-0") is not None
    assert 'pdserve_kv_links{state="up"} 1.0' in metrics.render().decode()


def test_a_link_that_fails_at_start_up_fails_start_up(fake_ray):
    world = _World({"decode-0": 0.02})
    world.refuse_listen["decode-0"] = 1
    fake_ray(world)
    controller = _controller(1, 1)
    async def start():
        await asyncio.gather(controller._add_worker("prefill", strict=True),
                             controller._add_worker("decode", strict=True))

    with pytest.raises(WorkerStartError, match="prefill-0 -> decode-0 does not work"):
        asyncio.run(start())


# ------------------------------------------------------------------ the monitor loop


class _BrokenAutoscaler:
    policy = ScalingPolicy()

    def __init__(self) -> None:
        self.calls = 0

    def observe(self, *args, **kwargs):
        self.calls += 1
        raise RuntimeError("a bug in a scaling rule")


def test_the_monitor_loop_logs_counts_and_survives_its_errors(caplog):
    autoscaler = _BrokenAutoscaler()
    controller = _controller(0, 1, autoscaler=autoscaler)
    metrics = GatewayMetrics(control_status=controller.status)

    async def run_a_while():
        task = asyncio.create_task(controller._monitor_loop())
        while autoscaler.calls < 5:
            await asyncio.sleep(0.01)
        assert not task.done(), "the loop goes on"
        task.cancel()

    asyncio.run(run_a_while())
    assert controller.num_errors >= 5
    assert f"pdserve_controller_errors_total {float(controller.num_errors)}" in metrics.render().decode()
    assert "a bug in a scaling rule" in caplog.text


def test_prefill_demand_with_no_prefill_worker_scales_prefill_up_from_zero():
    policy = ScalingPolicy(min_prefill=0, max_prefill=2, window_seconds=1, up_cooldown=0)
    from pdserve.cluster.control.autoscaler import Autoscaler

    autoscaler = Autoscaler(policy)
    decode = [WorkerStats("decode", "d0", 0, 0, 1, 0, 0.1, 0, 0, 0, 0.0, {}, 0, 0.0)]
    counts = {"prefill": 0, "decode": 1}
    assert autoscaler.observe(0.0, [], decode, counts) == []  # no demand: stays at 0
    decisions = autoscaler.observe(0.5, [], decode, counts, unmet_prefill_tokens=3000)
    assert [(d.role, d.current, d.desired) for d in decisions] == [("prefill", 0, 1)]
    assert "found no prefill worker" in decisions[0].reason


# ------------------------------------------------------------------ retries


class _DecodeThatDies:
    """A decode worker whose stream dies before its first token (RayActorError)."""

    def __init__(self, requests: list, tokens_before_death: int = 0) -> None:
        self.requests = requests
        self.tokens_before_death = tokens_before_death
        self.calls: list[tuple] = []
        self.generate = _Stream(self._generate)
        self.abort = _Method(self._noop)
        self.fail_remote = _Method(self._noop)

    async def _generate(self, request_id, prompt_ids, params, remote, resume_at=None):
        self.requests.append(request_id)
        self.calls.append((list(prompt_ids), params.max_tokens, resume_at))
        for i in range(self.tokens_before_death):
            yield TokenDelta(request_id, (100 + i,), (0.0,), None, None, len(prompt_ids), 0)
        raise RayActorError()

    async def _noop(self, *args):
        return None


class _DecodeThatServes(_DecodeThatDies):
    async def _generate(self, request_id, prompt_ids, params, remote, resume_at=None):
        self.requests.append(request_id)
        self.calls.append((list(prompt_ids), params.max_tokens, resume_at))
        yield TokenDelta(request_id, (7,), (0.0,), None, FinishReason.LENGTH, len(prompt_ids), 3)


class _Stream:
    """Like a Ray streaming generator: iterating yields awaitables of the items."""

    def __init__(self, fn) -> None:
        self._fn = fn

    def remote(self, *args):
        async def refs():
            async for item in self._fn(*args):
                future = asyncio.get_running_loop().create_future()
                future.set_result(item)
                yield future
        return refs()


def _with_decode_workers(*actors) -> Controller:
    """A controller serving the fake decode `actors` as decode-0, decode-1, ..., ready; a
    worker reported dead just leaves (no replacement starts)."""
    from pdserve.cluster.control.controller import WorkerHandle

    controller = _controller(0, len(actors))
    for i, actor in enumerate(actors):
        worker_id = f"decode-{i}"
        info = WorkerInfo(worker_id, "decode", PeerInfo.local("cpu"), BLOCK, 1, (0,), 1)
        controller.workers[worker_id] = WorkerHandle(worker_id, "decode", actor, info, None, ready=True)
    controller.worker_died = lambda handle, why, *reason: controller.workers.pop(handle.worker_id, None)
    return controller


def test_a_retry_on_another_decode_worker_has_its_own_request_id():

    seen: list[str] = []
    controller = _with_decode_workers(_DecodeThatDies(seen), _DecodeThatServes(seen))
    backend = ClusterBackend(controller, Router(RoundRobin(), BLOCK, local_prefill_tokens=100), GatewayMetrics())

    async def run():
        return [d async for d in backend.generate("req-1", [1, 2, 3], SamplingParams(max_tokens=1))]

    deltas = asyncio.run(run())
    assert seen == ["req-1", "req-1.m1"]
    assert [d.token_ids for d in deltas] == [(7,)]


def test_a_migration_carries_the_streamed_tokens_and_the_rest_of_max_tokens():

    seen: list[str] = []
    dying, serving = _DecodeThatDies(seen, tokens_before_death=2), _DecodeThatServes(seen)
    controller = _with_decode_workers(dying, serving)
    metrics = GatewayMetrics()
    backend = ClusterBackend(controller, Router(RoundRobin(), BLOCK, local_prefill_tokens=100), metrics)

    async def run():
        return [d async for d in backend.generate("req-3", [1, 2, 3], SamplingParams(max_tokens=5))]

    deltas = asyncio.run(run())
    assert [t for d in deltas for t in d.token_ids] == [100, 101, 7]
    assert serving.calls == [([1, 2, 3, 100, 101], 3, 2)]  # prompt + streamed tokens, 5 - 2 left, resumed at 2
    assert all(d.num_prompt_tokens == 3 for d in deltas), "usage counts the client's prompt"
    assert deltas[-1].num_cached_tokens == 3
    assert 'pdserve_request_migrations_total{reason="unknown"} 1.0' in metrics.render().decode()
    assert "pdserve_request_migration_seconds_count 1.0" in metrics.render().decode()


def test_with_migrations_off_a_lost_worker_ends_the_stream():
    from pdserve.cluster.control.controller import WorkerHandle

    controller = _controller(0, 2)
    for worker_id in ("decode-0", "decode-1"):
        info = WorkerInfo(worker_id, "decode", PeerInfo.local("cpu"), BLOCK, 1, (0,), 1)
        controller.workers[worker_id] = WorkerHandle(worker_id, "decode", _DecodeThatDies([], 1), info, None,
                                                     ready=True)
    controller.worker_died = lambda handle, why: None
    backend = ClusterBackend(controller, Router(RoundRobin(), BLOCK), GatewayMetrics(), max_migrations=0)

    async def run():
        return [d async for d in backend.generate("req-4", [1, 2, 3], SamplingParams(max_tokens=5))]

    with pytest.raises(RequestError, match="limit --max-migrations 0"):
        asyncio.run(run())


def test_a_retry_ends_after_the_last_attempt_with_unavailable():
    from pdserve.cluster.control.controller import WorkerHandle

    seen: list[str] = []
    controller = _controller(0, 2)
    for worker_id in ("decode-0", "decode-1"):
        info = WorkerInfo(worker_id, "decode", PeerInfo.local("cpu"), BLOCK, 1, (0,), 1)
        controller.workers[worker_id] = WorkerHandle(worker_id, "decode", _DecodeThatDies(seen), info, None,
                                                     ready=True)
    backend = ClusterBackend(controller, Router(RoundRobin(), BLOCK, local_prefill_tokens=100), GatewayMetrics())
    controller.worker_died = lambda handle, why: None

    async def run():
        return [d async for d in backend.generate("req-2", [1, 2, 3], SamplingParams(max_tokens=1))]

    with pytest.raises(RequestError, match="moved 3 times"):
        asyncio.run(run())
    assert seen == ["req-2", "req-2.m1", "req-2.m2", "req-2.m3"]


class _RecordingAutoscaler:
    policy = ScalingPolicy(min_prefill=0)

    def __init__(self) -> None:
        self.unmet: list[int] = []
        self.prompts: list[list[int]] = []
        self.draining: list[dict[str, int]] = []

    def observe(self, now, prefill, decode, counts, unmet_prefill_tokens=0, draining=None, prompts=()):
        self.unmet.append(unmet_prefill_tokens)
        self.prompts.append(list(prompts))
        self.draining.append(dict(draining))
        return []


def test_prompts_that_find_no_prefill_worker_reach_the_autoscaler_once():
    """... and every routed prompt's uncached size, whatever its route, reaches it once."""
    from pdserve.cluster.control.controller import WorkerHandle

    autoscaler = _RecordingAutoscaler()
    controller = _controller(0, 1, autoscaler=autoscaler)
    info = WorkerInfo("decode-0", "decode", PeerInfo.local("cpu"), BLOCK, 1, (0,), 1)
    controller.workers["decode-0"] = WorkerHandle("decode-0", "decode", _DecodeThatServes([]), info, None,
                                                  ready=True)
    metrics = GatewayMetrics()
    backend = ClusterBackend(controller, Router(RoundRobin(), BLOCK, local_prefill_tokens=4), metrics)

    async def run(prompt):
        return [d async for d in backend.generate("r", prompt, SamplingParams(max_tokens=1))]

    asyncio.run(run(list(range(10, 110))))  # 100 uncached tokens, no prefill worker
    asyncio.run(run([1, 2, 3]))  # short: local by choice, not unmet demand
    controller._autoscale()
    controller._autoscale()
    assert autoscaler.unmet == [100, 0]
    assert autoscaler.prompts == [[100, 3], []]
    assert autoscaler.draining == [{"prefill": 0, "decode": 0}] * 2
    assert 'pdserve_routes_total{decode_worker="decode-0",prefill="local"} 2.0' in metrics.render().decode()


class _CachingWorker:
    """A worker's stats/cache_snapshot over a real CacheEventLog."""

    def __init__(self, log: CacheEventLog) -> None:
        self.log = log
        self.snapshots = 0
        self.stats = _Method(self._stats)
        self.cache_snapshot = _Method(self._cache_snapshot)

    async def _stats(self, acked):
        stats = WorkerStats("decode", "decode-0", 0, 0, 0, 0, 0.0, 0, 0, 0, 0.0, {}, 0, 0.0)
        return stats, self.log.since(acked)

    async def _cache_snapshot(self):
        self.snapshots += 1
        return self.log.snapshot()


def test_the_controller_reloads_a_worker_index_after_lost_events():
    from pdserve.cluster.control.controller import WorkerHandle

    _, _, events = _cache_with_history(11, rounds=60)
    log = CacheEventLog(max_pending=4)
    worker = _CachingWorker(log)
    controller = _controller(0, 1)
    info = WorkerInfo("decode-0", "decode", PeerInfo.local("cpu"), BLOCK, 1, (0,), 1)
    handle = WorkerHandle("decode-0", "decode", worker, info, None, ready=True)
    controller.workers["decode-0"] = handle
    metrics = GatewayMetrics(control_status=controller.status)

    async def polls():
        log.record(events[:3])
        await controller._poll(handle)  # in order: applied, no snapshot
        assert worker.snapshots == 0 and controller.index.seq("decode-0") == 3
        log.record(events[3:])  # more than 4 unacknowledged: the worker drops the oldest
        await controller._poll(handle)

    asyncio.run(polls())
    assert worker.snapshots == 1
    assert controller.index.pages("decode-0") == _pages_of(events)
    assert "pdserve_prefix_index_resyncs_total 1.0" in metrics.render().decode()


def test_a_request_predicted_to_miss_its_ttft_target_is_shed_but_a_migrating_one_never_is():
    from test_slo_control import _planned

    from pdserve.cluster.control.slo_control import SLOControl

    seen: list[str] = []
    controller = _with_decode_workers(_DecodeThatDies(seen, tokens_before_death=1), _DecodeThatServes(seen))
    metrics = GatewayMetrics()
    router = Router(RoundRobin(), BLOCK, local_prefill_tokens=10**6)  # every prompt prefilled on decode
    planner = _planned()
    slo = SLOControl(planner, router, metrics, shed=True)
    backend = ClusterBackend(controller, router, metrics, slo=slo)

    async def run(request_id):
        return [d async for d in backend.generate(request_id, [1, 2, 3], SamplingParams(max_tokens=3))]

    rate = planner.last_plan.forecast.prefill_rate
    controller.workers["decode-1"].in_flight_tokens = int(5 * rate)  # five seconds of prompts queued there
    # decode-0 takes it and dies after one token: it moves to decode-1, queue or not
    assert [t for d in asyncio.run(run("fits")) for t in d.token_ids] == [100, 7]
    with pytest.raises(RequestError, match="over the TTFT target") as refused:  # a new one there: shed
        asyncio.run(run("late"))
    assert refused.value.retry_after > 2 and slo.num_shed == 1
    assert seen == ["fits", "fits.m1"]  # the shed request reached no worker
