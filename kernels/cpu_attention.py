"""Paged attention over a whole mixed batch on the CPU: one call per layer, no Python loop.

`paged_attention_cpu` has `paged_attention_ref`'s contract (kernels/attention.py) with the
lengths as int64 tensors. It is C++ (csrc/paged_attention_cpu.cpp) in the CPU kernels'
extension (kernels/cpu_extension.py), built on first use. `cpu_kernels_available()` says
whether it could be built here; where it cannot, callers keep the PyTorch reference.
"""

from __future__ import annotations

import torch

from pdserve.kernels.cpu_extension import built_cpu_extension


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries against their paged context, every sequence
    of the batch in one call. q: [T, H, D] float32 contiguous; k/v_cache: [blocks,
    block_size, KVH, D] float32 contiguous, or int8 / float8_e4m3fn with k/v_scale
    [blocks, block_size, KVH] float16 (kernels/kv_quant.py); block_tables: [B, pages] int64;
    query_start: [B + 1] int64 offsets into q; seq_lens: [B] int64. Returns [T, H, D].
    Raises RuntimeError if the kernel is not available (see `cpu_kernels_available`)."""
    return built_cpu_extension().paged_attention(q, k_cache, v_cache, block_tables, query_start, seq_lens, scale,
                                                 k_scale, v_scale)
