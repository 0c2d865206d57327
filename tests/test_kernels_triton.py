"""Each Triton kernel against its PyTorch reference.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors
(conftest sets TRITON_INTERPRET=1), in float32 and float16 only: the interpreter computes
bfloat16 wrongly. Shapes are small because the interpreter runs each program in Python;
they are chosen to hit the edges: context length 1, lengths on and across page
boundaries, GQA ratios 1/3/8, head_dim 64 and 128, scattered block tables, empty prefix,
padding slots. tests/test_gpu_kernels.py repeats this at realistic shapes in bfloat16.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.decode_attention import decode_attention, decode_attention_ref
from pdserve.kernels.extend_attention import extend_attention, extend_attention_ref
from pdserve.kernels.kv_pack import pack_kv, pack_kv_ref, unpack_kv, unpack_kv_ref
from pdserve.kernels.kv_store import store_kv_ref
from pdserve.kernels.kv_store_triton import store_kv
from pdserve.kernels.rmsnorm import rms_norm_ref
from pdserve.kernels.rmsnorm_triton import rms_norm
from pdserve.kernels.rope import rope_cos_sin_cache, rope_ref
from pdserve.kernels.rope_triton import rope
from pdserve.runtime.config import RopeScaling
from pdserve.runtime.rotary import rope_inv_freq

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Kernel vs reference, same inputs and dtype: they differ only by summation order (and, in
# the attention kernels, by rounding the softmax probabilities to the input dtype before
# the PV product, as the reference also does). float32: a few ulps of O(1) outputs;
# float16: a couple of ulps (2^-10 relative) of outputs of magnitude ~1.
TOLERANCE = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
}


def paged_tables(context_lens, page_size, num_blocks, generator):
    """Scattered, non-contiguous block tables (a random permutation of the pool), padded
    with a block id past every table's end so that reading padding would show."""
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    tables, used = [], 0
    for n in context_lens:
        pages = -(-n // page_size)
        tables.append(perm[used:used + pages])
        used += pages
    assert used <= num_blocks
    width = max(len(t) for t in tables) + 1
    return torch.tensor([t + [perm[-1]] * (width - len(t)) for t in tables], device=DEVICE)


def random_cache(num_blocks, page_size, kv_heads, head_dim, dtype, generator):
    shape = (num_blocks, page_size, kv_heads, head_dim)
    return (torch.randn(shape, generator=generator).to(DEVICE, dtype),
            torch.randn(shape, generator=generator).to(DEVICE, dtype))


# (heads, kv_heads, head_dim): GQA ratios 1, 3 and 8; head_dim 64 and 128.
HEAD_SHAPES = [(2, 2, 64), (6, 2, 128), (8, 1, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_SHAPES)
def test_decode_attention_matches_reference(heads, kv_heads, head_dim, dtype):
    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    page_size, num_blocks = 4, 48
    # Length 1; one short of, exactly on, and one past a page boundary; several pages and
    # several 16-key tiles.
    context_lens = [1, 3, 4, 5, 8, 23, 37]
    k_cache, v_cache = random_cache(num_blocks, page_size, kv_heads, head_dim, dtype, g)
    tables = paged_tables(context_lens, page_size, num_blocks, g)
    q = torch.randn(len(context_lens), heads, head_dim, generator=g).to(DEVICE, dtype)
    seq_lens = torch.tensor(context_lens, device=DEVICE)
    scale = head_dim ** -0.5
    expected = decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, scale)
    # One split walking several tiles; then 3 splits, where short contexts leave later
    # splits empty and longer ones put split boundaries inside the context.
    for num_splits in (1, 3):
        out = decode_attention(q, k_cache, v_cache, tables, seq_lens, scale,
                               num_splits=num_splits, block_n=16)
        torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


def test_decode_attention_with_one_token_pages():
    # page_size 1: every position is its own block, the most scattered layout there is.
    g = torch.Generator().manual_seed(7)
    k_cache, v_cache = random_cache(40, 1, 2, 64, torch.float32, g)
    context_lens = [1, 17, 20]
    tables = paged_tables(context_lens, 1, 40, g)
    q = torch.randn(3, 6, 64, generator=g).to(DEVICE)
    seq_lens = torch.tensor(context_lens, device=DEVICE)
    out = decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125, num_splits=2)
    expected = decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, 0.125)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_SHAPES)
