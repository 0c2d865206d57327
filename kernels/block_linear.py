"""Linear layers straight from GGUF blocks: `block_linear` (C++ on the CPU, Triton on CUDA:
`block_linear_triton`, W4A16 / W8A16 with the dequantization in the loop) and its reference.

A weight [N, K] quantized by llama.cpp is stored as N rows of K / 32 blocks; `blocks` is
that data as a uint8 tensor [N, K / 32, BLOCK_BYTES[kind]]. Kinds:

    q4_1   20 bytes: float16 d, float16 m, 16 bytes of 4-bit q   weight = d * q + m
           (byte i holds weight i in its low nibble, weight i + 16 in its high one)
    q8_0   34 bytes: float16 d, 32 int8 q                        weight = d * q
    f8_0   34 bytes: float16 d, 32 float8_e4m3fn q               weight = d * q
           (Q8_0's layout with FP8 values: pdserve's own, made at load; CUDA only)

`dequantize_blocks_ref` rebuilds the float32 weights exactly as the GGUF reader does (d * q
is exact in float32), so a model computing from blocks uses bit-identical weights to the
same model loaded dense; `block_linear` computes x @ W^T from the blocks without building W,
reading 5 (q4_1) or 8.5 (q8_0) bits per weight instead of 32. It matches
`block_linear_ref` up to float32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pdserve.kernels.cpu_extension import built_cpu_extension
from pdserve.kernels.triton_utils import check_launchable, dot_precision

BLOCK = 32
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34, "f8_0": 34}
CPU_KINDS = ("q4_1", "q8_0")  # what the C++ kernel computes from


def dequantize_blocks_ref(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """[N, K / 32, BLOCK_BYTES[kind]] uint8 -> the float32 weight [N, K]."""
    if kind not in BLOCK_BYTES or blocks.dim() != 3 or blocks.shape[2] != BLOCK_BYTES[kind]:
        raise ValueError(f"blocks of kind {kind!r} must be [N, K / 32, {BLOCK_BYTES.get(kind)}] uint8, "
                         f"got {tuple(blocks.shape)}")
    n, num_blocks, _ = blocks.shape
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # [N, B, 1]
    if kind == "q4_1":
        m = blocks[..., 2:4].contiguous().view(torch.float16).float()
        qs = blocks[..., 4:].int()
        q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()  # low nibbles are weights 0..15
        weight = d * q + m
    else:
        values = torch.int8 if kind == "q8_0" else torch.float8_e4m3fn
        q = blocks[..., 2:].contiguous().view(values).float()
        weight = d * q
    return weight.reshape(n, num_blocks * BLOCK)


def block_linear_ref(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """x [M, K] @ W^T for W given as blocks: [M, N] in x's dtype (computed in float32)."""
    return F.linear(x.float(), dequantize_blocks_ref(blocks, kind).to(x.device)).to(x.dtype)


def block_linear(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """`block_linear_ref`'s contract, computed from the blocks in C++. x: [M, K] float32
    (made contiguous here); returns [M, N] float32. Raises RuntimeError where the CPU
    kernels are not built (see `cpu_kernels_available`).

    Eager callers reach the extension directly: a custom op's dispatch costs ~7 us a call
    against ~1 us, and a decode step makes one call per linear layer (121 for SmolLM2).
    Under torch.compile it is the custom op `pdserve::block_linear`, one opaque node."""
    if x.is_cuda:
        return block_linear_triton(x, blocks, kind)
    if torch.compiler.is_compiling():
        return block_linear_op(x, blocks, kind)
    return _compute(x, blocks, kind)


def _compute(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    if kind not in CPU_KINDS:
        raise ValueError(f"{kind} blocks are computed on CUDA only; the CPU kernel takes {', '.join(CPU_KINDS)}")
    return built_cpu_extension().block_linear(x.contiguous(), blocks, kind)


@torch.library.custom_op("pdserve::block_linear", mutates_args=())
def block_linear_op(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """`block_linear` as a torch custom op, for compiled graphs."""
    return _compute(x, blocks, kind)


@block_linear_op.register_fake
def _(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    return x.new_empty(x.shape[0], blocks.shape[0])


# ---------------------------------------------------------------------------- Triton (CUDA)

_KIND_CODES = {"q8_0": 0, "q4_1": 1, "f8_0": 2}


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
        if KIND == 1:  # q4_1: byte i holds weights i (low nibble) and i + 16 (high)
            i = tl.arange(0, 16)
            qs = tl.load(base[:, :, None] + 4 + i[None, None, :], mask=w_ok[:, :, None], other=0).to(tl.int32)
            m = _load_f16(base + 2, w_ok)[:, :, None]
            w_lo = tl.reshape((qs & 0xF).to(tl.float32) * d + m, (BN, NB * 16))
            w_hi = tl.reshape((qs >> 4).to(tl.float32) * d + m, (BN, NB * 16))
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
