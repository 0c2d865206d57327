"""`block_linear_triton`: `pdserve.kernels.block_linear.block_linear_ref`'s contract on CUDA
(W4A16 from Q4_0 or Q4_1 blocks, W8A16, FP8 weights, the dequantization inside the matmul loop). Apart from
block_linear.py so that CPU workers never import Triton."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.block_linear import BLOCK, BLOCK_BYTES
from pdserve.kernels.triton_utils import check_launchable, dot_precision

_KIND_CODES = {"q8_0": 0, "q4_1": 1, "f8_0": 2, "q4_0": 3}


@triton.jit
def _load_f16(ptr, mask):
    """The little-endian float16 at byte `ptr` (two uint8 loads), as float32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e4m3_to_f32(b):
    """float8_e4m3fn bits (uint8 as int32) -> float32, exactly: sign, 4 exponent bits (bias
    7), 3 mantissa bits; exponent 0 is subnormal; 0x7F / 0xFF are NaN."""
    sign = tl.where((b & 0x80) != 0, -1.0, 1.0)
    exponent = (b >> 3) & 0xF
    mantissa = (b & 0x7).to(tl.float32)
    normal = (1.0 + mantissa / 8.0) * tl.exp2((exponent - 7).to(tl.float32))
    subnormal = mantissa / 8.0 * 0.015625  # 2^-6
    value = sign * tl.where(exponent == 0, subnormal, normal)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def _block_linear_kernel(
    X, Blocks, Y, M, N, NUM_BLOCKS, stride_xm, stride_ym,
    KIND: tl.constexpr, BLOCK_BYTES: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr, PRECISION: tl.constexpr,
):
    """Y[m, n] = sum_k X[m, k] W[n, k], W dequantized from its blocks tile by tile: each
    step takes NB blocks (NB * 32 weights) of BN rows, rebuilds them in float32 (the
    reference's values exactly), casts them to X's dtype and accumulates in float32."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok = rm < M
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, NUM_BLOCKS, NB):
        b = kb + tl.arange(0, NB)
        w_ok = (rn[:, None] < N) & (b[None, :] < NUM_BLOCKS)  # [BN, NB]
        base = Blocks + (rn[:, None].to(tl.int64) * NUM_BLOCKS + b[None, :]) * BLOCK_BYTES
        d = _load_f16(base, w_ok)[:, :, None]  # [BN, NB, 1]
        if KIND == 1 or KIND == 3:  # q4_1 / q4_0: byte i holds weights i (low nibble) and i + 16 (high)
            i = tl.arange(0, 16)
            if KIND == 1:  # d * q + m
                qs = tl.load(base[:, :, None] + 4 + i[None, None, :], mask=w_ok[:, :, None], other=0).to(tl.int32)
                m = _load_f16(base + 2, w_ok)[:, :, None]
                w_lo = tl.reshape((qs & 0xF).to(tl.float32) * d + m, (BN, NB * 16))
                w_hi = tl.reshape((qs >> 4).to(tl.float32) * d + m, (BN, NB * 16))
            else:  # d * (q - 8)
                qs = tl.load(base[:, :, None] + 2 + i[None, None, :], mask=w_ok[:, :, None], other=0).to(tl.int32)
                w_lo = tl.reshape(((qs & 0xF) - 8).to(tl.float32) * d, (BN, NB * 16))
                w_hi = tl.reshape(((qs >> 4) - 8).to(tl.float32) * d, (BN, NB * 16))
            cols = tl.reshape(b[:, None] * 32 + i[None, :], (NB * 16,))
            col_ok = tl.reshape((b[:, None] < NUM_BLOCKS) & (i[None, :] < 16), (NB * 16,))
            x_ok = row_ok[:, None] & col_ok[None, :]
            x_lo = tl.load(X + rm[:, None] * stride_xm + cols[None, :], mask=x_ok, other=0.0)
            x_hi = tl.load(X + rm[:, None] * stride_xm + cols[None, :] + 16, mask=x_ok, other=0.0)
            acc += tl.dot(x_lo, tl.trans(w_lo.to(x_lo.dtype)), input_precision=PRECISION)
            acc += tl.dot(x_hi, tl.trans(w_hi.to(x_hi.dtype)), input_precision=PRECISION)
        else:  # q8_0 / f8_0: 32 one-byte values after d
            i = tl.arange(0, 32)
            qb = tl.load(base[:, :, None] + 2 + i[None, None, :], mask=w_ok[:, :, None], other=0).to(tl.int32)
            if KIND == 0:
                q = (qb - ((qb & 0x80) << 1)).to(tl.float32)  # two's complement int8
            else:
                q = _e4m3_to_f32(qb)
            w = tl.reshape(q * d, (BN, NB * 32))
            cols = tl.reshape(b[:, None] * 32 + i[None, :], (NB * 32,))
            col_ok = tl.reshape((b[:, None] < NUM_BLOCKS) & (i[None, :] < 32), (NB * 32,))
            x = tl.load(X + rm[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & (rn[None, :] < N))


def block_linear_triton(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """`block_linear_ref`'s contract in Triton: x [M, K] float32 / float16 / bfloat16 with a
    contiguous last dimension, blocks [N, K / 32, BLOCK_BYTES[kind]] uint8 contiguous, on
    one device; returns [M, N] in x's dtype."""
    if kind not in _KIND_CODES:
        raise ValueError(f"unknown block kind {kind!r}; kinds: {', '.join(_KIND_CODES)}")
    n, num_blocks, nbytes = blocks.shape
    assert nbytes == BLOCK_BYTES[kind] and blocks.dtype == torch.uint8 and blocks.is_contiguous()
    assert x.dim() == 2 and x.shape[1] == num_blocks * BLOCK and x.stride(1) == 1
    check_launchable(x)
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or n == 0:
        return out
    # Fixed tiles, whatever the batch: a row's sums run in the same order alone or batched,
    # so a request's output never depends on its neighbours.
    bm, bn, nb = 16, 64, 2
    grid = (triton.cdiv(x.shape[0], bm), triton.cdiv(n, bn))
    _block_linear_kernel[grid](
        x, blocks, out, x.shape[0], n, num_blocks, x.stride(0), out.stride(0),
        KIND=_KIND_CODES[kind], BLOCK_BYTES=nbytes, BM=bm, BN=bn, NB=nb, PRECISION=dot_precision(x.dtype),
    )
    return out
