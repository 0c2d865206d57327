"""The Triton KV store, decode and extend attention kernels over an int8 / fp8 KV cache,
each against its PyTorch reference (Triton's interpreter on the CPU, conftest; float32
and float16 queries, as in test_kernels_triton.py).

The store quantizes with the same float32 operations as the reference, so its values and
scales are bit-identical. The attention kernels dequantize each row to the query's dtype
as the reference does, so they differ from it only as on a float cache (summation order,
probabilities rounded to that dtype): the same tolerances.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_triton import DEVICE, HEAD_SHAPES, TOLERANCE, paged_tables

from pdserve.kernels.decode_attention import decode_attention, decode_attention_ref
from pdserve.kernels.extend_attention import extend_attention, extend_attention_ref
from pdserve.kernels.kv_quant import quantize_kv_ref
from pdserve.kernels.kv_store import store_kv_ref
from pdserve.kernels.kv_store_triton import store_kv

QUANT_DTYPES = [torch.int8, torch.float8_e4m3fn]


def quantized_cache(num_blocks, page_size, kv_heads, head_dim, dtype, generator):
    """(k, v, k_scale, v_scale) of a random cache as the store would have written it."""
    shape = (num_blocks, page_size, kv_heads, head_dim)
    (k, k_s), (v, v_s) = (quantize_kv_ref(torch.randn(shape, generator=generator), dtype) for _ in range(2))
    return k.to(DEVICE), v.to(DEVICE), k_s.to(DEVICE), v_s.to(DEVICE)


@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv_quantizes_bit_for_bit_as_the_reference(cache_dtype, dtype):
    g = torch.Generator().manual_seed(5)
    kv_heads, head_dim, page_size = 3, 64, 4
    fused = torch.randn(6, 2 * kv_heads * head_dim + 8, generator=g).to(DEVICE, dtype)
    k = fused[:, :kv_heads * head_dim].view(6, kv_heads, head_dim)
    v = fused[:, kv_heads * head_dim:2 * kv_heads * head_dim].view(6, kv_heads, head_dim)
    k[1, 2] = 0  # an all-zero row: scale 0, values 0
    slots = torch.tensor([5, 0, -1, 31, 8, -1], device=DEVICE)
    caches = [torch.zeros(8, page_size, kv_heads, head_dim, dtype=cache_dtype, device=DEVICE) for _ in range(4)]
    scales = [torch.zeros(8, page_size, kv_heads, dtype=torch.float16, device=DEVICE) for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], slots, scales[0], scales[1])
    store_kv_ref(k, v, caches[2], caches[3], slots, scales[2], scales[3])
    for got, expected in zip(caches[:2] + scales[:2], caches[2:] + scales[2:]):
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    assert int((caches[0].view(torch.uint8) != 0).any(-1).any(-1).sum()) == 4  # padding wrote nothing
    assert float(scales[0].view(-1, kv_heads)[0, 2]) == 0.0


@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_SHAPES[:2])
def test_decode_attention_over_a_quantized_cache_matches_reference(heads, kv_heads, head_dim, dtype, cache_dtype):
    g = torch.Generator().manual_seed(heads * 100 + head_dim + 1)
    page_size, num_blocks = 4, 48
    context_lens = [1, 4, 5, 23, 37]
    k, v, k_s, v_s = quantized_cache(num_blocks, page_size, kv_heads, head_dim, cache_dtype, g)
    tables = paged_tables(context_lens, page_size, num_blocks, g)
    q = torch.randn(len(context_lens), heads, head_dim, generator=g).to(DEVICE, dtype)
    seq_lens = torch.tensor(context_lens, device=DEVICE)
    scale = head_dim ** -0.5
    expected = decode_attention_ref(q, k, v, tables, seq_lens, scale, k_scale=k_s, v_scale=v_s)
    for num_splits in (1, 3):
        out = decode_attention(q, k, v, tables, seq_lens, scale, num_splits=num_splits, block_n=16,
                               k_scale=k_s, v_scale=v_s)
        torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extend_attention_over_a_quantized_cache_matches_reference(dtype, cache_dtype):
    heads, kv_heads, head_dim = HEAD_SHAPES[1]
    g = torch.Generator().manual_seed(11)
    page_size, num_blocks = 4, 64
    shapes = [(1, 1), (19, 19), (6, 15), (5, 40), (1, 9)]
    k, v, k_s, v_s = quantized_cache(num_blocks, page_size, kv_heads, head_dim, cache_dtype, g)
    tables = paged_tables([c for _, c in shapes], page_size, num_blocks, g)
    query_lens = [n for n, _ in shapes]
    query_start = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), device=DEVICE)
    seq_lens = torch.tensor([c for _, c in shapes], device=DEVICE)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g).to(DEVICE, dtype)
    args = (q, k, v, tables, query_start, seq_lens, max(query_lens), head_dim ** -0.5)
    out = extend_attention(*args, block_m=16, block_n=16, k_scale=k_s, v_scale=v_s)
    torch.testing.assert_close(out, extend_attention_ref(*args, k_scale=k_s, v_scale=v_s), **TOLERANCE[dtype])
