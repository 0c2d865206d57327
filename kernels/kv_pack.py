"""Gather a request's KV pages into one contiguous buffer, and scatter them back: how a
CUDA pool sends a chunk whose blocks are not consecutive (kv_transfer's torch.distributed
frames). Pages move exactly as the pool stores them. A quantized pool's pages go with
their row scales (kernels/kv_quant.py), which the transports move as stored: there is no
second quantization on the wire.

Layouts (all contiguous):

    pool     kv      [layers, 2, num_blocks, block_size, kv_heads, head_dim]   (KVPool.kv)
    packed   data    [layers, 2, n,          block_size, kv_heads, head_dim]

Page j of the packed buffer is pool block `block_ids[j]`; index 1 of dim 1 is k (0) or
v (1). To move one layer, pass `kv[l:l + 1]` (a contiguous view) and get layers == 1.
`pack_kv` / `unpack_kv` (Triton) and `pack_kv_ref` / `unpack_kv_ref` (PyTorch) share
signatures and this contract: exact copies, in the pool's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.triton_utils import check_launchable

BLOCK = 1024  # elements per inner step over a page


@triton.jit
def _copy_pages_kernel(
    Pool, Block_ids, Packed,
    num_blocks, n,
    PAGE: tl.constexpr, BLOCK: tl.constexpr, GATHER: tl.constexpr,
):
    """Page j of Packed <-> pool block Block_ids[j], for each (layer, k/v): copied out of
    the pool when GATHER, into it otherwise."""
    lk = tl.program_id(0)  # layer * 2 + (0 for k, 1 for v)
    j = tl.program_id(1)
    pool_page = Pool + (lk.to(tl.int64) * num_blocks + tl.load(Block_ids + j).to(tl.int64)) * PAGE
    packed_page = Packed + (lk.to(tl.int64) * n + j) * PAGE
    if GATHER:
        src = pool_page
        dst = packed_page
    else:
        src = packed_page
        dst = pool_page
    for i in range(0, PAGE, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < PAGE), mask=offs < PAGE)


def _check(kv: torch.Tensor, block_ids: torch.Tensor) -> None:
    assert kv.dim() == 6 and kv.shape[1] == 2 and kv.is_contiguous()
    assert block_ids.dim() == 1 and not block_ids.is_floating_point()
    assert block_ids.device == kv.device


def pack_kv(kv: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Pages `block_ids` of `kv` gathered into a new packed buffer. Reads kv only. Block
    ids must be in range (not checked on the device)."""
    _check(kv, block_ids)
    check_launchable(kv)
    layers, _, num_blocks = kv.shape[:3]
    n = block_ids.shape[0]
    data = torch.empty(layers, 2, n, *kv.shape[3:], dtype=kv.dtype, device=kv.device)
    if n:
        _copy_pages_kernel[(layers * 2, n)](kv, block_ids, data, num_blocks, n,
                                            PAGE=kv[0, 0, 0].numel(), BLOCK=BLOCK, GATHER=True)
    return data


def unpack_kv(data: torch.Tensor, kv: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Write packed pages back into pool blocks `block_ids` of `kv` (mutated in place)."""
    _check(kv, block_ids)
    check_launchable(kv)
    layers, _, num_blocks = kv.shape[:3]
    n = block_ids.shape[0]
    assert data.shape == (layers, 2, n, *kv.shape[3:]) and data.is_contiguous() and data.dtype == kv.dtype
    if n:
        _copy_pages_kernel[(layers * 2, n)](kv, block_ids, data, num_blocks, n,
                                            PAGE=kv[0, 0, 0].numel(), BLOCK=BLOCK, GATHER=False)


def pack_kv_ref(kv: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of `pack_kv`."""
    _check(kv, block_ids)
    return kv.index_select(2, block_ids)


def unpack_kv_ref(data: torch.Tensor, kv: torch.Tensor, block_ids: torch.Tensor) -> None:
    """PyTorch reference of `unpack_kv`."""
    _check(kv, block_ids)
    assert data.dtype == kv.dtype
    kv.index_copy_(2, block_ids, data)
