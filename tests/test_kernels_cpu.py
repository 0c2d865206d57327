"""The compiled CPU batch attention against the per-sequence PyTorch reference.

`paged_attention_cpu` must give what `paged_attention_ref` gives on ragged mixed batches:
decode rows (one query) next to prefill chunks (shorter and longer than its 64-query
blocks, after a cached prefix or not), contexts of length 1 and on page edges,
scattered block tables, grouped-query attention with groups of 1, 3 and 8, head_dim 64
and 128. Both are float32 with different summation orders, so they agree to a few ulps
(1e-5), not bit for bit. The kernel is the CPU default: it must build here, never skip.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.attention import paged_attention_ref
from pdserve.kernels.cpu_attention import paged_attention_cpu
from pdserve.kernels.cpu_extension import build_directory_name, cpu_kernels_available


def _batch(shapes, block_size, kv_heads, heads, head_dim, seed=0):
    """Scattered pages for sequences of (queries, context) and their packed queries."""
    generator = torch.Generator().manual_seed(seed)
    pages = [-(-context // block_size) for _, context in shapes]
    num_blocks = sum(pages) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    tables, used = [], 0
    for n in pages:
        tables.append(perm[used:used + n])
        used += n
    width = max(pages)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(sum(n for n, _ in shapes), heads, head_dim, generator=generator)
    return q, k_cache, v_cache, block_tables


def _run_both(shapes, block_size=16, kv_heads=3, heads=9, head_dim=64):
    q, k_cache, v_cache, block_tables = _batch(shapes, block_size, kv_heads, heads, head_dim)
    query_lens = [n for n, _ in shapes]
    seq_lens = [c for _, c in shapes]
    scale = head_dim ** -0.5
    expected = paged_attention_ref(q, k_cache, v_cache, block_tables, query_lens, seq_lens, scale)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    got = paged_attention_cpu(q, k_cache, v_cache, block_tables, starts, torch.tensor(seq_lens), scale)
    return got, expected


def test_kernel_builds_on_this_machine():
    # The CPU default depends on it; a machine that cannot build it falls back to the
    # reference, but CI's machines must build it.
    assert cpu_kernels_available()


def test_each_checkout_and_source_content_builds_in_its_own_directory(tmp_path):
    import shutil

    from pdserve.kernels import cpu_extension

    first, second = tmp_path / "a" / "csrc", tmp_path / "b" / "csrc"
    for copy in (first, second):
        shutil.copytree(cpu_extension._CSRC, copy)
    assert build_directory_name(first) == build_directory_name(first)
    # The same sources at another path: ninja's build file would name other paths.
    assert build_directory_name(first) != build_directory_name(second)
    names = {build_directory_name(first)}
    (first / "block_linear_cpu.cpp").write_text((first / "block_linear_cpu.cpp").read_text() + "\n")
    assert build_directory_name(first) not in names  # an edited source builds anew


# Groups of 3, 1, 8 and 7 query heads per KV head: the decode kernel takes a group in
# chunks of up to 4 (head_dim 64) or 2 (128) heads, so these cover whole, split and
# remainder chunks.
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1), (14, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_ragged_decode_batch_matches_reference(heads, kv_heads, head_dim, block_size):
    # Context lengths: 1, page edges (block_size, 2 * block_size, +-1), long and short mixed.
    contexts = [1, block_size, block_size + 1, 2 * block_size - 1, 2 * block_size, 37, 150, 3]
    got, expected = _run_both([(1, c) for c in contexts], block_size, kv_heads, heads, head_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 16])
def test_mixed_batch_of_decodes_and_chunks_matches_reference(block_size):
    # decode, a whole prompt, a chunk after a cached prefix, a draft-verification chunk,
    # a single-token prompt, a chunk ending on a page edge.
    shapes = [(1, 40), (33, 33), (7, 70), (4, 19), (1, 1), (16, 32)]
    got, expected = _run_both(shapes, block_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_long_chunks_across_query_blocks_match_reference(heads, kv_heads):
    # Chunks of 64+ queries run as blocks of 64: a whole prompt of 150 (two full blocks and
    # a partial one), 130 new tokens after a 70-token prefix, exactly 64 and 65.
    shapes = [(150, 150), (130, 200), (64, 64), (65, 80), (1, 33)]
    got, expected = _run_both(shapes, 16, kv_heads, heads, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_sequence_does_not_depend_on_its_neighbours():
    # Output identical bit for bit whether a decode row runs alone or in a batch.
    q, k_cache, v_cache, block_tables = _batch([(1, 50), (1, 9), (5, 12)], 16, 3, 9, 64)
    full = paged_attention_cpu(q, k_cache, v_cache, block_tables, torch.tensor([0, 1, 2, 7]),
                               torch.tensor([50, 9, 12]), 0.125)
    alone = paged_attention_cpu(q[1:2].contiguous(), k_cache, v_cache, block_tables[1:2],
                                torch.tensor([0, 1]), torch.tensor([9]), 0.125)
    torch.testing.assert_close(full[1:2], alone, atol=0, rtol=0)


def test_rejects_inconsistent_lengths():
    q, k_cache, v_cache, block_tables = _batch([(1, 20)], 16, 3, 9, 64)
    with pytest.raises(RuntimeError, match="queries for context"):
        paged_attention_cpu(q, k_cache, v_cache, block_tables, torch.tensor([0, 1]),
                            torch.tensor([0]), 0.125)
    with pytest.raises(RuntimeError, match="block table"):
        paged_attention_cpu(q, k_cache, v_cache, block_tables, torch.tensor([0, 1]),
                            torch.tensor([40]), 0.125)
    with pytest.raises(RuntimeError, match="float32"):
        paged_attention_cpu(q.double(), k_cache, v_cache, block_tables, torch.tensor([0, 1]),
                            torch.tensor([20]), 0.125)


def test_chunks_run_on_several_threads_in_inference_mode():
    # The engine calls the kernel under inference mode; the chunk tasks run on the worker
    # threads, which must write its inference tensors too.
    shapes = [(150, 150), (70, 90)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            got, expected = _run_both(shapes)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
