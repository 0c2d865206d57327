"""Quantizing dense weights at load time into the GGUF block formats the CPU kernels compute
from (pdserve.kernels.block_linear), with the gguf package's own quantizers: a model from
any checkpoint (safetensors included) then runs like one loaded from a quantized GGUF file.

Q8_0 is the int8 weight-only format: per row, blocks of 32 weights as int8 with one
float16 scale d = max|w| / 127, weight = d * q. Quantization is per row and per block,
never across rows, so it needs no calibration data and a row's output depends on its own
inputs only.

F8_0 (CUDA) has Q8_0's layout with float8_e4m3fn values: d = max|w| / 448 per block of 32
(float16), q = e4m3(w / d) rounded to nearest even, weight = d * q; made here with torch,
on the weight's own device.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

BLOCK = 32
_KINDS = {"q8_0": GGMLQuantizationType.Q8_0, "f8_0": None}
F8_MAX = 448.0  # the largest finite float8_e4m3fn
_CHUNK_ELEMENTS = 1 << 20  # weights quantized per call to the gguf quantizer


def quantizable(weight: torch.Tensor) -> bool:
    """Whether `weight` [out, in] splits into whole blocks along its rows."""
    return weight.dim() == 2 and weight.shape[1] % BLOCK == 0


def quantize_blocks(weight: torch.Tensor, kind: str = "q8_0") -> torch.Tensor:
    """A float weight [out, in] (in a multiple of 32) as blocks [out, in / 32, bytes] uint8
    of `kind`, laid out as in a GGUF file."""
    if kind not in _KINDS:
        raise ValueError(f"cannot quantize to {kind!r}; kinds: {', '.join(_KINDS)}")
    if not quantizable(weight):
        raise ValueError(f"a weight of shape {tuple(weight.shape)} does not split into blocks of {BLOCK}")
    if kind == "f8_0":
        return _quantize_f8_0(weight.detach())
    rows = weight.detach().to("cpu", torch.float32).contiguous().numpy()
    # A few rows at a time: the quantizer's float temporaries (several times its input)
    # then stay small even for an embedding. Blocks never span rows, so the bytes are the
    # same as from one call over the whole weight.
    step = max(1, _CHUNK_ELEMENTS // rows.shape[1])
    first = quantize(rows[:step], _KINDS[kind])  # [rows, in / 32 * bytes]
    data = np.empty((rows.shape[0], first.shape[1]), dtype=np.uint8)
    data[:step] = first
    for start in range(step, rows.shape[0], step):
        data[start:start + step] = quantize(rows[start:start + step], _KINDS[kind])
    return torch.from_numpy(data).view(weight.shape[0], weight.shape[1] // BLOCK, -1)


def _quantize_f8_0(weight: torch.Tensor) -> torch.Tensor:
    w = weight.float().reshape(weight.shape[0], -1, BLOCK)
    d = (w.abs().amax(dim=-1) / F8_MAX).to(torch.float16)
    d32 = d.float()[..., None]
    # v = w / d with the rounded d, clamped: float16 rounding may leave |v| a hair over 448
    v = torch.where(d32 > 0, w / torch.where(d32 > 0, d32, 1.0), 0.0).clamp(-F8_MAX, F8_MAX)
    q = v.to(torch.float8_e4m3fn)
    return torch.cat((d[..., None].view(torch.uint8), q.view(torch.uint8)), dim=-1).contiguous()
