"""`store_kv` in Triton: `pdserve.kernels.kv_store.store_kv_ref`'s signature and contract.
Grid: one program per token, copying that token's [KVH, D] keys and values (into an int8 /
fp8 cache: quantizing each head's row with its own scale, kernels/kv_quant.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.kv_quant import KV_QMAX, check_kv_scales, is_quantized
from pdserve.kernels.triton_utils import check_launchable, next_pow2


@triton.jit
def _quantize_rows(x, QMAX: tl.constexpr, TO_INT8: tl.constexpr):
    """(q, s) of rows x [H, D] float32, as kv_quant.quantize_kv_ref (true divisions; padded
    columns must be 0). s is float16; q is float32 holding the values to store."""
    amax = tl.max(tl.abs(x), 1)
    s = tl.minimum(tl.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32)), 65504.0).to(tl.float16)
    s32 = s.to(tl.float32)[:, None]
    v = tl.where(s32 > 0, tl.div_rn(x, tl.where(s32 > 0, s32, 1.0)), 0.0)
    v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    if TO_INT8:  # round half away from zero: float -> int conversion truncates
        v = (v + tl.where(v >= 0, 0.5, -0.5)).to(tl.int32).to(tl.float32)
    else:
        v = _round_to_e4m3(v)
    return v, s


@triton.jit
def _round_to_e4m3(v):
    """v (float32, |v| <= 448) rounded to the nearest float8_e4m3fn value, ties to even, in
    float32: the conversion that follows is then exact whatever its own tie rule (Triton's
    interpreter rounds ties away from zero; torch and the GPU to even)."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # subnormals share 2^-6's step
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits: 2^(e-3)
    t = tl.abs(v) / step  # exact (a power of two); < 16
    magic = 12582912.0  # 1.5 * 2^23: adding it rounds t to an integer, ties to even
    r = ((t + magic) - magic) * step
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)  # v's sign


@triton.jit
def _store_kv_kernel(
    K, V, K_cache, V_cache, K_scale, V_scale, Slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    stride_sb, stride_ss,  # K_scale and V_scale [blocks, page, KVH] (QUANT), contiguous heads
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr, TO_INT8: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(Slots + token)
    if slot < 0:  # padding token: writes nothing
        return
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_h < KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst = (slot // PAGE_SIZE) * stride_cb + (slot % PAGE_SIZE) * stride_cs \
        + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(K + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if QUANT:  # one scale per (token, kv head), kernels/kv_quant.py
        k, k_s = _quantize_rows(tl.where(mask, k.to(tl.float32), 0.0), QMAX, TO_INT8)
        v, v_s = _quantize_rows(tl.where(mask, v.to(tl.float32), 0.0), QMAX, TO_INT8)
        s_dst = (slot // PAGE_SIZE) * stride_sb + (slot % PAGE_SIZE) * stride_ss + offs_h
        tl.store(K_scale + s_dst, k_s, mask=offs_h < KV_HEADS)
        tl.store(V_scale + s_dst, v_s, mask=offs_h < KV_HEADS)
    tl.store(K_cache + dst, k.to(K_cache.dtype.element_ty), mask=mask)
    tl.store(V_cache + dst, v.to(V_cache.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Triton version of `store_kv_ref`: same contract (a quantized cache's rows and
    scales bit-identical to it in the interpreter). Never synchronises with the host
    (padding is skipped on the device), so it can be captured in a CUDA graph."""
    tokens, kv_heads, head_dim = k.shape
    assert k.shape == v.shape and slot_mapping.shape == (tokens,)
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[2:] == (kv_heads, head_dim)
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride(3) == 1
    quant = k_scale is not None or v_scale is not None
    if quant:
        check_kv_scales(k_cache, k_cache, v_cache, k_scale, v_scale)
    else:
        assert not is_quantized(k_cache.dtype), "a quantized cache needs its scales"
    check_launchable(k)
    if tokens == 0:
        return
    _store_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, k_scale if quant else k_cache, v_scale if quant else v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scale.stride(0) if quant else 0, k_scale.stride(1) if quant else 0,
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, H_PAD=next_pow2(kv_heads), D_PAD=next_pow2(head_dim),
        PAGE_SIZE=k_cache.shape[1], QUANT=quant, QMAX=KV_QMAX.get(k_cache.dtype, 1.0),
        TO_INT8=k_cache.dtype == torch.int8,
        num_warps=1 if kv_heads * head_dim <= 512 else 4,
    )
