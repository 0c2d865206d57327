"""The paged KV pool: one tensor per worker. Written by the model's attention layers and,
for pages computed by a prefill worker, by kv_transfer's receiver, only into blocks the
scheduler reserved for that transfer.

Layout: [num_layers, 2 (k, v), num_blocks, block_size, kv_heads, head_dim]. Each layer
reads and writes its own views; which blocks belong to whom is the allocator's business.

A quantized pool (dtype int8 or float8_e4m3fn, see kernels/kv_quant.py) holds beside it
`scales` [num_layers, 2, num_blocks, block_size, kv_heads] float16, one per stored row:
slot (block, offset) of a layer's k or v means `kv[...]` dequantized by `scales[...]` at
the same index, so whoever writes or moves one writes or moves the other. A float pool
has `scales = None` and nothing else changes for it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from pdserve.runtime.config import CacheConfig, ModelConfig

# pdserve.kernels.kv_quant is imported where a pool is built or sized, not here: the
# `pdserve serve` process imports this module (through kv_transfer) and loads no kernels.


class LayerCache(NamedTuple):
    """One layer's views of the pool: k and v [num_blocks, block_size, kv_heads,
    head_dim], and their scales [num_blocks, block_size, kv_heads] (None: float pool)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


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
        from pdserve.kernels.kv_quant import SCALE_DTYPE, is_quantized

        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
            dtype=dtype, device=device,
        )
        self.scales = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_kv_heads, dtype=SCALE_DTYPE, device=device,
        ) if is_quantized(dtype) else None

    @classmethod
    def for_model(cls, model: ModelConfig, cache: CacheConfig, device: torch.device | str) -> KVPool:
        """Size the pool from `cache.num_blocks`, or else from `cache.memory_bytes` (which
        a draft pool of as many blocks shares, per `cache.draft_kv_share`)."""
        dtype = cache.storage_dtype(model.dtype)
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

    def layer(self, index: int) -> LayerCache:
        """One layer's k, v (and scales, for a quantized pool): views, not copies."""
        if self.scales is None:
            return LayerCache(self.kv[index, 0], self.kv[index, 1])
        return LayerCache(self.kv[index, 0], self.kv[index, 1], self.scales[index, 0], self.scales[index, 1])

    def fill_random(self) -> None:
        """Fill every slot with standard normal K/V as the attention layers store them
        (quantized, with scales, in a quantized pool). For scratch pools (transport
        probes, benchmarks), never the engine's."""
        from pdserve.kernels.kv_quant import quantize_kv_ref

        if self.scales is None:
            self.kv.normal_()
            return
        values, scales = quantize_kv_ref(torch.randn(self.kv.shape, device=self.kv.device), self.dtype)
        self.kv.view(torch.uint8).copy_(values.view(torch.uint8))
        self.scales.copy_(scales)

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @property
    def nbytes(self) -> int:
        """Bytes of K/V storage, scales included."""
        extra = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.kv.numel() * self.kv.element_size() + extra


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers in a pool of `dtype`, scales included."""
    from pdserve.kernels.kv_quant import SCALE_DTYPE, is_quantized

    rows = model.num_layers * 2 * block_size * model.num_kv_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    scale_bytes = SCALE_DTYPE.itemsize if is_quantized(dtype) else 0
    return rows * (model.head_dim * itemsize + scale_bytes)
