"""Page-aligned radix tree over token ids (RadixAttention prefix reuse).

Both workers keep one. Decode matches a prompt before it reserves blocks for the rest,
prefill matches to skip computing a cached prefix, and both insert finished sequences.
Only whole pages are cached: page i of a sequence is tokens [i*block_size, (i+1)*block_size)
and maps to exactly one block id. A node holds one or more consecutive pages; each page
also carries a chain hash (see `page_hashes`) so the router can mirror the tree from events.

Ownership rule (what makes "no leak" provable):

    The tree holds exactly one allocator reference for each block it contains. It takes
    that reference in `insert`, only for pages it did not already have, and drops it in
    `evict` when the page leaves the tree. It never touches any other reference, and
    `match_prefix`, `lock` and `unlock` change no reference count. So every caller frees
    each block it allocated or incref'd exactly once, whether or not the tree kept it:

        m = cache.match_prefix(prompt[:-1])  # cap it yourself: one token must stay uncomputed
        cache.lock(m.handle)                 # before any evict: the matched pages stay put
        allocator.incref(m.block_ids)        # the request's block table holds them too
        table = m.block_ids + allocator.allocate(n)      # evict(k) first if short
        ...                                              # run the request
        cache.insert(tokens, table)          # increfs only the pages the tree lacked
        cache.unlock(m.handle)
        allocator.free(table)                # duplicates of tree pages return to the pool
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal, NamedTuple

from pdserve.runtime.block_allocator import BlockAllocator


class CacheHandle:
    """Opaque token for a matched path. Pass it back to `lock`/`unlock` of the cache that
    made it; it stays valid while locked, and until the next `evict` when not."""

    __slots__ = ()


class PrefixMatch(NamedTuple):
    handle: CacheHandle
    block_ids: list[int]  # one per cached page, in order
    num_tokens: int  # == len(block_ids) * block_size


class CacheEvent(NamedTuple):
    kind: Literal["stored", "removed"]
    page_hashes: tuple[int, ...]  # consecutive pages along one path, shallowest first
    parent_hash: int | None  # hash of the page before the first one; None at the root
    token_ids: tuple[int, ...]  # tokens of the stored pages; empty for removals


def page_hashes(
    token_ids: Sequence[int], block_size: int, parent_hash: int | None = None
) -> list[int]:
    """Chain hashes of the whole pages of token_ids (a trailing partial page is skipped).

    hash_i = blake2b-64(parent marker, hash_{i-1}, page i tokens as int64 little-endian),
    with hash_{-1} = parent_hash. Pure and identical across processes and Python runs, so a
    router hashes a prompt with it and compares against the hashes in `CacheEvent`s.
    """
    hashes = []
    page = struct.Struct(f"<{block_size}q")
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hashlib.blake2b(digest_size=8)
        if parent_hash is None:
            h.update(b"\x00")
        else:
            h.update(b"\x01" + parent_hash.to_bytes(8, "little"))
        h.update(page.pack(*token_ids[start:start + block_size]))
        parent_hash = int.from_bytes(h.digest(), "little")
        hashes.append(parent_hash)
    return hashes


class PrefixCache(ABC):
    """Prefix cache interface. Single-threaded: the owning scheduler is its only caller."""

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.allocator = allocator
        self.block_size = block_size

    @abstractmethod
    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        """Longest cached page-aligned prefix of token_ids; refreshes its LRU time.

        The cache does not keep a token uncomputed: a fully cached, page-aligned input
        matches in full. Callers that need logits for the last token pass token_ids[:-1].
        May split a node at a page boundary; changes no reference count. Lock the handle
        before the next `evict` to keep the matched blocks.
        """

    @abstractmethod
    def lock(self, handle: CacheHandle) -> None:
        """Protect the matched pages (the handle's path to the root) from eviction.

        Locks nest. Raises ValueError for a handle whose pages were evicted or that came
        from another cache.
        """

    @abstractmethod
    def unlock(self, handle: CacheHandle) -> None:
        """Undo one `lock(handle)`. Raises ValueError if the handle holds no lock."""

    @abstractmethod
    def insert(self, token_ids: Sequence[int], block_ids: Sequence[int]) -> int:
        """Cache the whole pages of token_ids; return how many tokens were already cached.

        block_ids[i] holds page i; it needs at least len(token_ids) // block_size entries
        (a trailing partial page and its block are ignored). For pages the tree lacks it
        increfs the caller's block; for pages it has it keeps its own block and leaves the
        caller's untouched. Refreshes the LRU time of the whole path. Raises ValueError,
        changing nothing, if a new page's block is free or already in the tree.
        """

    @abstractmethod
    def evict(self, num_blocks: int) -> int:
        """Remove unlocked pages, least recently used leaves first, until num_blocks blocks
        were released or nothing unlocked is left; return the number released.

        Pages go from the deep end of a leaf, so it never releases more than num_blocks.
        A removed page whose block has another holder releases nothing and does not count.
        `evict(0)` is always safe and does nothing.
        """

    @abstractmethod
    def drain_events(self) -> list[CacheEvent]:
        """Stored/removed page events since the last call, in order; clears them."""

    @property
    @abstractmethod
    def num_cached_blocks(self) -> int:
        """Blocks the tree holds a reference to (one per cached page)."""

    @property
    @abstractmethod
    def num_evictable_blocks(self) -> int:
        """Cached pages with no lock at or below them: exactly what `evict` may remove.
        It releases all of them when the tree is their only holder, which the ownership
        rule guarantees for pages no running request holds."""

    def _num_pages(self, token_ids: Sequence[int], block_ids: Sequence[int]) -> int:
        num_pages = len(token_ids) // self.block_size
        if len(block_ids) < num_pages:
            raise ValueError(
                f"{len(token_ids)} tokens fill {num_pages} pages of {self.block_size} but "
                f"only {len(block_ids)} block ids were given; pass the whole block table"
            )
        return num_pages


class _Node(CacheHandle):
    __slots__ = (
        "block_ids",
        "children",
        "hashes",
        "last_access",
        "own_locks",
        "parent",
        "subtree_locks",
        "tokens",
    )

    def __init__(self, parent: _Node | None, tokens: tuple[int, ...], block_ids: list[int],
                 hashes: list[int], last_access: int) -> None:
        self.parent = parent  # None for the root and for evicted nodes
        self.children: dict[tuple[int, ...], _Node] = {}  # keyed by the child's first page
        self.tokens = tokens
        self.block_ids = block_ids
        self.hashes = hashes
        self.last_access = last_access
        self.subtree_locks = 0  # locks held on this node or below: > 0 means protected
        self.own_locks = 0  # locks held with this node as the handle


class RadixCache(PrefixCache):
    """Radix tree of pages. Costs: match/insert O(tokens + depth); lock/unlock O(depth);
    evict O((removed + stale) log heap); sizes O(1)."""

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        super().__init__(allocator, block_size)
        self._root = _Node(None, (), [], [], 0)
        self._clock = 0  # logical time: one tick per match/insert, so LRU has no ties
        self._blocks: set[int] = set()
        self._num_evictable = 0
        self._num_nodes = 0
        # Lazy min-heap of (last_access, seq, node) over unlocked leaves; an entry is
        # stale (skipped on pop) once its node is gone, has children, is locked, or was
        # touched again. Rebuilt when stale entries outnumber the nodes.
        self._heap: list[tuple[int, int, _Node]] = []
        self._seq = itertools.count()
        self._events: list[CacheEvent] = []

    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        path, tail, num_tokens = self._walk(tuple(token_ids))
        if path and tail < len(path[-1].block_ids):
            path[-1] = self._split(path[-1], tail)
        self._touch(path)
        blocks = [b for node in path for b in node.block_ids]
        return PrefixMatch(path[-1] if path else self._root, blocks, num_tokens)

    def lock(self, handle: CacheHandle) -> None:
        node = self._check_handle(handle)
        node.own_locks += 1
        while node is not self._root:
            if node.subtree_locks == 0:
                self._num_evictable -= len(node.block_ids)
            node.subtree_locks += 1
            node = node.parent

    def unlock(self, handle: CacheHandle) -> None:
        node = self._check_handle(handle)
        if node.own_locks == 0:
            raise ValueError("unlock() of a handle that holds no lock (unlocked twice?)")
        node.own_locks -= 1
        while node is not self._root:
            node.subtree_locks -= 1
            if node.subtree_locks == 0:
                self._num_evictable += len(node.block_ids)
                if not node.children:
                    self._push(node)
            node = node.parent

    def insert(self, token_ids: Sequence[int], block_ids: Sequence[int]) -> int:
        bs = self.block_size
        num_pages = self._num_pages(token_ids, block_ids)
        key = tuple(token_ids[:num_pages * bs])
        path, tail, num_present = self._walk(key)
        new_blocks = list(block_ids[num_present // bs:num_pages])
        self._check_new_blocks(new_blocks)
        if path and tail < len(path[-1].block_ids):
            path[-1] = self._split(path[-1], tail)
        if new_blocks:
            parent = path[-1] if path else self._root
            parent_hash = parent.hashes[-1] if parent.hashes else None
            tokens = key[num_present:]
            hashes = page_hashes(tokens, bs, parent_hash)
            leaf = _Node(parent, tokens, new_blocks, hashes, 0)
            parent.children[tokens[:bs]] = leaf
            self.allocator.incref(new_blocks)
            self._blocks.update(new_blocks)
            self._num_evictable += len(new_blocks)
            self._num_nodes += 1
            self._events.append(CacheEvent("stored", tuple(hashes), parent_hash, tokens))
            path.append(leaf)
        self._touch(path)
        return num_present

    def evict(self, num_blocks: int) -> int:
        if num_blocks < 0:
            raise ValueError(f"cannot evict a negative number of blocks ({num_blocks})")
        released = 0
        while released < num_blocks:
            node = self._pop_lru_leaf()
            if node is None:
                break
            keep = len(node.block_ids) - (num_blocks - released)
            if keep > 0:
                self._split(node, keep)  # the deep end stays in `node`; the rest is pushed
            released += self._remove_leaf(node)
        return released

    def drain_events(self) -> list[CacheEvent]:
        events, self._events = self._events, []
        return events

    @property
    def num_cached_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_evictable_blocks(self) -> int:
        # Maintained: += a node's pages when it is inserted or its subtree_locks drops to
        # 0, -= when it is locked from 0 or removed; splits keep both halves' lock state.
        return self._num_evictable

    def _walk(self, key: tuple[int, ...]) -> tuple[list[_Node], int, int]:
        """Read-only descent: (nodes along the longest cached page prefix of key, pages of
        it in the last node, matched tokens)."""
        bs, node, pos, tail = self.block_size, self._root, 0, 0
        path: list[_Node] = []
        while pos + bs <= len(key):
            child = node.children.get(key[pos:pos + bs])
            if child is None:
                break
            path.append(child)
            tail, pos = 1, pos + bs
            while (tail < len(child.block_ids) and pos + bs <= len(key)
                   and child.tokens[tail * bs:(tail + 1) * bs] == key[pos:pos + bs]):
                tail, pos = tail + 1, pos + bs
            if tail < len(child.block_ids):
                break
            node = child
        return path, tail, pos

    def _split(self, node: _Node, num_pages: int) -> _Node:
        """Move node's first num_pages pages into a new parent node and return it. `node`
        keeps the deep end, so a handle to it still names the same full path."""
        bs, parent = self.block_size, node.parent
        upper = _Node(parent, node.tokens[:num_pages * bs], node.block_ids[:num_pages],
                      node.hashes[:num_pages], node.last_access)
        upper.subtree_locks = node.subtree_locks
        parent.children[upper.tokens[:bs]] = upper
        node.tokens = node.tokens[num_pages * bs:]
        node.block_ids = node.block_ids[num_pages:]
        node.hashes = node.hashes[num_pages:]
        node.parent = upper
        upper.children[node.tokens[:bs]] = node
        self._num_nodes += 1
        return upper

    def _touch(self, path: list[_Node]) -> None:
        self._clock += 1
        for node in path:
            node.last_access = self._clock
        if path and not path[-1].children and path[-1].subtree_locks == 0:
            self._push(path[-1])

    def _push(self, node: _Node) -> None:
        heapq.heappush(self._heap, (node.last_access, next(self._seq), node))
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._heap = [(n.last_access, next(self._seq), n) for n in self._unlocked_leaves()]
            heapq.heapify(self._heap)

    def _pop_lru_leaf(self) -> _Node | None:
        while self._heap:
            last_access, _, node = heapq.heappop(self._heap)
            if (node.parent is not None and not node.children and node.subtree_locks == 0
                    and node.last_access == last_access):
                return node
        return None

    def _remove_leaf(self, node: _Node) -> int:
        parent = node.parent
        del parent.children[node.tokens[:self.block_size]]
        node.parent = None
        self._num_nodes -= 1
        self._num_evictable -= len(node.block_ids)
        self._blocks.difference_update(node.block_ids)
        parent_hash = parent.hashes[-1] if parent.hashes else None
        self._events.append(CacheEvent("removed", tuple(node.hashes), parent_hash, ()))
        if parent is not self._root and not parent.children and parent.subtree_locks == 0:
            self._push(parent)
        return len(self.allocator.free(node.block_ids))

    def _unlocked_leaves(self) -> list[_Node]:
        leaves, stack = [], list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.subtree_locks == 0:
                leaves.append(node)
        return leaves

    def _check_handle(self, handle: CacheHandle) -> _Node:
        if not isinstance(handle, _Node):
            raise TypeError(f"not a RadixCache handle: {handle!r}")
        top = handle
        while top.parent is not None:
            top = top.parent
        if top is not self._root:
            raise ValueError("stale handle: its pages were evicted (lock a handle before "
                             "the next evict) or it belongs to another cache")
        return handle

    def _check_new_blocks(self, blocks: list[int]) -> None:
        seen = set()
        for b in blocks:
            if b in self._blocks or b in seen:
                raise ValueError(f"block {b} already holds another cached page")
            if self.allocator.ref_count(b) <= 0:
                raise ValueError(f"block {b} is free; insert only blocks you hold")
            seen.add(b)


class _NoMatch(CacheHandle):
    __slots__ = ("locks",)

    def __init__(self) -> None:
        self.locks = 0


class DisabledRadixCache(PrefixCache):
    """No prefix reuse: nothing matches, nothing is stored, no events. Same contracts."""

    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        return PrefixMatch(_NoMatch(), [], 0)

    def lock(self, handle: CacheHandle) -> None:
        if not isinstance(handle, _NoMatch):
            raise TypeError(f"not a DisabledRadixCache handle: {handle!r}")
        handle.locks += 1

    def unlock(self, handle: CacheHandle) -> None:
        if not isinstance(handle, _NoMatch):
            raise TypeError(f"not a DisabledRadixCache handle: {handle!r}")
        if handle.locks == 0:
            raise ValueError("unlock() of a handle that holds no lock (unlocked twice?)")
        handle.locks -= 1

    def insert(self, token_ids: Sequence[int], block_ids: Sequence[int]) -> int:
        self._num_pages(token_ids, block_ids)
        return 0

    def evict(self, num_blocks: int) -> int:
        if num_blocks < 0:
            raise ValueError(f"cannot evict a negative number of blocks ({num_blocks})")
        return 0

    def drain_events(self) -> list[CacheEvent]:
        return []

    @property
    def num_cached_blocks(self) -> int:
        return 0

    @property
    def num_evictable_blocks(self) -> int:
        return 0
