"""The only code that turns KV pages into bytes and back.

A chunk is one layer's k and v for a run of pages, laid out contiguously as
[2, num_pages, block_size, kv_heads, head_dim] in the pool's dtype (k first, then v; page
j is block `block_ids[j]`). Its bytes are exactly that tensor's memory, little-endian as
the hardware stores it; both ends check the layout (`KVLayout`) before exchanging any.

A quantized pool's chunk (int8 / float8_e4m3fn, `KVLayout.scale_dtype` set) moves as
stored: those values, then their scales [2, num_pages, block_size, kv_heads] in the
scale dtype, in one payload. Its packed form (`read_pages`, `from_bytes`) is the payload
as a flat uint8 tensor; `split_chunk` gives its two parts. A float pool's chunk has no
scales and its packed form is the pages tensor itself, as before.

Transports that move pages without packing them (nixl, tcp's receiver) address the pool
itself: `pool_runs` splits a chunk into the pool's contiguous runs of pages, in the
chunk's byte order (a quantized pool's scale runs after its value runs), and
`checksum_pages` hashes them as if they had been packed.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import xxhash

from pdserve.kv_transfer.messages import KVLayout, KVTicket, PagesHeader
from pdserve.runtime.kv_pool import KVPool


def layout_of(pool: KVPool) -> KVLayout:
    num_layers, _, _, block_size, kv_heads, head_dim = pool.kv.shape
    scale_dtype = dtype_name(pool.scales.dtype) if pool.quantized else ""
    return KVLayout(num_layers, block_size, kv_heads, head_dim, dtype_name(pool.dtype), scale_dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layout_mismatch(prefill: KVLayout, decode: KVLayout) -> str | None:
    """Why a prefill worker whose pool has layout `prefill` cannot send pages into a
    decode worker's of layout `decode`; None when they agree."""
    if (prefill.dtype, prefill.scale_dtype) != (decode.dtype, decode.scale_dtype):
        return (f"the KV cache dtypes differ: the prefill worker stores {_describe(prefill)}, the decode worker "
                f"{_describe(decode)}; start both with the same --kv-cache-dtype")
    if prefill != decode:
        return (f"the KV page layouts differ (prefill {prefill}, decode {decode}): the two workers must serve "
                "the same model with the same block size")
    return None


def _describe(layout: KVLayout) -> str:
    return f"{layout.dtype} with {layout.scale_dtype} scales" if layout.scale_dtype else layout.dtype


def chunk_shape(layout: KVLayout, num_pages: int) -> tuple[int, ...]:
    return (2, num_pages, *layout.page_shape)


def scale_shape(layout: KVLayout, num_pages: int) -> tuple[int, ...]:
    """The shape of a chunk's scales; () for a float layout (no scales)."""
    return (2, num_pages, *layout.scale_page_shape) if layout.scale_dtype else ()


def pages_header(ticket: KVTicket, layout: KVLayout, layer: int, page_start: int, num_pages: int,
                 checksum: int | None) -> PagesHeader:
    """The header of a chunk of `num_pages` pages in `layout` (the sender's pool's) for
    `ticket`: dtype, shapes and size as this module lays them out."""
    return PagesHeader(
        request_id=ticket.request_id, ticket_id=ticket.ticket_id, secret=ticket.secret, layer=layer,
        page_start=page_start, num_pages=num_pages, dtype=layout.dtype, shape=chunk_shape(layout, num_pages),
        nbytes=chunk_nbytes(layout, num_pages), checksum=checksum, scale_dtype=layout.scale_dtype,
        scale_shape=scale_shape(layout, num_pages))


def read_pages(pool: KVPool, layer: int, block_ids: Sequence[int]) -> torch.Tensor:
    """A contiguous CPU copy of one layer's pages: [2, len(block_ids), bs, kv_heads, hd];
    for a quantized pool the chunk's bytes (values, then scales) as a flat uint8 tensor."""
    index = torch.tensor(list(block_ids), dtype=torch.int64, device=pool.kv.device)
    if not pool.quantized:
        return pool.kv[layer].index_select(1, index).cpu().contiguous()
    values = pool.kv[layer].view(torch.uint8).index_select(1, index)
    scales = pool.scales[layer].index_select(1, index)
    return torch.cat([values.reshape(-1), scales.reshape(-1).view(torch.uint8)]).cpu()


