"""Gather a request's KV pages into one contiguous buffer and scatter them back, optionally
quantizing to int8 or fp8 with one scale per page (for KV transfer).

Layouts (all contiguous):

    pool     kv      [layers, 2, num_blocks, block_size, kv_heads, head_dim]   (KVPool.kv)
    packed   data    [layers, 2, n,          block_size, kv_heads, head_dim]
             scales  [layers, 2, n] float32, only when quantized

Page j of the packed buffer is pool block `block_ids[j]`; index 1 of dim 1 is k (0) or
v (1). To move one layer, pass `kv[l:l + 1]` (a contiguous view) and get layers == 1.

Quantization, per page p (block_size * kv_heads * head_dim values x), with QMAX = 127 for
int8 and 448 for float8_e4m3fn (the largest finite e4m3 value):

    absmax   = max |x|                       (float32)
    scale    = absmax / QMAX                 (stored; 0 for an all-zero page)
    v        = x * (QMAX / absmax)           (0 when absmax == 0), so |v| <= QMAX
    int8     q = trunc(v + 0.5 * sign(v)), clamped to [-127, 127]  (round half away from 0)
    fp8      q = float8_e4m3fn(clamp(v, -448, 448))                (round to nearest even)
    unpack   x' = float(q) * scale, cast to the pool's dtype

Round-trip error: int8 |x - x'| <= scale / 2 (half a step); fp8 e4m3 keeps 3 mantissa bits,
so |x - x'| <= max(|x| * 2^-4, scale * 2^-10) (half a step of a normal / subnormal), each
plus float32 rounding of a few ulps.

Without quantization (dtype None or a float dtype) pack is an exact copy (or a plain cast)
and scales is None. `pack_kv` / `unpack_kv` (Triton) and `pack_kv_ref` / `unpack_kv_ref`
(PyTorch) share signatures and this contract.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.triton_utils import check_launchable

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
BLOCK = 1024  # elements per inner step over a page


@triton.jit
def _pack_kernel(
    KV, Block_ids, Out, Scales,
    num_blocks, n,
    PAGE: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
    TO_INT8: tl.constexpr,
):
    lk = tl.program_id(0)  # layer * 2 + (0 for k, 1 for v)
    j = tl.program_id(1)
    block = tl.load(Block_ids + j).to(tl.int64)
    src = KV + (lk * num_blocks + block) * PAGE
    dst = Out + (lk.to(tl.int64) * n + j) * PAGE
    if QUANT:
        absmax = tl.zeros([BLOCK], tl.float32)
        for i in range(0, PAGE, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            x = tl.load(src + offs, mask=offs < PAGE, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.abs(x))
        amax = tl.max(absmax, 0)
        tl.store(Scales + lk * n + j, tl.div_rn(amax, QMAX))
        inv = tl.where(amax > 0, tl.div_rn(QMAX, tl.where(amax > 0, amax, 1.0)), 0.0)
        for i in range(0, PAGE, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            v = tl.load(src + offs, mask=offs < PAGE, other=0.0).to(tl.float32) * inv
            if TO_INT8:
                v = (v + tl.where(v >= 0, 0.5, -0.5)).to(tl.int32).to(tl.float32)
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
            tl.store(dst + offs, v.to(Out.dtype.element_ty), mask=offs < PAGE)
    else:
        for i in range(0, PAGE, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            x = tl.load(src + offs, mask=offs < PAGE)
            tl.store(dst + offs, x.to(Out.dtype.element_ty), mask=offs < PAGE)


@triton.jit
def _unpack_kernel(
    Packed, Scales, Block_ids, KV,
    num_blocks, n,
    PAGE: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr,
):
    lk = tl.program_id(0)
    j = tl.program_id(1)
    block = tl.load(Block_ids + j).to(tl.int64)
    src = Packed + (lk.to(tl.int64) * n + j) * PAGE
    dst = KV + (lk * num_blocks + block) * PAGE
    if QUANT:
        scale = tl.load(Scales + lk * n + j)
        for i in range(0, PAGE, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            x = tl.load(src + offs, mask=offs < PAGE).to(tl.float32) * scale
            tl.store(dst + offs, x.to(KV.dtype.element_ty), mask=offs < PAGE)
    else:
        for i in range(0, PAGE, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            x = tl.load(src + offs, mask=offs < PAGE)
            tl.store(dst + offs, x.to(KV.dtype.element_ty), mask=offs < PAGE)


def _check(kv: torch.Tensor, block_ids: torch.Tensor) -> None:
    assert kv.dim() == 6 and kv.shape[1] == 2 and kv.is_contiguous()
    assert block_ids.dim() == 1 and not block_ids.is_floating_point()
    assert block_ids.device == kv.device


def pack_kv(
    kv: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gather pages `block_ids` of `kv` into a new packed buffer of `dtype` (None: kv's);
    int8 and float8_e4m3fn quantize with per-page scales. Returns (data, scales or None).
    Reads kv only. Block ids must be in range (not checked on the device)."""
    _check(kv, block_ids)
    check_launchable(kv)
    layers, _, num_blocks = kv.shape[:3]
    dtype = dtype or kv.dtype
    n = block_ids.shape[0]
    data = torch.empty(layers, 2, n, *kv.shape[3:], dtype=dtype, device=kv.device)
    quant = dtype in QMAX
    scales = torch.empty(layers, 2, n, dtype=torch.float32, device=kv.device) if quant else None
    if n:
        _pack_kernel[(layers * 2, n)](
            kv, block_ids, data, scales if quant else data, num_blocks, n,
            PAGE=kv[0, 0, 0].numel(), BLOCK=BLOCK, QUANT=quant, QMAX=QMAX.get(dtype, 1.0),
            TO_INT8=dtype == torch.int8,
        )
    return data, scales


