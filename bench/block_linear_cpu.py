"""pdserve's CPU block linear (kernels/block_linear.py: C++ over the GGUF's own blocks)
against the weight-packed matmuls torch ships for the CPU, on SmolLM2's own weights:

    pdserve        x @ W^T from the Q4_1 / Q8_0 blocks as stored (bit-identical weights)
    int4           aten._weight_int4pack_mm_for_cpu, the same Q4_1 blocks repacked
                   (scale d, zero m + 8d per 32 weights: Q4_1's values up to rounding)
    int8           aten._weight_int8pack_mm, int8 with one scale per output row (not
                   Q8_0's per 32 weights: a requantization that changes the weights)
    ... bf16       the same with bfloat16 activations, the path torch tunes these for
                   (pdserve computes in float32)
    dense          F.linear over the float32 weights (MKL), the bytes pdserve avoids

for decode-sized batches (M rows) of the layers a SmolLM2 step runs: q/o [576x576],
gate/up [1536x576], down [576x1536], the head [49152x576] (Q8_0 in the file). Prints the
median time per call and each other kernel's time over pdserve's, and each kernel's
largest error against the dense product.

    python bench/block_linear_cpu.py [--rows 1 8 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import machine_line

from pdserve.kernels.block_linear import BLOCK, block_linear, dequantize_blocks_ref
from pdserve.runtime.weights.checkpoint import load_checkpoint

LAYERS = {"q/o 576x576": "model.layers.0.self_attn.q_proj.weight", "gate 1536x576": "model.layers.0.mlp.gate_proj.weight",
          "down 576x1536": "model.layers.0.mlp.down_proj.weight", "head 49152x576": "model.embed_tokens.weight"}


def smollm2_blocks() -> dict[str, tuple[str, torch.Tensor]]:
    """SmolLM2's block-format matrices as pdserve loads them: name -> (kind, uint8 blocks
    [N, K / 32, bytes])."""
    checkpoint = load_checkpoint("smollm2-135m-instruct")
    return {name: (kind, blocks) for name, kind, blocks in checkpoint.iter_weight_blocks()}


def int4_pack(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1 blocks -> torch's CPU int4 layout: w = (q - 8) * d + (m + 8d) per 32 weights."""
    n, groups, _ = blocks.shape
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()[..., 0]  # [N, G]
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()[..., 0]
    qs = blocks[..., 4:].int()
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(n, groups * BLOCK)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 2)
    scale_zero = torch.stack((d, m + 8 * d), dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
    return packed, scale_zero


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, K] -> int8 with one scale per row (what _weight_int8pack_mm takes)."""
    scale = weight.abs().amax(dim=1) / 127
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def median_seconds(fn, budget: float = 0.5) -> float:
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < budget or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernels_for(x: torch.Tensor, blocks: torch.Tensor, kind: str, dense: torch.Tensor) -> dict:
    """The calls timed for one layer and batch x: name -> a function computing x @ W^T
    (torch's packed kernels with x as it is, float32, and in bfloat16, their fast path)."""
    q8, q8_scale = int8_rows(dense)
    x16 = x.bfloat16()
    kernels = {"pdserve": lambda: block_linear(x, blocks, kind),
               "int8": lambda: torch._weight_int8pack_mm(x, q8, q8_scale),
               "int8 bf16": lambda: torch._weight_int8pack_mm(x16, q8, q8_scale.bfloat16()),
               "dense": lambda: F.linear(x, dense)}
    if kind == "q4_1":
        packed, scale_zero = int4_pack(blocks)
        scale_zero16 = scale_zero.bfloat16()
        kernels["int4"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, BLOCK, scale_zero)
        kernels["int4 bf16"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, packed, BLOCK, scale_zero16)
    return kernels


COLUMNS = ("pdserve", "int4", "int4 bf16", "int8", "int8 bf16", "dense")


def row(label: str, rows: int, seconds: dict, error: dict) -> str:
    ours = seconds["pdserve"]
    times = [f"{seconds[k] * 1e6:9.0f}" if k in seconds else f"{'-':>9s}" for k in COLUMNS]
    ratios = [f"{seconds[k] / ours:9.2f}x" if k in seconds else f"{'-':>10s}" for k in COLUMNS[1:]]
    errors = ", ".join(f"{error[k]:.1e}" if k in error else "-" for k in COLUMNS[:-1])
    return f"{label:<20s} {rows:3d} {' '.join(times)}  {' '.join(ratios)}   {errors}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 24], help="batch rows M")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    print("median microseconds per call; ratios are each kernel's time over pdserve's")
    header = ["layer".ljust(20), "  M", *(k.rjust(9) for k in COLUMNS)]
    print(" ".join(header) + "  " + " ".join(k.rjust(10) for k in COLUMNS[1:])
          + "   max |error| vs the float32 dense product: " + ", ".join(COLUMNS[:-1]))
    weights = smollm2_blocks()
    for label, name in LAYERS.items():
        kind, blocks = weights[name]
        dense = dequantize_blocks_ref(blocks, kind)
        for rows in args.rows:
            x = torch.randn(rows, dense.shape[1])
            expected = F.linear(x, dense)
            kernels = kernels_for(x, blocks, kind, dense)
            seconds = {k: median_seconds(fn) for k, fn in kernels.items()}
            error = {k: (fn() - expected).abs().max().item() for k, fn in kernels.items()}
            print(row(f"{label} {kind}", rows, seconds, error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