def split_chunk(layout: KVLayout, num_pages: int, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [2, n, bs, kvh, hd], scales [2, n, bs, kvh]) views of a quantized chunk's
    packed uint8 bytes (admitted: its size is `chunk_nbytes`)."""
    shape = chunk_shape(layout, num_pages)
    split = math.prod(shape) * getattr(torch, layout.dtype).itemsize
    values = packed[:split].view(getattr(torch, layout.dtype)).view(shape)
    scales = packed[split:].view(getattr(torch, layout.scale_dtype)).view(scale_shape(layout, num_pages))
    return values, scales


# Per scale dtype: the integer type of its bits, and the bits of +infinity. A scale is
# finite and not negative exactly when its bits, read as that signed integer, lie in
# [0, +infinity's): the sign bit makes them negative, infinities and NaNs are at or above.
# (-0.0 is refused too: the quantizer's scales are max |x| / q, never -0.)
_SCALE_BITS = {torch.float16: (torch.int16, 0x7C00), torch.bfloat16: (torch.int16, 0x7F80),
               torch.float32: (torch.int32, 0x7F800000)}


def stored_values_problem(values: torch.Tensor, scales: torch.Tensor) -> str | None:
    """Why a quantized chunk's values and scales (views with a contiguous last dimension,
    any device) cannot be what a pool stores: a scale that is negative or not finite, an
    int8 value of -128 or a float8 NaN (the quantizer writes neither); None if they can."""
    # Reductions over the bits, not elementwise compares: ATen's int8 ==, float16 -> float
    # and float8 -> float conversions cost ~1 GB/s on the CPU, min / max run at memory speed.
    if scales.numel():
        bits, infinity = _SCALE_BITS[scales.dtype]
        low, high = torch.aminmax(scales.view(bits))
        if int(low) < 0 or int(high) >= infinity:
            return "a KV scale is negative, infinite or NaN"
    if values.numel() == 0:
        return None
    if values.dtype == torch.int8 and int(values.min()) == -128:
        return "an int8 KV value is -128, outside the quantizer's [-127, 127]"
    if values.dtype != torch.int8 and int((values.view(torch.uint8) & 0x7F).max()) == 0x7F:
        return "a float8 KV value is NaN"  # e4m3fn's NaNs are 0x7F and 0xFF
    return None


def write_pages(pool: KVPool, layer: int, block_ids: Sequence[int], pages: torch.Tensor) -> None:
    """Copy `pages` (as from `read_pages`, or `from_bytes`) into one layer's blocks: a
    quantized pool's values and scales both. The caller has checked that the blocks are
    its own and the size matches."""
    if pool.quantized:
        parts = split_chunk(layout_of(pool), len(block_ids), pages)
    else:
        parts = (pages if pages.dtype == pool.dtype else pages.to(pool.dtype),)
    if pool.kv.device.type == "cpu":
        # numpy's fancy assignment copies each page as one run of bytes: 2-5x ATen's
        # index_copy_ of page words (measured, 64-512 int8 or float32 pages).
        index = np.asarray(block_ids, dtype=np.intp)
        for host, part in zip(_host_pages(pool), parts):
            host[layer][:, index] = _page_bytes(part.cpu()).numpy()
    else:
        _index_copy_pages(pool, layer, block_ids, parts)


def _index_copy_pages(pool: KVPool, layer: int, block_ids: Sequence[int], parts: Sequence[torch.Tensor]) -> None:
    """`write_pages` on the pool's device: values (and scales) as page words."""
    index = torch.tensor(list(block_ids), dtype=torch.int64, device=pool.kv.device)
    for target, part in zip((pool.kv, pool.scales), parts):
        # As words of whole pages: the bits are what is stored (ATen has no index_copy_
        # for float8), and its byte-wise copy is ~7x slower than one of 8-byte words.
        _page_words(target[layer]).index_copy_(1, index, _page_words(part.to(pool.kv.device)))


def _page_bytes(pages: torch.Tensor) -> torch.Tensor:
    """[2, n, ...] pages (contiguous) as [2, n, page bytes] uint8: a view."""
    return pages.contiguous().view(torch.uint8).reshape(2, pages.shape[1], -1)


def _page_words(pages: torch.Tensor) -> torch.Tensor:
    """[2, n, ...] contiguous pages as [2, n, words] of the widest integer type that divides
    a page's bytes: a view, for copying pages as raw bits."""
    flat = _page_bytes(pages)
    for word in (torch.int64, torch.int32, torch.int16):
        if flat.shape[2] % word.itemsize == 0:
            return flat.view(word)
    return flat