def unpack_kv(
    data: torch.Tensor, scales: torch.Tensor | None, kv: torch.Tensor, block_ids: torch.Tensor
) -> None:
    """Write packed pages back into pool blocks `block_ids` of `kv` (mutated in place),
    dequantizing with `scales` when data is int8 or float8_e4m3fn."""
    _check(kv, block_ids)
    check_launchable(kv)
    layers, _, num_blocks = kv.shape[:3]
    n = block_ids.shape[0]
    assert data.shape == (layers, 2, n, *kv.shape[3:]) and data.is_contiguous()
    quant = data.dtype in QMAX
    assert (scales is not None) == quant, "scales go with, and only with, quantized data"
    if quant:
        assert scales.shape == (layers, 2, n) and scales.dtype == torch.float32 and scales.is_contiguous()
    if n:
        _unpack_kernel[(layers * 2, n)](
            data, scales if quant else data, block_ids, kv, num_blocks, n,
            PAGE=kv[0, 0, 0].numel(), BLOCK=BLOCK, QUANT=quant,
        )


def pack_kv_ref(
    kv: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch reference of `pack_kv`."""
    _check(kv, block_ids)
    dtype = dtype or kv.dtype
    pages = kv.index_select(2, block_ids)
    if dtype not in QMAX:
        return pages.to(dtype), None
    qmax = QMAX[dtype]
    x = pages.float()
    absmax = x.abs().amax(dim=(3, 4, 5))
    scales = absmax / qmax
    # tensor / tensor: a true division, as tl.div_rn (`qmax / t` would use t's reciprocal).
    numerator = torch.full_like(absmax, qmax)
    inv = torch.where(absmax > 0, numerator / torch.where(absmax > 0, absmax, 1.0), 0.0)
    v = x * inv[..., None, None, None]
    if dtype == torch.int8:
        v = torch.trunc(v + torch.where(v >= 0, 0.5, -0.5))
    return v.clamp(-qmax, qmax).to(dtype), scales


def unpack_kv_ref(
    data: torch.Tensor, scales: torch.Tensor | None, kv: torch.Tensor, block_ids: torch.Tensor
) -> None:
    """PyTorch reference of `unpack_kv`."""
    _check(kv, block_ids)
    assert (scales is not None) == (data.dtype in QMAX)
    x = data if scales is None else data.float() * scales[..., None, None, None]
    kv.index_copy_(2, block_ids, x.to(kv.dtype))
