"""The paged KV pool: one tensor per worker. Written by the model's attention layers and,
for pages computed by a prefill worker, by kv_transfer's receiver, only into blocks the
scheduler reserved for that transfer.

Layout: [num_layers, 2 (k, v), num_blocks, block_size, kv_heads, head_dim]. Each layer
reads and writes its own views; which blocks belong to whom is the allocator's business.
"""

from __future__ import annotations

import math

import torch

from pdserve.runtime.config import CacheConfig, ModelConfig


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
            dtype=dtype, device=device,
        )

    @classmethod
    def for_model(cls, model: ModelConfig, cache: CacheConfig, device: torch.device | str) -> KVPool:
        """Size the pool from `cache.num_blocks`, or else from `cache.memory_bytes` (which
        a draft pool of as many blocks shares, per `cache.draft_kv_share`)."""
        dtype = cache.dtype or model.dtype
        num_blocks = cache.num_blocks
        if num_blocks is None:
            per_block = math.ceil(bytes_per_block(model, cache.block_size, dtype) * (1.0 + cache.draft_kv_share))
            num_blocks = cache.memory_bytes // per_block
            if num_blocks == 0:
                raise ValueError(
                    f"KV cache memory of {cache.memory_bytes} bytes holds no block "
                    f"(one block needs {per_block} bytes, a draft model's share included); "
                    "raise the KV cache memory"
                )
        return cls(model.num_layers, num_blocks, cache.block_size, model.num_kv_heads,
                   model.head_dim, dtype, device)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each [num_blocks, block_size, kv_heads, head_dim]."""
        return self.kv[index, 0], self.kv[index, 1]

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return model.num_layers * 2 * block_size * model.num_kv_heads * model.head_dim * itemsize
