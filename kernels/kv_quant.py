"""Quantized KV cache storage: int8 or float8_e4m3fn values with one float16 scale per
(token, kv-head) row of head_dim values. PyTorch reference of the arithmetic every
store and attention kernel repeats (kv_store, attention, csrc/kv_quant_cpu.cpp, the
Triton decode/extend kernels).

A row's scale depends on that row alone, so appending a token never rescales what is
stored, a request's cached values never depend on which other requests shared its
batch, and pages move between pools (KV transfer) as stored: values plus scales.

Per row x of head_dim float32 values, QMAX = 127 (int8) or 448 (e4m3, its largest finite
value):

    amax   = max |x|
    s      = float16(min(amax / QMAX, FP16_MAX))     stored; 0 for an all-zero row
    v      = x / s (0 when s == 0), clamped to [-QMAX, QMAX]
    int8   q = trunc(v + 0.5 * sign(v))              round half away from zero
    fp8    q = float8_e4m3fn(v)                      round to nearest even
    read   x' = float(q) * float(s)

Error bound per value: int8 |x - x'| <= s / 2 (half a step, s ~ amax / 127); fp8 keeps 3
mantissa bits, |x - x'| <= max(|x| * 2^-4, s * 2^-10). The float16 rounding of s is
absorbed: v is computed with the rounded s, so it only moves the step, not the error.
Bytes per row: head_dim (values) + 2 (scale), against 4 * head_dim in float32.
"""

from __future__ import annotations

import torch

KV_QMAX: dict[torch.dtype, float] = {torch.int8: 127.0}
if hasattr(torch, "float8_e4m3fn"):
    KV_QMAX[torch.float8_e4m3fn] = 448.0
SCALE_DTYPE = torch.float16
_FP16_MAX = 65504.0


def is_quantized(dtype: torch.dtype) -> bool:
    """Whether a KV pool of `dtype` stores quantized values with scales."""
    return dtype in KV_QMAX


def quantize_kv_ref(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [..., D] of `dtype`, s [...] float16) of float rows x [..., D]; see the module."""
    qmax = KV_QMAX[dtype]
    x = x.float()
    amax = x.abs().amax(dim=-1)
    # tensor / tensor: a true division, as the kernels compute it (ATen may multiply by
    # the reciprocal of a Python scalar instead).
    s = (amax / torch.full_like(amax, qmax)).clamp(max=_FP16_MAX).to(SCALE_DTYPE)
    s32 = s.float()[..., None]
    v = torch.where(s32 > 0, x / torch.where(s32 > 0, s32, 1.0), 0.0).clamp(-qmax, qmax)
    if dtype == torch.int8:
        v = torch.trunc(v + torch.where(v >= 0, 0.5, -0.5))
    return v.to(dtype), s


def dequantize_kv_ref(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x' [..., D] in `dtype` of stored rows q [..., D] with their scales s [...]."""
    return (q.float() * s.float()[..., None]).to(dtype)


def check_kv_scales(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> bool:
    """For kernel wrappers: whether the cache is quantized. Asserts that its scales fit it
    ([blocks, page, KVH] float16, kv-heads contiguous), or that an unscaled cache is in q's
    dtype."""
    if k_scale is None and v_scale is None:
        assert q.dtype == k_cache.dtype == v_cache.dtype
        return False
    assert k_scale is not None and v_scale is not None, "k_scale and v_scale go together"
    assert is_quantized(k_cache.dtype) and k_cache.dtype == v_cache.dtype
    assert k_scale.shape == v_scale.shape == k_cache.shape[:3] and k_scale.stride() == v_scale.stride()
    assert k_scale.dtype == v_scale.dtype == SCALE_DTYPE and k_scale.stride(2) == 1
    return True
