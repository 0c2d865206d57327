"""The Triton kernels on a GPU, at realistic shapes in bfloat16, against float32 truth.

Skipped without CUDA (the same kernels are checked in Triton's interpreter on the CPU by
test_kernels_triton.py). Inputs are drawn in bfloat16 and the reference runs on their exact
float32 upcast, so the only error measured is the kernel's own bfloat16 arithmetic.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.decode_attention import decode_attention, decode_attention_ref
from pdserve.kernels.extend_attention import extend_attention, extend_attention_ref
from pdserve.kernels.kv_pack import pack_kv, pack_kv_ref, unpack_kv
from pdserve.kernels.kv_store import store_kv_ref
from pdserve.kernels.kv_store_triton import store_kv
from pdserve.kernels.rmsnorm import rms_norm_ref
from pdserve.kernels.rmsnorm_triton import rms_norm
from pdserve.kernels.rope import rope_cos_sin_cache, rope_ref
from pdserve.kernels.rope_triton import rope
from pdserve.runtime.config import RopeScaling
from pdserve.runtime.rotary import rope_inv_freq

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (the CPU runs test_kernels_triton.py)")

BF16 = torch.bfloat16
# bfloat16 keeps 8 significant bits (relative step 2^-8 = 0.4%). Attention rounds the
# probabilities to bf16 before the PV product and its output to bf16: outputs of magnitude
# <= ~1 are within a few steps.
ATTN_TOL = {"atol": 2e-2, "rtol": 2e-2}
# One or two roundings to bf16 after float32 math: within two steps.
ELEMENTWISE_TOL = {"atol": 1e-2, "rtol": 1e-2}

# (heads, kv_heads, head_dim): Llama-3-8B (GQA 4), SmolLM2 (GQA 3), MHA, GQA 8.
HEAD_SHAPES = [(32, 8, 128), (9, 3, 64), (16, 16, 128), (64, 8, 128)]


def _paged(context_lens, page_size, kv_heads, head_dim, generator):
    pages = [-(-n // page_size) for n in context_lens]
    num_blocks = sum(pages) + 8
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    tables, used = [], 0
    for p in pages:
        tables.append(perm[used:used + p])
        used += p
    width = max(pages)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], device="cuda")
    shape = (num_blocks, page_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=generator).to("cuda", BF16)
    v = torch.randn(shape, generator=generator).to("cuda", BF16)
    return k, v, tables


@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_SHAPES)
def test_decode_attention_bf16(heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads + head_dim)
    context_lens = [1, 15, 16, 17, 4096, 8191] + torch.randint(1, 4096, (10,), generator=g).tolist()
    k, v, tables = _paged(context_lens, 16, kv_heads, head_dim, g)
    q = torch.randn(len(context_lens), heads, head_dim, generator=g).to("cuda", BF16)
    seq_lens = torch.tensor(context_lens, device="cuda")
    scale = head_dim ** -0.5
    expected = decode_attention_ref(q.float(), k.float(), v.float(), tables, seq_lens, scale)
    for num_splits in (None, 1, 7):
        out = decode_attention(q, k, v, tables, seq_lens, scale, num_splits=num_splits)
        torch.testing.assert_close(out.float(), expected, **ATTN_TOL)


@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_SHAPES[:2])
def test_extend_attention_bf16(heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads * head_dim)
    # (new tokens, context): prompt of 1; whole prompt; chunk after an unaligned prefix;
    # chunk after a long aligned prefix; a decode; a long chunk after a 1-token prefix.
    shapes = [(1, 1), (512, 512), (100, 1123), (64, 2048), (1, 4000), (300, 301)]
    k, v, tables = _paged([c for _, c in shapes], 16, kv_heads, head_dim, g)
    query_lens = [n for n, _ in shapes]
    query_start = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), device="cuda")
    seq_lens = torch.tensor([c for _, c in shapes], device="cuda")
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g).to("cuda", BF16)
    scale = head_dim ** -0.5
    out = extend_attention(q, k, v, tables, query_start, seq_lens, max(query_lens), scale)
    expected = extend_attention_ref(q.float(), k.float(), v.float(), tables, query_start,
                                    seq_lens, max(query_lens), scale)
    torch.testing.assert_close(out.float(), expected, **ATTN_TOL)


def test_decode_attention_replays_in_a_cuda_graph_with_new_lengths():
    g = torch.Generator().manual_seed(1)
    k, v, tables = _paged([2048] * 4, 16, 8, 128, g)
    q = torch.randn(4, 32, 128, generator=g).to("cuda", BF16)
    seq_lens = torch.tensor([1, 100, 1000, 2000], device="cuda")
    decode_attention(q, k, v, tables, seq_lens, 0.088)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, tables, seq_lens, 0.088)
    for lens in ([17, 2048, 5, 300], [2048, 1, 1, 1]):
        seq_lens.copy_(torch.tensor(lens))
        graph.replay()
        expected = decode_attention(q, k, v, tables, seq_lens, 0.088)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_store_kv_bf16():
    g = torch.Generator().manual_seed(2)
    tokens, kv_heads, head_dim = 4096, 8, 128
    kv = torch.randn(tokens, 2, kv_heads, head_dim, generator=g).to("cuda", BF16)
    slots = torch.randperm(8192, generator=g)[:tokens].to("cuda")
    slots[::7] = -1
    caches = [torch.zeros(512, 16, kv_heads, head_dim, dtype=BF16, device="cuda") for _ in range(4)]
    store_kv(kv[:, 0], kv[:, 1], caches[0], caches[1], slots)
    store_kv_ref(kv[:, 0], kv[:, 1], caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("hidden", [576, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_bf16(hidden, with_residual):
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(512, hidden, generator=g).to("cuda", BF16)
    weight = torch.randn(hidden, generator=g).to("cuda", BF16)
    residual = torch.randn(512, hidden, generator=g).to("cuda", BF16) if with_residual else None
    out, new_residual = rms_norm(x, weight, 1e-5, residual)
    expected, expected_residual = rms_norm_ref(x, weight, 1e-5, residual)
    assert torch.equal(new_residual, expected_residual)
    torch.testing.assert_close(out, expected, **ELEMENTWISE_TOL)


def test_rope_bf16_llama3():
    g = torch.Generator().manual_seed(3)
    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    cos_sin = rope_cos_sin_cache(rope_inv_freq(128, 500000.0, scaling), 131072).cuda()
    tokens, heads, kv_heads = 2048, 32, 8
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * 128, generator=g).to("cuda", BF16)
    q = qkv[:, :heads * 128].view(tokens, heads, 128)
    k = qkv[:, heads * 128:(heads + kv_heads) * 128].view(tokens, kv_heads, 128)
    positions = torch.randint(0, 131072, (tokens,), generator=g).cuda()
    for got, want in zip(rope(q, k, positions, cos_sin), rope_ref(q, k, positions, cos_sin)):
        torch.testing.assert_close(got, want, **ELEMENTWISE_TOL)


@pytest.mark.parametrize("dtype", [BF16, torch.int8])
def test_pack_round_trip_is_exact_on_a_large_pool(dtype):
    g = torch.Generator().manual_seed(4)
    kv = (torch.randn(4, 2, 256, 16, 8, 128, generator=g) * 50).to("cuda", dtype)
    block_ids = torch.randperm(256, generator=g)[:64].cuda()
    data = pack_kv(kv, block_ids)
    assert torch.equal(data, pack_kv_ref(kv, block_ids))
    out = torch.zeros_like(kv)
    unpack_kv(data, out, block_ids)
    assert torch.equal(out[:, :, block_ids], kv[:, :, block_ids])
