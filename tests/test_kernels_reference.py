"""The PyTorch reference kernels against naive dense computations written out longhand."""

import math

import pytest
import torch

from pdserve.kernels.attention import paged_attention_ref
from pdserve.kernels.kv_store import store_kv_ref
from pdserve.kernels.rmsnorm import rms_norm_ref
from pdserve.kernels.rope import rope_cos_sin_cache, rope_ref


def naive_attention(q, k, v, scale):
    """q: [n, H, D] at the last n positions of k, v: [L, KVH, D]; explicit softmax."""
    n, heads, _ = q.shape
    context_len, kv_heads, _ = k.shape
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k.double()) * scale
    query_pos = torch.arange(context_len - n, context_len)[:, None]
    scores = scores.masked_fill(torch.arange(context_len)[None, :] > query_pos, -math.inf)
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v.double()).float()


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_matches_dense(heads, kv_heads, block_size):
    torch.manual_seed(0)
    head_dim, num_blocks = 16, 128
    # (new tokens, context) per sequence: decode, full prefill, chunk after a prefix,
    # a context exactly on a block boundary.
    shapes = [(1, 1), (1, 37), (9, 9), (5, 21), (min(3, 2 * block_size), 2 * block_size)]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    perm = torch.randperm(num_blocks).tolist()  # scattered, non-contiguous block tables
    tables, next_block = [], 0
    for _, context_len in shapes:
        pages = -(-context_len // block_size)
        tables.append(perm[next_block:next_block + pages])
        next_block += pages
    assert next_block <= num_blocks
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(sum(n for n, _ in shapes), heads, head_dim)
    scale = head_dim ** -0.5
    out = paged_attention_ref(q, k_cache, v_cache, block_tables,
                              [n for n, _ in shapes], [c for _, c in shapes], scale)
    start = 0
    for (n, context_len), table in zip(shapes, tables):
        flat = torch.tensor(table)
        k = k_cache[flat].reshape(-1, kv_heads, head_dim)[:context_len]
        v = v_cache[flat].reshape(-1, kv_heads, head_dim)[:context_len]
        expected = naive_attention(q[start:start + n], k, v, scale)
        # fp32 kernel vs float64 longhand: rounding differences of a few ulps only.
        torch.testing.assert_close(out[start:start + n], expected, atol=1e-5, rtol=1e-5)
        start += n


def test_store_kv_writes_exactly_the_given_slots():
    k_cache = torch.zeros(4, 2, 1, 3)
    v_cache = torch.zeros(4, 2, 1, 3)
    k = torch.arange(9, dtype=torch.float32).view(3, 1, 3) + 1
    slots = torch.tensor([5, 0, -1])  # block 2 offset 1, block 0 offset 0, padding
    store_kv_ref(k, -k, k_cache, v_cache, slots)
    assert torch.equal(k_cache[2, 1, 0], k[0, 0])
    assert torch.equal(v_cache[0, 0, 0], -k[1, 0])
    assert int((k_cache != 0).sum()) == 6  # the padding token wrote nothing


def test_rms_norm_with_residual():
    torch.manual_seed(0)
    x, residual, weight = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    out, new_residual = rms_norm_ref(x, weight, 1e-6, residual)
    s = x + residual
    expected = weight * s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out, expected)
    assert torch.equal(new_residual, s)


def test_rope_rotates_pairs_by_position_angle():
    head_dim = 4
    inv_freq = torch.tensor([1.0, 0.5])
    q = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    positions = torch.tensor([3])
    q_rot, _ = rope_ref(q, q.clone(), positions, rope_cos_sin_cache(inv_freq, 8))
    # NeoX layout pairs element i with i + head_dim/2.
    expected = []
    for i, f in enumerate(inv_freq.tolist()):
        a, b = q[0, 0, i].item(), q[0, 0, i + head_dim // 2].item()
        angle = 3 * f
        expected.append((a * math.cos(angle) - b * math.sin(angle), a * math.sin(angle) + b * math.cos(angle)))
    got = q_rot[0, 0]
    for i, (a, b) in enumerate(expected):
        assert got[i].item() == pytest.approx(a, abs=1e-6)
        assert got[i + 2].item() == pytest.approx(b, abs=1e-6)


