"""The only code that turns KV pages into bytes and back.

A chunk is one layer's k and v for a run of pages, laid out contiguously as
[2, num_pages, block_size, kv_heads, head_dim] in the pool's dtype (k first, then v; page
j is block `block_ids[j]`). Its bytes are exactly that tensor's memory, little-endian as
the hardware stores it; both ends check the layout (`KVLayout`) before exchanging any.
"""

from __future__ import annotations

from collections.abc import Sequence

import google_crc32c
import numpy as np
import torch

from pdserve.kv_transfer.messages import KVLayout
from pdserve.runtime.kv_pool import KVPool


def layout_of(pool: KVPool) -> KVLayout:
    num_layers, _, _, block_size, kv_heads, head_dim = pool.kv.shape
    return KVLayout(num_layers, block_size, kv_heads, head_dim, dtype_name(pool.dtype))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def chunk_shape(layout: KVLayout, num_pages: int) -> tuple[int, ...]:
    return (2, num_pages, *layout.page_shape)


def read_pages(pool: KVPool, layer: int, block_ids: Sequence[int]) -> torch.Tensor:
    """A contiguous CPU copy of one layer's pages: [2, len(block_ids), bs, kv_heads, hd]."""
    index = torch.tensor(list(block_ids), dtype=torch.int64, device=pool.kv.device)
    return pool.kv[layer].index_select(1, index).cpu().contiguous()


def write_pages(pool: KVPool, layer: int, block_ids: Sequence[int], pages: torch.Tensor) -> None:
    """Copy `pages` (as from `read_pages`) into one layer's blocks. The caller has checked
    that the blocks are its own and the shape matches."""
    index = torch.tensor(list(block_ids), dtype=torch.int64, device=pool.kv.device)
    pool.kv[layer].index_copy_(1, index, pages.to(pool.kv.device, pool.dtype))


def to_bytes(pages: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without copying."""
    assert pages.is_contiguous() and pages.device.type == "cpu"
    return memoryview(pages.view(torch.uint8).numpy()).cast("B")


def from_bytes(data: bytes | bytearray | memoryview, layout: KVLayout, num_pages: int) -> torch.Tensor:
    """A tensor view over `data` shaped as a chunk of `num_pages` pages. The caller has
    checked len(data) against `chunk_nbytes`."""
    dtype = getattr(torch, layout.dtype)
    flat = torch.frombuffer(bytearray(data) if isinstance(data, bytes) else data, dtype=dtype)
    return flat.view(chunk_shape(layout, num_pages))


def chunk_nbytes(layout: KVLayout, num_pages: int) -> int:
    itemsize = torch.empty((), dtype=getattr(torch, layout.dtype)).element_size()
    count = 2 * num_pages * layout.block_size * layout.num_kv_heads * layout.head_dim
    return count * itemsize


def checksum(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C of the payload: hardware-accelerated (about 20 GB/s here, 9x zlib.crc32), so
    checking every chunk costs little next to moving it."""
    # The extension takes numpy arrays over any buffer (zero-copy), not writable memoryviews.
    return google_crc32c.value(np.frombuffer(data, dtype=np.uint8))
