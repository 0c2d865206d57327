"""RMSNorm with an optional fused residual add: `rms_norm_ref` (PyTorch); the Triton
kernel of the same signature and contract is `pdserve.kernels.rmsnorm_triton.rms_norm`
(apart, so that CPU workers never import Triton)."""

from __future__ import annotations

import torch


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (normed, new_residual).

    With a residual, the sum x + residual is both normalised and returned as the new
    residual stream; without one, x itself is. The statistics are computed in float32 and
    the result cast back to x's dtype before the weight multiply, matching HF Llama.
    """
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x
