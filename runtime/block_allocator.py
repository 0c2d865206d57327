"""Reference-counted allocator of KV blocks. The scheduler is its only caller.

Block ids are the only currency between the scheduler, the radix cache and KV transfer.
A block is free exactly when its reference count is zero; every holder (a running
request, a radix-tree node, an in-flight transfer) owns one reference.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than requested. Nothing was allocated."""


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        # Invariant: a block id is in _free exactly when its ref count is 0.
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks, each with reference count 1. All or nothing."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise OutOfBlocksError(
                f"KV cache exhausted: {n} blocks requested, {len(self._free)} of "
                f"{self.num_blocks} free; raise the KV cache size or lower the batch size"
            )
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def incref(self, blocks: Iterable[int]) -> None:
        """Add a holder to blocks that are already allocated."""
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise ValueError(f"block {b} is free; only allocated blocks can be shared")
            self._ref_counts[b] += 1

    def free(self, blocks: Iterable[int]) -> list[int]:
        """Drop one reference from each block; return the blocks that became free."""
        released = []
        for b in blocks:
            count = self._ref_counts[b]
            if count <= 0:
                raise ValueError(f"block {b} freed more often than it was allocated")
            self._ref_counts[b] = count - 1
            if count == 1:
                self._free.append(b)
                released.append(b)
        return released
