"""Paged extend attention: new query tokens attend to a paged prefix and causally to each
other. Serves chunked prefill, prefix-cache hits and speculative verification.

The new tokens' keys and values are already in the cache (the store runs first), so the
kernel reads one uniform context per sequence:

    positions   0 ........................ seq_len-1
    cached      |----- prefix -----|------ new ------|     prefix = seq_len - query_len
    queries                        |------ new ------|     query j sees keys <= prefix + j

Grid (B, H, ceil(max_query_len / BLOCK_M)): a program takes BLOCK_M queries of one head
of one sequence and walks the keys up to its last query's position; programs past a
sequence's query count return at once. The prefix may be empty (a plain prefill).

`extend_attention_ref` is the PyTorch reference with the same signature.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from pdserve.kernels.attention import paged_attention_ref
from pdserve.kernels.kv_quant import check_kv_scales
from pdserve.kernels.triton_utils import check_launchable, dot_precision, next_pow2


@triton.jit
def _extend_kernel(
    Q, K_cache, V_cache, K_scale, V_scale, Block_tables, Query_start, Seq_lens, Out,
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh,
    stride_cb, stride_cs, stride_ch,
    stride_sb, stride_ss,  # K_scale and V_scale [blocks, page, KVH] (QUANT), contiguous heads
    stride_tb,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, QUANT: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    q_start = tl.load(Query_start + seq).to(tl.int32)
    q_len = tl.load(Query_start + seq + 1).to(tl.int32) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(Seq_lens + seq).to(tl.int32)
    prefix = seq_len - q_len
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    q_pos = prefix + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    # Keys past the tile's last query are masked for every row: stop there.
    end = tl.minimum(seq_len, prefix + (m_block + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        mask_n = pos < end
        block = tl.load(Block_tables + seq * stride_tb + pos // PAGE_SIZE, mask=mask_n, other=0)
        row = block.to(tl.int64) * stride_cb + (pos % PAGE_SIZE) * stride_cs + kv_head * stride_ch
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K_cache + row[:, None] + offs_d[None, :], mask=mask_nd, other=0.0)
        if QUANT:  # int8 / fp8 rows times their scales, in q's dtype (kernels/kv_quant.py)
            srow = block.to(tl.int64) * stride_sb + (pos % PAGE_SIZE) * stride_ss + kv_head
            k_s = tl.load(K_scale + srow, mask=mask_n, other=0.0).to(tl.float32)
            k = (k.to(tl.float32) * k_s[:, None]).to(Q.dtype.element_ty)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # Causal: every row's q_pos >= prefix >= 0, so the first tile (key 0) is never fully
        # masked and m_i is finite from then on; padding rows (q_pos >= seq_len) are not stored.
        s = tl.where((pos[None, :] <= q_pos[:, None]) & mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_cache + row[:, None] + offs_d[None, :], mask=mask_nd, other=0.0)
        if QUANT:
            v_s = tl.load(V_scale + srow, mask=mask_n, other=0.0).to(tl.float32)
            v = (v.to(tl.float32) * v_s[:, None]).to(Q.dtype.element_ty)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(Out + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed new queries against their paged context (Triton).

    q: [T, H, D], the new tokens of all sequences packed in order.
    k_cache, v_cache: [num_blocks, page_size, KVH, D], same strides; H % KVH == 0. In q's
        dtype, or int8 / float8_e4m3fn with k_scale, v_scale (as for decode_attention).
    block_tables: [B, max_pages]; query_start: [B + 1] offsets of each sequence's queries in
        q (query_start[0] == 0, query_start[B] == T); seq_lens: [B] context length after the
        new tokens, each >= its query count. Both integer tensors on q's device.
    max_query_len: host int >= every query count (sizes the grid).
    block_m, block_n: queries / keys per tile (powers of two >= 16); None: 64 on CUDA, 16
        in the interpreter.
    Returns [T, H, D] in q's dtype. Reads the cache only.
    """
    tokens, heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    batch = block_tables.shape[0]
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[3] == head_dim and heads % kv_heads == 0
    assert q.stride(2) == 1 and k_cache.stride(3) == 1, "head_dim must be contiguous"
    assert block_tables.dim() == 2 and block_tables.stride(1) == 1
    assert query_start.shape == (batch + 1,) and seq_lens.shape == (batch,)
    quant = check_kv_scales(q, k_cache, v_cache, k_scale, v_scale)
    check_launchable(q)
    on_cpu = q.device.type == "cpu"
    block_m = block_m or (16 if on_cpu else 64)
    block_n = block_n or (16 if on_cpu else 64)
    for tile in (block_m, block_n):
        assert tile >= 16 and tile & (tile - 1) == 0, "tl.dot needs power-of-two tiles >= 16"
    out = torch.empty_like(q)
    if tokens == 0:
        return out
    grid = (batch, heads, triton.cdiv(max_query_len, block_m))
    _extend_kernel[grid](
        q, k_cache, v_cache, k_scale if quant else k_cache, v_scale if quant else v_cache,
        block_tables, query_start, seq_lens, out,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scale.stride(0) if quant else 0, k_scale.stride(1) if quant else 0,
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, D_PAD=max(16, next_pow2(head_dim)),
        PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype), QUANT=quant,
        num_warps=4, num_stages=2,
    )
    return out


def extend_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference of `extend_attention`; tile sizes are accepted and ignored."""
    starts = query_start.tolist()
    query_lens = [b - a for a, b in itertools.pairwise(starts)]
    assert max(query_lens, default=0) <= max_query_len
    return paged_attention_ref(q, k_cache, v_cache, block_tables, query_lens, seq_lens.tolist(), scale,
                               k_scale, v_scale)
