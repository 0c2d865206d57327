"""Paged decode attention: one new query token per sequence against its paged context.

Split along the sequence ("flash decoding") so that a small batch still fills the GPU:

    context of sequence b   0 ............................................ seq_lens[b]-1
    split s of S            |-- s=0 --|-- s=1 --|-- ... --|-- s=S-1 --|
    stage 1, grid (B, KVH, S): each program attends the GROUP query heads that share one
        kv head over one split (K/V read once per group), and writes a partial output
        normalised by its own softmax sum, plus that sum's log (base 2, with the max).
    stage 2, grid (B, H): merges the S partials of each head by their log-sum-exps.

Every split covers ceil(ceil(seq_len / S) / BLOCK_N) tiles; splits past the end of a short
context are empty and carry a log-sum-exp of -inf, so they weigh nothing in stage 2. The
grid depends only on (B, KVH, S), never on sequence lengths, which live on the device:
a CUDA graph captured for one batch size replays for any lengths.

`decode_attention_ref` is the PyTorch reference with the same signature.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.attention import attend_context, gather_context
from pdserve.kernels.kv_quant import check_kv_scales
from pdserve.kernels.triton_utils import check_launchable, dot_precision, next_pow2, num_sms

MAX_SPLITS = 32


@triton.jit
def _decode_split_kernel(
    Q, K_cache, V_cache, K_scale, V_scale, Block_tables, Seq_lens, Part_out, Part_lse,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    stride_qb, stride_qh,
    stride_cb, stride_cs, stride_ch,  # k_cache and v_cache share strides (asserted)
    stride_sb, stride_ss,  # K_scale and V_scale [blocks, page, KVH] (QUANT), contiguous heads
    stride_tb,
    stride_pb, stride_ph, stride_ps,  # Part_out [B, H, S, D]; Part_lse [B, H, S] shares the first three
    stride_lb, stride_lh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, QUANT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(Seq_lens + seq).to(tl.int32)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    heads = kv_head * GROUP + offs_g
    mask_gd = (offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    # Rows past GROUP are padding (tl.dot needs >= 16 rows): zero queries, never stored.
    q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_gd, other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        mask_n = pos < end
        # Position p lives in block Block_tables[seq, p // PAGE_SIZE] at offset p % PAGE_SIZE.
        block = tl.load(Block_tables + seq * stride_tb + pos // PAGE_SIZE, mask=mask_n, other=0)
        row = block.to(tl.int64) * stride_cb + (pos % PAGE_SIZE) * stride_cs + kv_head * stride_ch
        mask_nd = mask_n[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(K_cache + row[:, None] + offs_d[None, :], mask=mask_nd, other=0.0)
        if QUANT:  # int8 / fp8 rows times their scales, in q's dtype (kernels/kv_quant.py)
            srow = block.to(tl.int64) * stride_sb + (pos % PAGE_SIZE) * stride_ss + kv_head
            k_s = tl.load(K_scale + srow, mask=mask_n, other=0.0).to(tl.float32)
            k = (k.to(tl.float32) * k_s[:, None]).to(Q.dtype.element_ty)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Online softmax; the first tile of a non-empty split has a valid key, so m_new is finite.
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

    # An empty split (start >= seq_len) has l_i == 0: output 0 and log-sum-exp -inf.
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    part = seq * stride_pb + heads * stride_ph + split * stride_ps
    tl.store(Part_out + part[:, None] + offs_d[None, :], out, mask=mask_gd)
    tl.store(Part_lse + seq * stride_lb + heads * stride_lh + split, lse, mask=offs_g < GROUP)


@triton.jit
def _decode_merge_kernel(
    Part_out, Part_lse, Out,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask_s = offs_s < NUM_SPLITS
    lse = tl.load(Part_lse + seq * stride_lb + head * stride_lh + offs_s, mask=mask_s,
                  other=float("-inf"))
    # Split 0 always holds position 0, so the max is finite and weights are well defined.
    weight = tl.exp2(lse - tl.max(lse, 0))
    mask = mask_s[:, None] & (offs_d < HEAD_DIM)[None, :]
    part = tl.load(Part_out + seq * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps
                   + offs_d[None, :], mask=mask, other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(Out + seq * stride_ob + head * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def default_num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Enough splits that stage 1 has about four programs per SM, at most MAX_SPLITS.
    Depends only on the batch shape and the device, so CUDA graphs see a fixed grid."""
    wanted = -(-4 * num_sms(device) // (batch * kv_heads))
    return max(1, min(MAX_SPLITS, wanted))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    block_n: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged context (Triton).

    q: [B, H, D], query b at position seq_lens[b] - 1 of its sequence.
    k_cache, v_cache: [num_blocks, page_size, KVH, D], same strides; H % KVH == 0. In q's
        dtype, or int8 / float8_e4m3fn with k_scale, v_scale [num_blocks, page_size, KVH]
        float16 (same strides, contiguous): rows are dequantized to q's dtype as read.
    block_tables: [B, max_pages] int32/int64; seq_lens: [B] int32/int64 on q's device,
        each >= 1 and <= max_pages * page_size.
    num_splits: sequence splits per (sequence, kv head); None picks from the batch shape.
        The result does not depend on it beyond float rounding.
    block_n: keys per tile (a power of two >= 16); None: 64 on CUDA, 16 in the interpreter.
    Returns [B, H, D] in q's dtype. Reads the cache only; never synchronises with the host,
    so it can be captured in a CUDA graph.
    """
    batch, heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[3] == head_dim and heads % kv_heads == 0
    assert q.stride(2) == 1 and k_cache.stride(3) == 1, "head_dim must be contiguous"
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.stride(1) == 1
    assert seq_lens.shape == (batch,) and not seq_lens.is_floating_point()
    quant = check_kv_scales(q, k_cache, v_cache, k_scale, v_scale)
    check_launchable(q)
    group = heads // kv_heads
    splits = num_splits or default_num_splits(batch, kv_heads, q.device)
    block_n = block_n or (16 if q.device.type == "cpu" else 64)
    assert block_n >= 16 and block_n & (block_n - 1) == 0, "tl.dot needs power-of-two tiles >= 16"
    part_out = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    d_pad = max(16, next_pow2(head_dim))
    _decode_split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, k_scale if quant else k_cache, v_scale if quant else v_cache,
        block_tables, seq_lens, part_out, part_lse,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scale.stride(0) if quant else 0, k_scale.stride(1) if quant else 0,
        block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        GROUP=group, GROUP_PAD=max(16, next_pow2(group)),
        HEAD_DIM=head_dim, D_PAD=d_pad,
        PAGE_SIZE=page_size, BLOCK_N=block_n, NUM_SPLITS=splits,
        DOT_PRECISION=dot_precision(q.dtype), QUANT=quant,
        num_warps=4, num_stages=2,
    )
    _decode_merge_kernel[(batch, heads)](
        part_out, part_lse, out,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, D_PAD=d_pad, NUM_SPLITS=splits, SPLITS_PAD=next_pow2(splits),
        num_warps=4,
    )
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    block_n: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference of `decode_attention`; `num_splits` and `block_n` are accepted for
    signature parity and ignored (the reference never splits). Reads seq_lens on the host."""
    out = torch.empty_like(q)
    for b, context_len in enumerate(seq_lens.tolist()):
        k = gather_context(k_cache, block_tables[b], context_len, k_scale, q.dtype)
        v = gather_context(v_cache, block_tables[b], context_len, v_scale, q.dtype)
        out[b:b + 1] = attend_context(q[b:b + 1], k, v, scale)
    return out