def to_bytes(pages: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without copying."""
    assert pages.is_contiguous() and pages.device.type == "cpu"
    return memoryview(pages.view(torch.uint8).numpy()).cast("B")


def from_bytes(data: bytes | bytearray | memoryview, layout: KVLayout, num_pages: int) -> torch.Tensor:
    """A tensor view over `data` shaped as a chunk of `num_pages` pages (a quantized
    chunk: flat uint8, see `split_chunk`). The caller has checked len(data) against
    `chunk_nbytes`."""
    buffer = bytearray(data) if isinstance(data, bytes) else data
    if layout.scale_dtype:
        return torch.frombuffer(buffer, dtype=torch.uint8)
    flat = torch.frombuffer(buffer, dtype=getattr(torch, layout.dtype))
    return flat.view(chunk_shape(layout, num_pages))


def from_tensor(payload: torch.Tensor, layout: KVLayout, num_pages: int) -> torch.Tensor:
    """`from_bytes` of a received uint8 tensor (on any device), without copying."""
    if layout.scale_dtype:
        return payload
    return payload.view(getattr(torch, layout.dtype)).view(chunk_shape(layout, num_pages))


def chunk_nbytes(layout: KVLayout, num_pages: int) -> int:
    """Bytes of a chunk of `num_pages` pages: its values, and a quantized chunk's scales."""
    itemsize = getattr(torch, layout.dtype).itemsize
    count = 2 * num_pages * layout.block_size * layout.num_kv_heads * layout.head_dim
    return count * itemsize + scale_nbytes(layout, num_pages)


def scale_nbytes(layout: KVLayout, num_pages: int) -> int:
    if not layout.scale_dtype:
        return 0
    return 2 * num_pages * layout.block_size * layout.num_kv_heads * getattr(torch, layout.scale_dtype).itemsize


def checksum(data: bytes | bytearray | memoryview) -> int:
    """XXH3-64 of the payload: measured on the 2-core VM at 20 GB/s from memory and 50 GB/s
    in cache, 3.5x CRC-32C (google-crc32c), so checking every chunk costs little next to
    moving it. It detects corruption; the ticket's secret, not this, authenticates."""
    return xxhash.xxh3_64_intdigest(np.frombuffer(data, dtype=np.uint8))


class PoolRun(NamedTuple):
    """`num_pages` consecutive blocks from `block` of one (layer, k or v) of the pool's
    values (or, `scales`, of a quantized pool's scales), contiguous in memory, holding
    chunk bytes from `offset`."""

    kv: int  # 0: k, 1: v
    block: int
    num_pages: int
    offset: int  # byte offset of the run in the packed chunk
    scales: bool = False


def pool_runs(pool: KVPool, block_ids: Sequence[int]) -> list[PoolRun]:
    """A chunk of `block_ids` as the pool's contiguous runs, in the chunk's byte order (k
    pages, then v pages, then a quantized pool's k and v scales; consecutive block ids
    merge)."""
    blocks = np.asarray(block_ids, dtype=np.int64)
    starts = np.flatnonzero(np.diff(blocks, prepend=blocks[0] - 2) != 1)  # where a run begins
    lengths = np.diff(starts, append=len(blocks))
    parts = [(False, page_nbytes(pool))]
    if pool.quantized:
        parts.append((True, scale_page_nbytes(pool)))
    runs, offset = [], 0
    for scales, page_bytes in parts:
        for kv in (0, 1):
            for start, length in zip(blocks[starts].tolist(), lengths.tolist()):
                runs.append(PoolRun(kv, start, length, offset, scales))
                offset += length * page_bytes
    return runs


def run_view(pool: KVPool, layer: int, run: PoolRun) -> torch.Tensor:
    """The pool's memory of one run (contiguous)."""
    source = pool.scales if run.scales else pool.kv
    return source[layer, run.kv, run.block:run.block + run.num_pages]


def page_nbytes(pool: KVPool) -> int:
    """Bytes of one page of k (or of v) at one layer (values; a quantized pool's scales
    are `scale_page_nbytes` more)."""
    return pool.kv[0, 0, 0].numel() * pool.kv.element_size()


def scale_page_nbytes(pool: KVPool) -> int:
    """Bytes of one page's scales of k (or of v) at one layer of a quantized pool."""
    return pool.scales[0, 0, 0].numel() * pool.scales.element_size()


def run_addresses(pool: KVPool, layer: int, runs: Sequence[PoolRun]) -> list[tuple[int, int]]:
    """(address, nbytes) of each run's memory (values and scales are each one contiguous
    tensor)."""
    num_blocks = pool.num_blocks
    addresses = []
    for run in runs:
        base, page_bytes = (pool.scales.data_ptr(), scale_page_nbytes(pool)) if run.scales \
            else (pool.kv.data_ptr(), page_nbytes(pool))
        addresses.append((base + ((layer * 2 + run.kv) * num_blocks + run.block) * page_bytes,
                          run.num_pages * page_bytes))
    return addresses


_HOST_PAGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pool -> _host_pages(pool)


def _host_pages(pool: KVPool) -> tuple[np.ndarray, np.ndarray | None]:
    """The pool's memory as bytes, [layers, 2, blocks, page bytes], and its scales' alike
    (None: a float pool). A CPU pool; made once per pool, forgotten with it."""
    pages = _HOST_PAGES.get(pool)
    if pages is None:
        num_layers = pool.kv.shape[0]
        values = pool.kv.view(torch.uint8).numpy().reshape(num_layers, 2, pool.num_blocks, -1)
        scales = None if pool.scales is None else \
            pool.scales.view(torch.uint8).numpy().reshape(num_layers, 2, pool.num_blocks, -1)
        pages = _HOST_PAGES[pool] = (values, scales)
    return pages


def checksum_pages(pool: KVPool, layer: int, block_ids: Sequence[int],
                   runs: Sequence[PoolRun] | None = None) -> int:
    """`checksum` of the chunk `read_pages` would pack, hashed where the pages lie (a CPU
    pool), without packing them. `runs`: `pool_runs(pool, block_ids)`, if already known."""
    digest = xxhash.xxh3_64()
    values, scales = _host_pages(pool)
    for run in runs if runs is not None else pool_runs(pool, block_ids):
        pages = scales if run.scales else values
        digest.update(pages[layer, run.kv, run.block:run.block + run.num_pages])
    return digest.intdigest()
