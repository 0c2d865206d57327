"""Rotary position embedding, NeoX (rotate-half) layout.

Frequency scaling (linear, llama3) is baked into the cos/sin cache, so one kernel serves
every variant. `rope_ref` (PyTorch) here; the Triton kernel of the same signature and
contract is `pdserve.kernels.rope_triton.rope` (apart, so that CPU workers never import
Triton)."""

from __future__ import annotations

import torch


def rope_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos of the angles in the first half, sin in the
    second. Angles are position * inv_freq computed in float32, as HF Llama does."""
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q: [T, H, D] and k: [T, KVH, D] by their token positions [T].

    cos_sin_cache: from `rope_cos_sin_cache` (frequencies already scaled for linear/llama3
    RoPE). Element i of a head pairs with element i + D/2. Returns new tensors in q's dtype.
    """
    cos, sin = cos_sin_cache.index_select(0, positions)[:, None, :].chunk(2, dim=-1)
    cos = torch.cat((cos, cos), dim=-1)
    sin = torch.cat((sin, sin), dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)
