"""Router policies and the prefix index, on synthetic worker views and real cache events."""

from __future__ import annotations

from pdserve.cluster.control.router import LeastLoad, PrefixAware, PrefixIndex, RoundRobin, Router, WorkerView
from pdserve.runtime.block_allocator import BlockAllocator
from pdserve.runtime.radix_cache import CacheEvent, RadixCache, page_hashes

BLOCK = 4


def view(worker_id: str, in_flight: int = 0, tokens: int = 0, kv: float = 0.0) -> WorkerView:
    return WorkerView(worker_id, in_flight, tokens, kv)


def stored(tokens: list[int], parent: int | None = None) -> CacheEvent:
    hashes = tuple(page_hashes(tokens, BLOCK, parent))
    return CacheEvent("stored", hashes, parent, tuple(tokens))


def test_index_mirrors_a_real_radix_cache_exactly():
    allocator = BlockAllocator(64)
    cache = RadixCache(allocator, BLOCK)
    tokens = list(range(100, 124))  # 6 pages
    table = allocator.allocate(6)
    cache.insert(tokens, table)
    allocator.free(table)  # the tree keeps its own reference
    index = PrefixIndex()
    index.apply("d0", cache.drain_events())
    assert index.num_cached_pages("d0", page_hashes(tokens + [1, 2, 3, 4], BLOCK)) == 6
    assert index.num_cached_pages("d0", page_hashes(tokens[:8] + [9, 9, 9, 9], BLOCK)) == 2
    assert index.num_cached_pages("d1", page_hashes(tokens, BLOCK)) == 0
    cache.evict(6)
    index.apply("d0", cache.drain_events())
    assert index.num_cached_pages("d0", page_hashes(tokens, BLOCK)) == 0


def test_round_robin_cycles_and_least_load_prefers_the_idle_worker():
    workers = [view("a"), view("b"), view("c")]
    rr = RoundRobin()
    assert [rr.choose(workers, [0, 0, 0]) for _ in range(4)] == [0, 1, 2, 0]
    busy = [view("a", in_flight=9), view("b", in_flight=0)]
    least = LeastLoad(seed=0)
    assert {least.choose(busy, [0, 0]) for _ in range(10)} == {1}


def test_prefix_aware_follows_the_prefix_until_load_outweighs_it():
    policy = PrefixAware(load_cost_tokens=100)
    assert policy.choose([view("a"), view("b")], [0, 400]) == 1
    assert policy.choose([view("a"), view("b", in_flight=3)], [0, 400]) == 1  # 400 - 300 > 0
    assert policy.choose([view("a"), view("b", in_flight=5)], [0, 400]) == 0  # 400 - 500 < 0
    assert policy.choose([view("a", in_flight=1), view("b")], [0, 0]) == 1  # no prefix: least loaded


def test_route_prefills_locally_for_a_short_uncached_part_or_saturated_prefill():
    router = Router(PrefixAware(), BLOCK, local_prefill_tokens=8, prefill_saturation_tokens=1000)
    prefix = list(range(200, 240))  # 10 pages
    router.index.apply("d1", [stored(prefix)])
    decode, prefill = [view("d0"), view("d1")], [view("p0")]
    assert router.route(prefix + [1, 2, 3], decode, prefill) == ("d1", None, 40, 0)
    long_prompt = list(range(300, 400))
    assert router.route(long_prompt, decode, prefill).prefill == "p0"
    # No prefill worker open: prefilled locally, and the demand is reported (autoscaler).
    assert router.route(long_prompt, decode, [view("p0", tokens=1000)])[1:] == (None, 0, 100)
    assert router.route(long_prompt, decode, [])[1:] == (None, 0, 100)
    assert router.route(long_prompt, [], prefill) is None


