"""The gated activation of a Llama MLP: silu(gate) * up of a fused gate/up projection.

`silu_mul_ref` is the PyTorch reference; the CPU kernel family runs the same contract in
C++ (kernels/cpu_layer_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate in the first half of each row, up in the second) -> [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
