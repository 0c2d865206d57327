"""How an attention layer stores its new K/V and attends over the paged pool.

A backend is a strategy object chosen once per runner: the PyTorch reference on CPU, the
Triton kernels on CUDA. Layers call `forward` and know nothing of either.
"""

from __future__ import annotations

import torch

from pdserve.kernels.attention import paged_attention_ref
from pdserve.kernels.kv_store import store_kv_ref
from pdserve.runtime.forward_batch import ForwardBatch


class ReferenceAttention:
    """PyTorch reference kernels; correct on any device, fast on none."""

    name = "reference"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D]. Writes k/v into the cache slots of `batch`,
        then returns attention output [T, H, D]."""
        store_kv_ref(k, v, k_cache, v_cache, batch.slot_mapping)
        return paged_attention_ref(
            q, k_cache, v_cache, batch.block_tables, batch.query_lens, batch.seq_lens, scale
        )
