"""Small helpers shared by the Triton kernel wrappers.

Triton decides once, when a kernel is decorated (at import), whether it compiles for the
GPU or runs in its CPU interpreter (`TRITON_INTERPRET=1`). `INTERPRETED` records that
decision so callers can refuse to launch kernels on CPU tensors that would not run.
"""

from __future__ import annotations

import functools

import torch
import triton


@triton.jit
def _probe():
    pass


# True when every kernel in this package runs in Triton's interpreter (on CPU tensors).
INTERPRETED: bool = not isinstance(_probe, triton.runtime.JITFunction)


def check_launchable(t: torch.Tensor) -> None:
    """Raise if a kernel of this package cannot run on `t`'s device."""
    if t.is_cuda:
        if INTERPRETED:
            raise RuntimeError("Triton kernels were imported with TRITON_INTERPRET=1; "
                               "unset it to run them on CUDA tensors")
    elif not INTERPRETED:
        raise RuntimeError(f"Triton kernels need CUDA tensors, got a {t.device} tensor; set "
                           "TRITON_INTERPRET=1 before triton is imported to run them on the CPU")


def next_pow2(n: int) -> int:
    """Tile extent for n elements: a power of two, at least 2 so that no tile has a
    dimension of size 1 (one kv head, one split)."""
    return max(2, triton.next_power_of_2(n))


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the CPU interpreter."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str | None:
    """`tl.dot` input precision: exact IEEE for float32 inputs (no TF32 rounding, so fp32
    runs agree with the PyTorch references), the default for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else None

