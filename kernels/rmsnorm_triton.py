"""`rms_norm` in Triton (one program per row): `pdserve.kernels.rmsnorm.rms_norm_ref`'s
signature and contract."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.triton_utils import check_launchable, next_pow2


@triton.jit
def _rms_norm_kernel(
    X, Residual, W, Out, New_residual,
    stride_x, stride_r, stride_o, stride_n,
    eps,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0)
        x = x + r  # in x's dtype, as the reference adds before upcasting
        tl.store(New_residual + row * stride_n + offs, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, 0) / N + eps)
    w = tl.load(W + offs, mask=mask, other=0.0)
    # Cast back before the weight multiply, as HF Llama does.
    out = w * h.to(x.dtype)
    tl.store(Out + row * stride_o + offs, out, mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rms_norm_ref`: same contract; x and residual are 2-D [rows, N]
    with a contiguous last dimension, weight [N] of x's dtype. Allocates both results."""
    rows, n = x.shape
    assert weight.shape == (n,) and weight.dtype == x.dtype and x.stride(1) == 1
    check_launchable(x)
    out = torch.empty_like(x)
    new_residual = x
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
        new_residual = torch.empty_like(x)
    if rows == 0:
        return out, new_residual
    block = next_pow2(n)
    _rms_norm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, out, new_residual,
        x.stride(0), (residual if residual is not None else x).stride(0), out.stride(0),
        new_residual.stride(0), eps,
        N=n, BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=min(16, max(1, block // 512)),
    )
    return out, new_residual
