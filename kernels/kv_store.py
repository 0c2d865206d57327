"""Scatter newly computed keys and values into their cache slots: `store_kv_ref`
(PyTorch); the Triton kernel of the same signature and contract is
`pdserve.kernels.kv_store_triton.store_kv` (apart, so that CPU workers never import Triton)."""

from __future__ import annotations

import torch

from pdserve.kernels.kv_quant import is_quantized, quantize_kv_ref


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write token t's k/v into flat slot `slot_mapping[t]` (block * block_size + offset).

    k, v: [num_tokens, kv_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size,
    kv_heads, head_dim], mutated in place. Slots must be distinct; a slot of -1 is padding
    and is skipped. A quantized cache (int8/fp8) comes with k_scale, v_scale [num_blocks,
    block_size, kv_heads] float16: each row is quantized with its own scale
    (kernels/kv_quant.py), written to the same slot.
    """
    assert k.shape == v.shape and k.shape[0] == slot_mapping.shape[0]
    assert (k_scale is None) == (v_scale is None) == (not is_quantized(k_cache.dtype))
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    if k_scale is None:
        flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
        flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))
        return
    for x, flat, scales in ((k, flat_k, k_scale), (v, flat_v, v_scale)):
        q, s = quantize_kv_ref(x, flat.dtype)
        # As bytes: ATen has no index_copy_ for float8 (the bits are what is stored).
        flat.view(torch.uint8).index_copy_(0, slot_mapping, q.view(torch.uint8))
        scales.view(-1, scales.shape[2]).index_copy_(0, slot_mapping, s)
