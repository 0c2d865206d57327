"""`rope` in Triton (one program per token, rotating all its q and k heads):
`pdserve.kernels.rope.rope_ref`'s signature and contract."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.triton_utils import check_launchable, next_pow2


@triton.jit
def _rotate_heads(X, Out, token, stride_xt, stride_xh, stride_ot, stride_oh, cos, sin,
                  HEADS: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    mask = (offs_h < HEADS)[:, None] & (offs_d < HALF)[None, :]
    src = X + token * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    dst = Out + token * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    # Element i pairs with element i + HALF.
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, Positions, Cos_sin, Q_out, K_out,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
    Q_HEADS: tl.constexpr, QH_PAD: tl.constexpr, K_HEADS: tl.constexpr, KH_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    pos = tl.load(Positions + token)
    offs_d = tl.arange(0, HALF_PAD)
    cos = tl.load(Cos_sin + pos * stride_cs + offs_d, mask=offs_d < HALF, other=0.0)[None, :]
    sin = tl.load(Cos_sin + pos * stride_cs + HALF + offs_d, mask=offs_d < HALF, other=0.0)[None, :]
    _rotate_heads(Q, Q_out, token, stride_qt, stride_qh, stride_qot, stride_qoh, cos, sin,
                  Q_HEADS, QH_PAD, HALF, HALF_PAD)
    _rotate_heads(K, K_out, token, stride_kt, stride_kh, stride_kot, stride_koh, cos, sin,
                  K_HEADS, KH_PAD, HALF, HALF_PAD)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rope_ref`: same contract. q and k may be strided views (e.g. of a
    fused qkv projection) as long as head_dim is contiguous."""
    tokens, q_heads, head_dim = q.shape
    k_heads = k.shape[1]
    assert k.shape == (tokens, k_heads, head_dim) and positions.shape == (tokens,)
    assert cos_sin_cache.shape[1] == head_dim and cos_sin_cache.dtype == torch.float32
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    check_launchable(q)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rope_kernel[(tokens,)](
        q, k, positions, cos_sin_cache, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos_sin_cache.stride(0),
        Q_HEADS=q_heads, QH_PAD=next_pow2(q_heads), K_HEADS=k_heads, KH_PAD=next_pow2(k_heads),
        HALF=half, HALF_PAD=next_pow2(half),
        num_warps=1 if q_heads * head_dim <= 1024 else 4,
    )
    return q_out, k_out
