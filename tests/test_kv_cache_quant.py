"""A quantized KV cache (int8, fp8): storage round trip, pool sizing, and attention over
it by the PyTorch reference and the C++ CPU kernels.

Bounds come from kernels/kv_quant.py: int8 rounds each value to within half a step
(scale / 2, scale = row amax / 127); e4m3 keeps 3 mantissa bits (relative 2^-4), plus a
subnormal floor of scale * 2^-10. Attention over a dequantized cache is compared to the
reference on the same dequantized values, so only summation order differs (1e-5).
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.attention import paged_attention_ref
from pdserve.kernels.cpu_attention import paged_attention_cpu
from pdserve.kernels.cpu_layer_ops import store_kv_cpu
from pdserve.kernels.kv_quant import KV_QMAX, dequantize_kv_ref, quantize_kv_ref
from pdserve.kernels.kv_store import store_kv_ref
from pdserve.runtime.config import CacheConfig, ConfigError, ModelConfig
from pdserve.runtime.kv_pool import KVPool, bytes_per_block

QUANT_DTYPES = [torch.int8, torch.float8_e4m3fn]


def _rows(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes, one all-zero row: per-row scales must handle each.
    x = torch.randn(*shape, generator=generator) * torch.logspace(-3, 2, shape[-2])[:, None]
    x[0, 0] = 0.0
    return x


@pytest.mark.parametrize("dtype", QUANT_DTYPES)
def test_round_trip_error_within_the_bound(dtype):
    x = _rows((5, 6, 64))
    q, s = quantize_kv_ref(x, dtype)
    assert q.dtype == dtype and s.dtype == torch.float16 and s.shape == x.shape[:-1]
    back = dequantize_kv_ref(q, s)
    step = s.float()[..., None]
    if dtype == torch.int8:
        bound = step / 2 * (1 + 1e-6)
    else:
        bound = torch.maximum(x.abs() * 2.0 ** -4, step * 2.0 ** -10) * (1 + 1e-6)
    assert bool(((back - x).abs() <= bound).all())
    assert bool((back[0, 0] == 0).all())  # an all-zero row stays exactly zero
    # No value is clipped: the row's largest lands within one step of its own amax.
    amax = x.abs().amax(-1)
    assert bool((back.abs().amax(-1) - amax).abs().le(step[..., 0] * KV_QMAX[dtype] * 2.0 ** -3 + 1e-12).all())


@pytest.mark.parametrize("dtype", QUANT_DTYPES)
def test_store_quantizes_each_row_alone_and_cpp_matches_bit_for_bit(dtype):
    tokens, kv_heads, head_dim, blocks, block_size = 7, 3, 64, 4, 4
    k, v = _rows((tokens, kv_heads, head_dim), 1), _rows((tokens, kv_heads, head_dim), 2)
    slots = torch.tensor([3, 0, 9, -1, 15, 4, 8])
    caches = [torch.zeros(blocks, block_size, kv_heads, head_dim, dtype=dtype) for _ in range(4)]
    scales = [torch.zeros(blocks, block_size, kv_heads, dtype=torch.float16) for _ in range(4)]
    store_kv_ref(k, v, caches[0], caches[1], slots, scales[0], scales[1])
    store_kv_cpu(k, v, caches[2], caches[3], slots, scales[2], scales[3])
    for ref, cpp in ((caches[0], caches[2]), (caches[1], caches[3]), (scales[0], scales[2]), (scales[1], scales[3])):
        assert torch.equal(ref.view(torch.uint8), cpp.view(torch.uint8))
    # Token 2 alone writes what it wrote beside the others: no per-batch scale.
    alone_k = torch.zeros_like(caches[0])
    alone_s = torch.zeros_like(scales[0])
    store_kv_ref(k[2:3], v[2:3], alone_k, torch.zeros_like(alone_k), slots[2:3], alone_s, torch.zeros_like(alone_s))
    flat = caches[0].view(-1, kv_heads, head_dim)
    assert torch.equal(alone_k.view(-1, kv_heads, head_dim)[9].view(torch.uint8), flat[9].view(torch.uint8))
    assert torch.equal(alone_s.view(-1, kv_heads)[9], scales[0].view(-1, kv_heads)[9])
    padding_slot = caches[0].view(-1, kv_heads, head_dim)[1]
    assert not padding_slot.float().any()  # slot 1 was only a padding token's: never written


def _quantized_batch(shapes, dtype, block_size=16, kv_heads=3, heads=9, head_dim=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pages = [-(-context // block_size) for _, context in shapes]
    num_blocks = sum(pages) + 2
    k, v = (torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator) for _ in range(2))
    (k_q, k_s), (v_q, v_s) = quantize_kv_ref(k, dtype), quantize_kv_ref(v, dtype)
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    tables, used = [], 0
    for n in pages:
        tables.append(perm[used:used + n])
        used += n
    block_tables = torch.tensor([t + [0] * (max(pages) - len(t)) for t in tables])
    q = torch.randn(sum(n for n, _ in shapes), heads, head_dim, generator=generator)
    return q, (k_q, v_q, k_s, v_s), block_tables


@pytest.mark.parametrize("dtype", QUANT_DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 1, 128), (4, 4, 32)])
def test_attention_over_quantized_cache_ref_and_cpp_agree(dtype, heads, kv_heads, head_dim):
    # Decode rows, a prefill chunk after a prefix, a whole prompt: both paths of each kernel.
    shapes = [(1, 37), (5, 40), (1, 1), (70, 70), (1, 16)]
    q, (k_q, v_q, k_s, v_s), tables = _quantized_batch(shapes, dtype, kv_heads=kv_heads, heads=heads,
                                                       head_dim=head_dim)
    query_lens, seq_lens = [n for n, _ in shapes], [c for _, c in shapes]
    scale = head_dim ** -0.5
    ref = paged_attention_ref(q, k_q, v_q, tables, query_lens, seq_lens, scale, k_s, v_s)
    # The reference over a quantized cache is the reference over its dequantized copy.
    dense = paged_attention_ref(q, dequantize_kv_ref(k_q, k_s), dequantize_kv_ref(v_q, v_s), tables,
                                query_lens, seq_lens, scale)
    assert torch.equal(ref, dense)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    got = paged_attention_cpu(q, k_q, v_q, tables, starts, torch.tensor(seq_lens), scale, k_s, v_s)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_cpp_refuses_mismatched_scales():
    q, (k_q, v_q, k_s, v_s), tables = _quantized_batch([(1, 5)], torch.int8)
    starts, lens = torch.tensor([0, 1]), torch.tensor([5])
    with pytest.raises(RuntimeError, match="scales"):
        paged_attention_cpu(q, k_q, v_q, tables, starts, lens, 0.1, k_s.float(), v_s)
    with pytest.raises(RuntimeError, match="go together"):
        paged_attention_cpu(q, k_q, v_q, tables, starts, lens, 0.1, k_s, None)


@pytest.mark.parametrize("dtype", QUANT_DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 2, 64), (6, 1, 128), (4, 4, 32), (4, 2, 48)])
def test_quantized_decode_at_every_length_matches_ref_and_ignores_the_batch(dtype, heads, kv_heads, head_dim):
    # Decode rows only (the C++ decode kernel): lengths on both sides of its 16-position
    # groups and of a page, groups of 1 to 6 query heads, head_dims with and without the
    # vectorised path. Each row's result must be bit-identical alone and in the batch.
    contexts = [1, 15, 16, 17, 31, 33, 100]
    shapes = [(1, c) for c in contexts]
    q, (k_q, v_q, k_s, v_s), tables = _quantized_batch(shapes, dtype, kv_heads=kv_heads, heads=heads,
                                                       head_dim=head_dim, seed=3)
    scale = head_dim ** -0.5
    lens = torch.tensor(contexts)
    ref = paged_attention_ref(q, k_q, v_q, tables, [1] * len(contexts), contexts, scale, k_s, v_s)
    got = paged_attention_cpu(q, k_q, v_q, tables, torch.arange(len(contexts) + 1), lens, scale, k_s, v_s)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for b in range(len(contexts)):
        alone = paged_attention_cpu(q[b:b + 1], k_q, v_q, tables[b:b + 1], torch.tensor([0, 1]), lens[b:b + 1],
                                    scale, k_s, v_s)
        assert torch.equal(alone, got[b:b + 1])


@pytest.mark.parametrize("flush_denormal", [False, True])
@pytest.mark.parametrize("dtype", QUANT_DTYPES)
def test_quantized_decode_dequantizes_every_bit_pattern_exactly(dtype, flush_denormal):
    # One cached token: softmax weight 1, so each head's output is its V row dequantized.
    # The row holds all 256 bit patterns (e4m3's subnormals and NaN among them); scale 1
    # and 2^-3 keep every value exact. Flushing denormals (MXCSR FTZ/DAZ) must not
    # change e4m3's subnormals.
    kv_heads, head_dim = 2, 128
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(1, 1, kv_heads, head_dim)
    v_q = bits.view(dtype).clone()
    k_q = torch.zeros_like(v_q)
    v_s = torch.tensor([[[1.0, 0.125]]], dtype=torch.float16)
    k_s = torch.ones_like(v_s)
    q = torch.randn(1, kv_heads * 3, head_dim)
    expected = dequantize_kv_ref(v_q, v_s)[0, 0].repeat_interleave(3, dim=0)[None]
    tables, starts, lens = torch.tensor([[0]]), torch.tensor([0, 1]), torch.tensor([1])
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        got = paged_attention_cpu(q, k_q, v_q, tables, starts, lens, 0.1, k_s, v_s)
    finally:
        torch.set_flush_denormal(False)  # torch's default
    assert bool(expected.isnan().any()) == (dtype == torch.float8_e4m3fn)
    torch.testing.assert_close(got, expected, atol=0, rtol=0, equal_nan=True)


SMOL = ModelConfig("LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                   num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_pool_holds_about_four_times_the_tokens_in_the_same_memory(kv_cache_dtype):
    memory = 64 * 1024**2
    dense = KVPool.for_model(SMOL, CacheConfig(memory_bytes=memory), "cpu")
    quant = KVPool.for_model(SMOL, CacheConfig(memory_bytes=memory, kv_cache_dtype=kv_cache_dtype), "cpu")
    assert quant.quantized and not dense.quantized and dense.scales is None
    assert quant.scales.shape == (30, 2, quant.num_blocks, 16, 3)
    # Per (token, kv-head): 64 one-byte values + a 2-byte scale against 64 * 4 bytes.
    assert bytes_per_block(SMOL, 16, quant.dtype) * 256 == bytes_per_block(SMOL, 16, torch.float32) * 66
    assert quant.num_blocks == memory // bytes_per_block(SMOL, 16, quant.dtype)
    assert quant.nbytes <= memory
    assert 3.87 < quant.num_blocks / dense.num_blocks < 3.89  # 256 / 66 = 3.879
    layer = quant.layer(2)
    assert layer.k_scale.data_ptr() == quant.scales[2, 0].data_ptr()


def test_cache_config_validates_the_kv_cache_dtype():
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, int8, fp8"):
        CacheConfig(kv_cache_dtype="int4")
    with pytest.raises(ConfigError, match="not both"):
        CacheConfig(kv_cache_dtype="int8", dtype=torch.float16)
    assert CacheConfig(kv_cache_dtype="fp8").storage_dtype(torch.float32) == torch.float8_e4m3fn
    assert CacheConfig().storage_dtype(torch.bfloat16) == torch.bfloat16
