"""Linear layers straight from GGUF blocks: `block_linear` (C++ on the CPU, Triton on CUDA:
block_linear_triton.py, W4A16 / W8A16 with the dequantization in the loop) and its reference.

A weight [N, K] quantized by llama.cpp is stored as N rows of K / 32 blocks; `blocks` is
that data as a uint8 tensor [N, K / 32, BLOCK_BYTES[kind]]. Kinds:

    q4_0   18 bytes: float16 d, 16 bytes of 4-bit q              weight = d * (q - 8)
    q4_1   20 bytes: float16 d, float16 m, 16 bytes of 4-bit q   weight = d * q + m
           (in both, byte i holds weight i in its low nibble, weight i + 16 in its high one)
    q8_0   34 bytes: float16 d, 32 int8 q                        weight = d * q
    f8_0   34 bytes: float16 d, 32 float8_e4m3fn q               weight = d * q
           (Q8_0's layout with FP8 values: pdserve's own, made at load; CUDA only)

`dequantize_blocks_ref` rebuilds the float32 weights exactly as the GGUF reader does (d * q
and d * (q - 8) are exact in float32), so a model computing from blocks uses bit-identical weights to the
same model loaded dense; `block_linear` computes x @ W^T from the blocks without building W,
reading 4.5 (q4_0), 5 (q4_1) or 8.5 (q8_0) bits per weight instead of 32. It matches
`block_linear_ref` up to float32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.kernels.cpu_extension import built_cpu_extension

BLOCK = 32
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34, "f8_0": 34}
CPU_KINDS = ("q4_0", "q4_1", "q8_0")  # what the C++ kernel computes from


def dequantize_blocks_ref(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """[N, K / 32, BLOCK_BYTES[kind]] uint8 -> the float32 weight [N, K]."""
    if kind not in BLOCK_BYTES or blocks.dim() != 3 or blocks.shape[2] != BLOCK_BYTES[kind]:
        raise ValueError(f"blocks of kind {kind!r} must be [N, K / 32, {BLOCK_BYTES.get(kind)}] uint8, "
                         f"got {tuple(blocks.shape)}")
    n, num_blocks, _ = blocks.shape
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # [N, B, 1]
    if kind in ("q4_0", "q4_1"):
        qs = blocks[..., 4 if kind == "q4_1" else 2:].int()
        q = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # low nibbles are weights 0..15
        if kind == "q4_1":
            weight = d * q.float() + blocks[..., 2:4].contiguous().view(torch.float16).float()
        else:
            weight = d * (q - 8).float()
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
        from pdserve.kernels.block_linear_triton import block_linear_triton  # CUDA workers only import Triton

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
