"""Scatter newly computed keys and values into their cache slots.

`store_kv` (Triton) and `store_kv_ref` (PyTorch) share one signature and contract. Grid of
the kernel: one program per token, copying that token's [KVH, D] keys and values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.triton_utils import check_launchable, next_pow2


@triton.jit
def _store_kv_kernel(
    K, V, K_cache, V_cache, Slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(Slots + token)
    if slot < 0:  # padding token: writes nothing
        return
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_h < KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst = (slot // PAGE_SIZE) * stride_cb + (slot % PAGE_SIZE) * stride_cs \
        + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(K + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(K_cache + dst, k.to(K_cache.dtype.element_ty), mask=mask)
    tl.store(V_cache + dst, v.to(V_cache.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton version of `store_kv_ref`: same contract. Never synchronises with the host
    (padding is skipped on the device), so it can be captured in a CUDA graph."""
    tokens, kv_heads, head_dim = k.shape
    assert k.shape == v.shape and slot_mapping.shape == (tokens,)
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[2:] == (kv_heads, head_dim)
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride(3) == 1
    check_launchable(k)
    if tokens == 0:
        return
    _store_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, H_PAD=next_pow2(kv_heads), D_PAD=next_pow2(head_dim),
        PAGE_SIZE=k_cache.shape[1],
        num_warps=1 if kv_heads * head_dim <= 512 else 4,
    )


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