def test_extend_attention_matches_reference(heads, kv_heads, head_dim, dtype):
    g = torch.Generator().manual_seed(heads * 10 + head_dim)
    page_size, num_blocks = 4, 64
    # (new tokens, context): a 1-token prompt; a whole prompt with an empty prefix spanning
    # two query and key tiles (16 each); a chunk after a prefix that ends mid-page; a chunk
    # that ends exactly on a page boundary; a chunk after a 3-tile prefix; a decoding
    # sequence inside an extend batch.
    shapes = [(1, 1), (19, 19), (6, 15), (4, 12), (5, 40), (1, 9)]
    k_cache, v_cache = random_cache(num_blocks, page_size, kv_heads, head_dim, dtype, g)
    tables = paged_tables([c for _, c in shapes], page_size, num_blocks, g)
    query_lens = [n for n, _ in shapes]
    query_start = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), device=DEVICE)
    seq_lens = torch.tensor([c for _, c in shapes], device=DEVICE)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g).to(DEVICE, dtype)
    args = (q, k_cache, v_cache, tables, query_start, seq_lens, max(query_lens), head_dim ** -0.5)
    out = extend_attention(*args, block_m=16, block_n=16)
    torch.testing.assert_close(out, extend_attention_ref(*args), **TOLERANCE[dtype])


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_store_kv_matches_reference(cache_dtype):
    g = torch.Generator().manual_seed(3)
    kv_heads, head_dim, page_size = 3, 64, 4
    # k and v as strided views of a fused projection, as the model produces them.
    fused = torch.randn(6, 2 * kv_heads * head_dim + 8, generator=g).to(DEVICE)
    k = fused[:, :kv_heads * head_dim].view(6, kv_heads, head_dim)
    v = fused[:, kv_heads * head_dim:2 * kv_heads * head_dim].view(6, kv_heads, head_dim)
    slots = torch.tensor([5, 0, -1, 31, 8, -1], device=DEVICE)  # scattered, with padding
    caches = [torch.zeros(8, page_size, kv_heads, head_dim, dtype=cache_dtype, device=DEVICE)
              for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], slots)
    store_kv_ref(k, v, caches[2], caches[3], slots)
    # A copy with at most one rounding to the cache dtype: exactly equal.
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert int((caches[0] != 0).any(-1).any(-1).sum()) == 4  # padding wrote nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, with_residual):
    g = torch.Generator().manual_seed(5)
    hidden = 96  # not a power of two: the kernel's tile is masked
    x = torch.randn(5, hidden, generator=g).to(DEVICE, dtype)
    weight = torch.randn(hidden, generator=g).to(DEVICE, dtype)
    residual = torch.randn(5, hidden, generator=g).to(DEVICE, dtype) if with_residual else None
    out, new_residual = rms_norm(x, weight, 1e-5, residual)
    expected, expected_residual = rms_norm_ref(x, weight, 1e-5, residual)
    # The residual sum is one rounding in both: exact. The norm differs by summation order.
    assert torch.equal(new_residual, expected_residual)
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_matches_reference_with_llama3_scaling(dtype, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 256)
    cos_sin = rope_cos_sin_cache(rope_inv_freq(head_dim, 500000.0, scaling), 2048).to(DEVICE)
    heads, kv_heads, tokens = 6, 2, 5
    # q and k as strided views of a fused qkv projection.
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 255, 256, 2047], device=DEVICE)
    q_out, k_out = rope(q, k, positions, cos_sin)
    q_ref, k_ref = rope_ref(q, k, positions, cos_sin)
    torch.testing.assert_close(q_out, q_ref, **TOLERANCE[dtype])
    torch.testing.assert_close(k_out, k_ref, **TOLERANCE[dtype])


def _pool(g, dtype=torch.float32):
    """A 2-layer pool of 10 blocks (page 4 x 2 heads x 64) with one all-zero block."""
    kv = torch.randn(2, 2, 10, 4, 2, 64, generator=g).to(DEVICE, dtype)
    kv[:, :, 6] = 0
    return kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
def test_pack_unpack_is_an_exact_copy(dtype):
    g = torch.Generator().manual_seed(11)
    kv = _pool(g) * (100 if dtype == torch.int8 else 1)
    kv = kv.to(dtype)
    block_ids = torch.tensor([7, 2, 6], device=DEVICE)  # scattered, out of order
    data = pack_kv(kv, block_ids)
    assert data.dtype == dtype and torch.equal(data, pack_kv_ref(kv, block_ids))
    assert torch.equal(data, kv[:, :, [7, 2, 6]])
    dest, ref_dest = torch.full_like(kv, 5), torch.full_like(kv, 5)
    dest_ids = torch.tensor([0, 9, 3], device=DEVICE)
    unpack_kv(data, dest, dest_ids)
    unpack_kv_ref(data, ref_dest, dest_ids)
    assert torch.equal(dest, ref_dest) and torch.equal(dest[:, :, [0, 9, 3]], data)
    untouched = [i for i in range(10) if i not in (0, 9, 3)]
    assert bool((dest[:, :, untouched] == 5).all())


def test_one_layer_of_a_pool_packs_through_a_view():
    g = torch.Generator().manual_seed(19)
    kv = _pool(g)
    block_ids = torch.tensor([3, 5], device=DEVICE)
    assert torch.equal(pack_kv(kv[1:2], block_ids), pack_kv(kv, block_ids)[1:2])
