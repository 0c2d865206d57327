"""Scatter newly computed keys and values into their cache slots: PyTorch reference."""

from __future__ import annotations

import torch


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token t's k/v into flat slot `slot_mapping[t]` (block * block_size + offset).

    k, v: [num_tokens, kv_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size,
    kv_heads, head_dim], mutated in place. Slots must be distinct; a slot of -1 is padding
    and is skipped.
    """
    assert k.shape == v.shape and k.shape[0] == slot_mapping.shape[0]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))