def test_a_fully_cached_prompt_still_leaves_one_token_to_compute():
    router = Router(PrefixAware(), BLOCK)
    prompt = list(range(500, 532))
    router.index.apply("d0", [stored(prompt)])
    assert router.route(prompt, [view("d0")], []).cached_tokens == len(prompt) - 1


def test_the_prefill_worker_with_the_prefix_wins_over_an_idle_one():
    router = Router(RoundRobin(), BLOCK, local_prefill_tokens=0)
    prompt = list(range(600, 700))
    router.index.apply("p1", [stored(prompt[:96])])
    route = router.route(prompt, [view("d0")], [view("p0"), view("p1", in_flight=1, tokens=50)])
    assert route.prefill == "p1"


def test_a_prompt_spills_to_the_decode_worker_when_it_waits_less_there():
    router = Router(RoundRobin(), BLOCK, local_prefill_tokens=8, spill_backlog_tokens=1000,
                    local_prefill_slowdown=2.0)
    short, long_prompt = list(range(100, 180)), list(range(1000, 2500))
    # Light load: below the backlog floor everything goes to the prefill worker.
    assert router.route(short, [view("d0")], [view("p0", tokens=900)]).prefill == "p0"
    # A long prompt queued there: a short one waits less on the decode worker...
    assert router.route(short, [view("d0")], [view("p0", tokens=1500)]).prefill is None
    # ...unless the decode worker has its own local backlog: 2 x (800 + 80) > 1500 + 80.
    assert router.route(short, [view("d0", tokens=800)], [view("p0", tokens=1500)]).prefill == "p0"
    # A second long prompt ties (2 x 1500 == 1500 + 1500) and queues; a third spills.
    assert router.route(long_prompt, [view("d0")], [view("p0", tokens=1500)]).prefill == "p0"
    assert router.route(long_prompt, [view("d0")], [view("p0", tokens=3000)]).prefill is None


def test_spilling_stops_at_the_decode_workers_prompt_limit():
    router = Router(RoundRobin(), BLOCK, local_prefill_tokens=8, spill_backlog_tokens=1000,
                    local_prefill_slowdown=2.0)
    router.tune(8, 1000, 200, None)  # the decode worker may take on 200 prompt tokens
    short, long_prompt = list(range(100, 180)), list(range(1000, 2500))
    assert router.route(short, [view("d0")], [view("p0", tokens=3000)]).prefill is None
    # its own backlog counts: 150 + 80 > 200
    assert router.route(short, [view("d0", tokens=150)], [view("p0", tokens=3000)]).prefill == "p0"
    assert router.route(long_prompt, [view("d0")], [view("p0", tokens=3000)]).prefill == "p0"
    router.tune(8, 1000, 0, None)  # no room at all
    assert router.route(short, [view("d0")], [view("p0", tokens=3000)]).prefill == "p0"
    router.tune(8, 1000, None, None)  # no limit: the spill rule alone
    assert router.route(long_prompt, [view("d0")], [view("p0", tokens=3000)]).prefill is None


def test_local_prefill_slowdown_follows_the_decode_workers_prompt_budget():
    from pdserve.cluster.control.router import DECODE_STEP_PROMPT_TOKENS, local_prefill_slowdown

    assert local_prefill_slowdown(64) == 1.0 + DECODE_STEP_PROMPT_TOKENS / 64
    assert local_prefill_slowdown(16) > local_prefill_slowdown(64) > local_prefill_slowdown(256) > 1.0
    assert 1.0 < local_prefill_slowdown(None) < local_prefill_slowdown(64)
    # With the serving default (64 prompt tokens a step) two long prompts arriving together
    # run side by side: the second one spills instead of queueing behind the first.
    router = Router(RoundRobin(), BLOCK, local_prefill_tokens=8, spill_backlog_tokens=1000,
                    local_prefill_slowdown=local_prefill_slowdown(64))
    long_prompt = list(range(1000, 2500))
    assert router.route(long_prompt, [view("d0")], [view("p0", tokens=1500)]).prefill is None
