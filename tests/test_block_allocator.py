import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.runtime.block_allocator import BlockAllocator, OutOfBlocksError


def test_allocate_gives_distinct_blocks_in_order():
    alloc = BlockAllocator(8)
    assert alloc.allocate(3) == [0, 1, 2]
    assert alloc.allocate(2) == [3, 4]
    assert (alloc.num_used, alloc.num_free) == (5, 3)


def test_shared_block_is_freed_by_its_last_holder():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    alloc.incref(blocks[:1])
    assert alloc.ref_count(blocks[0]) == 2
    assert alloc.free(blocks) == [blocks[1]]
    assert alloc.free(blocks[:1]) == [blocks[0]]
    assert alloc.num_free == 4


def test_exhaustion_is_all_or_nothing_and_says_why():
    alloc = BlockAllocator(4)
    alloc.allocate(3)
    with pytest.raises(OutOfBlocksError, match="2 blocks requested, 1 of 4 free"):
        alloc.allocate(2)
    assert alloc.num_free == 1


def test_double_free_and_incref_of_free_block_are_errors():
    alloc = BlockAllocator(2)
    [b] = alloc.allocate(1)
    alloc.free([b])
    with pytest.raises(ValueError, match="freed more often"):
        alloc.free([b])
    with pytest.raises(ValueError, match="is free"):
        alloc.incref([b])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "incref", "free"]), st.integers(0, 5)), max_size=60))
def test_ref_counts_match_a_naive_model(ops):
    alloc = BlockAllocator(10)
    holders: list[int] = []  # one entry per reference held
    for op, n in ops:
        if op == "alloc":
            if n <= alloc.num_free:
                holders += alloc.allocate(n)
            else:
                with pytest.raises(OutOfBlocksError):
                    alloc.allocate(n)
        elif op == "incref" and holders:
            block = holders[n % len(holders)]
            alloc.incref([block])
            holders.append(block)
        elif op == "free" and holders:
            block = holders.pop(n % len(holders))
            alloc.free([block])
        live = set(holders)
        assert alloc.num_used == len(live)
        for b in range(10):
            assert alloc.ref_count(b) == holders.count(b)
