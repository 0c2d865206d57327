import os
import subprocess
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pdserve.runtime.block_allocator import BlockAllocator
from pdserve.runtime.radix_cache import (
    CacheEvent,
    DisabledRadixCache,
    RadixCache,
    page_hashes,
)


def _cache(num_blocks: int = 16, block_size: int = 4) -> tuple[BlockAllocator, RadixCache]:
    alloc = BlockAllocator(num_blocks)
    return alloc, RadixCache(alloc, block_size)


def _insert_fresh(alloc: BlockAllocator, cache: RadixCache, tokens: list[int]) -> list[int]:
    """Run a request with no reuse to the end: allocate, insert, free. Returns its blocks."""
    blocks = alloc.allocate(-(-len(tokens) // cache.block_size))
    cache.insert(tokens, blocks)
    alloc.free(blocks)
    return blocks


def test_match_on_empty_tree():
    alloc, cache = _cache()
    m = cache.match_prefix([1, 2, 3, 4, 5])
    assert (m.block_ids, m.num_tokens) == ([], 0)
    cache.lock(m.handle)  # the root handle locks and unlocks like any other
    cache.unlock(m.handle)
    assert cache.drain_events() == []
    assert (cache.num_cached_blocks, cache.num_evictable_blocks, alloc.num_used) == (0, 0, 0)


def test_insert_caches_whole_pages_and_matches_them():
    alloc, cache = _cache()
    tokens = list(range(10))
    blocks = alloc.allocate(3)  # [0, 1, 2]; block 2 holds the partial page 8..9
    assert cache.insert(tokens, blocks) == 0
    assert [alloc.ref_count(b) for b in blocks] == [2, 2, 1]
    assert (cache.num_cached_blocks, cache.num_evictable_blocks) == (2, 2)

    full = cache.match_prefix(tokens)
    assert (full.block_ids, full.num_tokens) == ([0, 1], 8)
    partial = cache.match_prefix(tokens[:7])
    assert (partial.block_ids, partial.num_tokens) == ([0], 4)
    assert cache.match_prefix(tokens[:3]).num_tokens == 0
    assert cache.match_prefix([0, 1, 2, 9]).num_tokens == 0
    assert [alloc.ref_count(b) for b in blocks] == [2, 2, 1]  # matching takes no references
    alloc.free(blocks)
    assert alloc.num_used == 2


def test_match_inside_a_node_splits_it_at_the_page_boundary():
    alloc, cache = _cache()
    _insert_fresh(alloc, cache, list(range(12)))  # one node of 3 pages, blocks [0, 1, 2]
    m = cache.match_prefix(list(range(9)))
    assert (m.block_ids, m.num_tokens) == ([0, 1], 8)
    cache.lock(m.handle)  # protects exactly the 2 matched pages, not the third
    assert cache.num_evictable_blocks == 1
    assert cache.evict(16) == 1
    assert alloc.num_used == 2
    assert cache.match_prefix(list(range(12))).block_ids == [0, 1]
    cache.unlock(m.handle)
    assert cache.evict(16) == 2
    assert alloc.num_used == 0


def test_insert_sharing_a_prefix_increfs_only_new_pages():
    alloc, cache = _cache()
    _insert_fresh(alloc, cache, [1, 2, 3, 4, 5, 6, 7, 8])  # blocks [0, 1] stay in the tree
    other = alloc.allocate(3)  # [2, 3, 4]: the second request recomputed page 0 itself
    assert cache.insert([1, 2, 3, 4, 9, 9, 9, 9, 7, 7, 7, 7], other) == 4
    assert [alloc.ref_count(b) for b in [0, 1]] == [1, 1]
    assert [alloc.ref_count(b) for b in other] == [1, 2, 2]  # its page-0 duplicate untouched
    assert cache.match_prefix([1, 2, 3, 4, 9, 9, 9, 9, 7, 7, 7, 7]).block_ids == [0, 3, 4]
    assert alloc.free(other) == [2]  # the duplicate goes straight back to the pool
    assert cache.num_cached_blocks == 4
    assert cache.insert([1, 2, 3, 4, 5, 6, 7, 8], [7, 8]) == 8  # nothing new: no incref
    assert alloc.num_used == 4


def test_insert_rejects_bad_blocks_without_changing_anything():
    alloc, cache = _cache()
    blocks = _insert_fresh(alloc, cache, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="only 1 block ids"):
        cache.insert([5, 5, 5, 5, 6, 6, 6, 6], [9])
    with pytest.raises(ValueError, match="already holds another cached page"):
        cache.insert([5, 5, 5, 5], blocks)
    with pytest.raises(ValueError, match="block 9 is free"):
        cache.insert([5, 5, 5, 5], [9])
    assert len(cache.drain_events()) == 1  # only the first insert's
    assert (cache.num_cached_blocks, alloc.num_used) == (1, 1)


def test_evict_takes_least_recently_used_leaves_first():
    alloc, cache = _cache()
    a = _insert_fresh(alloc, cache, [1] * 8)  # blocks [0, 1]
    b = _insert_fresh(alloc, cache, [2] * 4)  # [2]
    c = _insert_fresh(alloc, cache, [3] * 4)  # [3]
    cache.match_prefix([1] * 8)  # a is now the most recent
    cache.drain_events()
    assert cache.evict(1) == 1
    assert alloc.ref_count(b[0]) == 0
    assert cache.evict(2) == 2  # c, then the deep page of a, which leaves a's first page
    assert [alloc.ref_count(x) for x in a + c] == [1, 0, 0]
    removed = cache.drain_events()
    assert [e.page_hashes for e in removed] == [
        tuple(page_hashes([2] * 4, 4)), tuple(page_hashes([3] * 4, 4)),
        tuple(page_hashes([1] * 8, 4)[1:])]
    assert removed[2].parent_hash == page_hashes([1] * 4, 4)[0]
    assert cache.match_prefix([1] * 8).block_ids == [0]


def test_a_match_refreshes_every_page_on_its_path():
    alloc, cache = _cache()
    _insert_fresh(alloc, cache, [1] * 4)  # block 0
    _insert_fresh(alloc, cache, [1] * 4 + [2] * 4)  # block 2 (block 1 was the duplicate)
    [other] = _insert_fresh(alloc, cache, [5] * 4)
    pin = cache.match_prefix([5] * 4)
    cache.lock(pin.handle)
    cache.match_prefix([1] * 4 + [2] * 4)  # page [1]* is now newer than [5]*
    assert cache.evict(1) == 1  # [2]*, the only unlocked leaf; [1]* becomes a leaf
    cache.unlock(pin.handle)  # this unlock does not make [5]* any more recent
    assert cache.evict(1) == 1
    assert alloc.ref_count(other) == 0
    assert cache.match_prefix([1] * 4).block_ids == [0]


def test_locked_path_and_its_ancestors_are_never_evicted():
    alloc, cache = _cache()
    _insert_fresh(alloc, cache, [1, 1, 1, 1, 2, 2, 2, 2])  # blocks [0, 1]
    _insert_fresh(alloc, cache, [1, 1, 1, 1, 3, 3, 3, 3])  # [2, 3]: 2 duplicates page 0
    _insert_fresh(alloc, cache, [4, 4, 4, 4])  # [4]
    deep = cache.match_prefix([1, 1, 1, 1, 2, 2, 2, 2, 5])
    cache.lock(deep.handle)
    cache.lock(deep.handle)  # locks nest
    assert cache.num_evictable_blocks == 2  # the [3]* page and the [4]* page
    assert cache.evict(16) == 2
    assert alloc.num_used == 2 and cache.num_evictable_blocks == 0
    cache.unlock(deep.handle)
    assert cache.evict(16) == 0  # still locked once
    cache.unlock(deep.handle)
    assert cache.num_evictable_blocks == 2
    assert cache.evict(16) == 2
    assert (alloc.num_used, cache.num_cached_blocks) == (0, 0)


def test_evict_zero_is_a_no_op_and_negative_is_an_error():
    alloc, cache = _cache()
    _insert_fresh(alloc, cache, [1, 2, 3, 4])
    assert cache.evict(0) == 0
    assert cache.num_cached_blocks == 1
    with pytest.raises(ValueError, match="negative"):
        cache.evict(-1)


def test_unlock_underflow_and_stale_handles_raise():
    alloc, cache = _cache()
    _insert_fresh(alloc, cache, [1] * 8)
    child = cache.match_prefix([1] * 8)
    parent = cache.match_prefix([1] * 4)
    with pytest.raises(ValueError, match="holds no lock"):
        cache.unlock(child.handle)
    cache.lock(child.handle)
    with pytest.raises(ValueError, match="holds no lock"):
        cache.unlock(parent.handle)  # the parent is protected, but not locked by its handle
    cache.unlock(child.handle)
    cache.evict(1)
    with pytest.raises(ValueError, match="stale handle"):
        cache.lock(child.handle)
    with pytest.raises(ValueError, match="stale handle"):
        _cache()[1].lock(parent.handle)
    cache.lock(parent.handle)


def test_events_describe_every_stored_and_removed_page():
    alloc, cache = _cache()
    _insert_fresh(alloc, cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    _insert_fresh(alloc, cache, [1, 2, 3, 4, 6, 6, 6, 6])
    h1, h2 = page_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    h3 = page_hashes([6, 6, 6, 6], 4, parent_hash=h1)[0]
    assert cache.drain_events() == [
        CacheEvent("stored", (h1, h2), None, (1, 2, 3, 4, 5, 6, 7, 8)),
        CacheEvent("stored", (h3,), h1, (6, 6, 6, 6)),
    ]
    assert cache.drain_events() == []
    cache.match_prefix([1, 2, 3, 4, 6])  # matching emits nothing, even when it splits
    assert cache.evict(3) == 3
    assert cache.drain_events() == [
        CacheEvent("removed", (h2,), h1, ()),
        CacheEvent("removed", (h3,), h1, ()),
        CacheEvent("removed", (h1,), None, ()),
    ]


def test_page_hashes_are_chained_pinned_and_independent_of_hash_seed():
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    hashes = page_hashes(tokens, 4)
    # Pinned: routers and workers of different versions must agree on these.
    assert hashes == [9121524398691793932, 5094574419050465977]
    assert page_hashes(tokens[4:], 4, parent_hash=hashes[0]) == hashes[1:]
    assert page_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4)[1] != hashes[1]  # depends on the parent
    code = ("from pdserve.runtime.radix_cache import page_hashes; "
            "print(page_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == str(hashes)


def test_lru_heap_stays_bounded_under_repeated_matches():
    alloc, cache = _cache()
    _insert_fresh(alloc, cache, [1] * 4)
    _insert_fresh(alloc, cache, [2] * 4)
    for _ in range(500):
        cache.match_prefix([1] * 4)
    assert len(cache._heap) <= 2 * 2 + 64 + 1  # stale entries are compacted away
    assert cache.evict(1) == 1
    assert cache.match_prefix([1] * 4).num_tokens == 4  # [2]* was least recently used


def test_disabled_cache_stores_nothing():
    alloc = BlockAllocator(4)
    cache = DisabledRadixCache(alloc, 4)
    blocks = alloc.allocate(2)
    assert cache.insert(list(range(8)), blocks) == 0
    m = cache.match_prefix(list(range(8)))
    assert (m.block_ids, m.num_tokens) == ([], 0)
    cache.lock(m.handle)
    cache.unlock(m.handle)
    with pytest.raises(ValueError, match="holds no lock"):
        cache.unlock(m.handle)
    assert cache.evict(4) == 0 and cache.drain_events() == []
    assert (cache.num_cached_blocks, cache.num_evictable_blocks) == (0, 0)
    assert [alloc.ref_count(b) for b in blocks] == [1, 1]


# ---------------------------------------------------------------------------------------
# Property test against a page-level reference: {page prefix: [block, last access]}.
# The tree evicts from the deep end of the LRU leaf, page by page, so the reference evicts
# the unprotected leaf page with the oldest access time (ties cannot happen: one operation
# touches one root path, and only the deepest page of a path can be a leaf).
# ---------------------------------------------------------------------------------------

BS = 2
NUM_BLOCKS = 20
TAIL = st.lists(st.integers(0, 2), max_size=5)


class RadixCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.alloc = BlockAllocator(NUM_BLOCKS)
        self.cache = RadixCache(self.alloc, BS)
        self.pages: dict[tuple[int, ...], list[int]] = {}
        self.clock = 0
        self.locks: list[tuple[object, tuple[int, ...]]] = []  # (handle, locked prefix)
        self.requests: list[tuple[object, tuple[int, ...], tuple[int, ...], list[int]]] = []
        self.live_hashes: set[int] = set()
        self.seen: list[tuple[int, ...]] = []  # earlier sequences, to draw shared prefixes

    def _draw_tokens(self, data, min_size: int = 0) -> list[int]:
        """A cut of an earlier sequence plus a fresh tail: prefixes are shared often."""
        base = data.draw(st.sampled_from(self.seen)) if self.seen else ()
        tokens = list(base[:data.draw(st.integers(0, len(base)))]) + data.draw(TAIL)
        tokens = tokens[:10] or [0] * min_size
        self.seen.append(tuple(tokens))
        return tokens

    # -- reference model --
    def _prefixes(self, tokens) -> list[tuple[int, ...]]:
        return [tuple(tokens[:i * BS]) for i in range(1, len(tokens) // BS + 1)]

    def _ref_match(self, tokens) -> list[tuple[int, ...]]:
        matched = []
        for p in self._prefixes(tokens):
            if p not in self.pages:
                break
            matched.append(p)
        return matched

    def _touch(self, prefixes) -> None:
        self.clock += 1
        for p in prefixes:
            self.pages[p][1] = self.clock

    def _protected(self) -> set[tuple[int, ...]]:
        locked = [lp for _, lp in self.locks] + [r[2] for r in self.requests]
        return {p for lp in locked for p in self._prefixes(lp)}

    def _held(self) -> list[int]:
        return [b for r in self.requests for b in r[3]]

    def _ref_evict(self, n: int) -> int:
        protected, held, released = self._protected(), set(self._held()), 0
        while released < n:
            parents = {p[:-BS] for p in self.pages}
            leaves = [p for p in self.pages if p not in parents and p not in protected]
            if not leaves:
                break
            times = sorted(self.pages[p][1] for p in leaves)
            assert len(times) == 1 or times[0] < times[1]
            victim = min(leaves, key=lambda p: self.pages[p][1])
            released += self.pages.pop(victim)[0] not in held
        return released

    def _match(self, tokens):
        m = self.cache.match_prefix(tokens)
        expected = self._ref_match(tokens)
        assert m.num_tokens == len(expected) * BS
        assert m.block_ids == [self.pages[p][0] for p in expected]
        self._touch(expected)
        return m

    def _insert(self, tokens, blocks) -> None:
        prefixes = self._prefixes(tokens)
        assert self.cache.insert(tokens, blocks) == len(self._ref_match(tokens)) * BS
        for p, b in zip(prefixes, blocks):
            self.pages.setdefault(p, [b, 0])
        self._touch(prefixes)

    def _evict(self, n: int) -> None:
        assert self.cache.evict(n) == self._ref_evict(n)

    # -- rules --
    @rule(data=st.data())
    def match(self, data):
        self._match(self._draw_tokens(data))

    @rule(data=st.data())
    def lock_only(self, data):  # a holder that pins pages without a block table
        tokens = self._draw_tokens(data)
        m = self._match(tokens)
        self.cache.lock(m.handle)
        self.locks.append((m.handle, tuple(tokens[:m.num_tokens])))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data):
        handle, _ = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.cache.unlock(handle)

    @rule(data=st.data())
    def start_request(self, data):
        tokens = self._draw_tokens(data, min_size=1)
        m = self._match(tokens[:-1])  # the last token is always computed
        self.cache.lock(m.handle)  # before evicting for the rest
        self.alloc.incref(m.block_ids)
        request = (m.handle, tuple(tokens), tuple(tokens[:m.num_tokens]), list(m.block_ids))
        self.requests.append(request)
        need = -(-len(tokens) // BS) - len(m.block_ids)
        if need > self.alloc.num_free:
            self._evict(need - self.alloc.num_free)
        if need > self.alloc.num_free:  # admission fails: give back what it took
            self.requests.pop()
            self.cache.unlock(m.handle)
            self.alloc.free(m.block_ids)
            return
        request[3].extend(self.alloc.allocate(need))

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def checkpoint_request(self, data):  # insert while still running (prefill before send)
        _, tokens, _, blocks = self.requests[data.draw(st.integers(0, len(self.requests) - 1))]
        self._insert(tokens, blocks)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def finish_request(self, data):
        handle, tokens, _, blocks = self.requests.pop(
            data.draw(st.integers(0, len(self.requests) - 1)))
        self._insert(tokens, blocks)
        self.cache.unlock(handle)
        self.alloc.free(blocks)

    @rule(n=st.integers(0, NUM_BLOCKS))
    def evict(self, n):
        self._evict(n)

    # -- invariants --
    @invariant()
    def events_mirror_the_tree(self):
        for ev in self.cache.drain_events():
            if ev.kind == "stored":
                assert ev.parent_hash is None or ev.parent_hash in self.live_hashes
                assert list(ev.page_hashes) == page_hashes(ev.token_ids, BS, ev.parent_hash)
                assert not self.live_hashes & set(ev.page_hashes)
                self.live_hashes |= set(ev.page_hashes)
            else:
                assert ev.kind == "removed" and ev.token_ids == ()
                assert set(ev.page_hashes) <= self.live_hashes
                self.live_hashes -= set(ev.page_hashes)
        assert self.live_hashes == {page_hashes(p, BS)[-1] for p in self.pages}

    @invariant()
    def references_add_up(self):
        tree_blocks = {b for b, _ in self.pages.values()}
        held = self._held()
        assert self.cache.num_cached_blocks == len(self.pages) == len(tree_blocks)
        assert self.alloc.num_used == len(tree_blocks | set(held))
        for b in tree_blocks | set(held):
            assert self.alloc.ref_count(b) == (b in tree_blocks) + held.count(b)

    @invariant()
    def locked_pages_stay_and_evictable_count_is_exact(self):
        protected = self._protected()
        assert protected <= self.pages.keys()
        assert self.cache.num_evictable_blocks == len(self.pages.keys() - protected)

    def teardown(self):
        for handle, _ in self.locks:
            self.cache.unlock(handle)
        for handle, _, _, blocks in self.requests:
            self.cache.unlock(handle)
            self.alloc.free(blocks)
        cached = self.cache.num_cached_blocks
        assert self.cache.num_evictable_blocks == cached
        assert self.cache.evict(NUM_BLOCKS) == cached
        assert (self.alloc.num_used, self.cache.num_cached_blocks) == (0, 0)


RadixCacheMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None)
test_radix_cache_matches_reference = RadixCacheMachine.TestCase
