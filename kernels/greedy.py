"""What every sampling step reads from each row of logits: its greedy token (the first
maximum, as `torch.argmax`) and its logsumexp (the normaliser of the row's logprobs).

`argmax_logsumexp` runs one C++ pass per row for float32 logits on the CPU
(csrc/sampling_cpu.cpp; torch's argmax over a 49,152-entry row is slower than both
there) and `argmax_logsumexp_ref` elsewhere.
"""

from __future__ import annotations

import torch

from pdserve.kernels.cpu_extension import built_cpu_extension, cpu_kernels_available


def argmax_logsumexp_ref(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (argmax [B] int64, logsumexp [B] in logits' dtype)."""
    return logits.argmax(dim=-1), torch.logsumexp(logits, dim=-1)


def argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`argmax_logsumexp_ref`'s contract; the C++ kernel where it applies (rows free of NaN)."""
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.shape[1] > 0 and logits.stride(1) == 1 and cpu_kernels_available()):
        return built_cpu_extension().argmax_logsumexp(logits)
    return argmax_logsumexp_ref(logits)
