"""The frames of a torch.distributed KV pair, and the tensors they travel in.

Frames on a pair, in order (every one a send on the pair's group, tag 0):

    listener -> sender  info    int64[3]: status (1 ok), max_chunk_bytes, idle ms
    sender -> listener  head    uint8[HEAD_BYTES]: header length, payload length, header; last byte: kind
    listener -> sender  reply   uint8[REPLY_BYTES]: "proceed", or refused     (a pair's first chunk)
    sender -> listener  payload bytes [0, n // 2), then [n // 2, n)        (chunks only: k pages, v pages)
    listener -> sender  reply   uint8[REPLY_BYTES]: base.encode_reply

A head's kind (`FrameKind`): MESSAGE (a message or a ping; a chunk's checksum is
`layout.checksum`), DEVICE_CHUNK (a chunk whose checksum is `device_checksum`), or CLOSE
(no header, no payload: the pair's last frame, acknowledged by an accepting reply). A head
of zeros past its header is a MESSAGE.

A pair has no staging tensor until its first chunk header passes the receiver's ticket
checks: that chunk goes in two steps (the interim "proceed" reply), later ones in one.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import NamedTuple

import torch

from pdserve.kv_transfer import layout
from pdserve.kv_transfer.messages import KVLayout
from pdserve.runtime.kv_pool import KVPool

HEAD_BYTES = 4096
REPLY_BYTES = 4096
LENGTHS = struct.Struct("<QQ")  # header length, payload length: the head's first bytes
MAX_HEADER = HEAD_BYTES - LENGTHS.size - 1  # the head's last byte is its kind


class FrameKind(enum.IntEnum):
    MESSAGE = 0
    DEVICE_CHUNK = 1
    CLOSE = 2


class Head(NamedTuple):
    """A received head, its lengths not yet checked against any limit."""

    kind: int  # a FrameKind, or anything a peer wrote
    header_len: int
    payload_len: int
    data: memoryview  # the whole head, on the host

    @property
    def header(self) -> bytes:
        """The header's bytes (call only once header_len is known to fit MAX_HEADER)."""
        return bytes(self.data[LENGTHS.size:LENGTHS.size + self.header_len])

    @property
    def is_close(self) -> bool:
        return self.kind == FrameKind.CLOSE and self.header_len == self.payload_len == 0


class PoolPayload(NamedTuple):
    """A chunk's payload taken from a pool: its k and v pages (equal halves), on the pool's
    device."""

    kind: FrameKind  # MESSAGE or DEVICE_CHUNK: which checksum its header carries
    halves: tuple[torch.Tensor, torch.Tensor]


def head_bytes(kind: FrameKind, header: bytes, payload_len: int) -> bytes:
    """A whole head (HEAD_BYTES) for a header of at most MAX_HEADER bytes."""
    body = LENGTHS.pack(len(header), payload_len) + header
    return body + bytes(HEAD_BYTES - 1 - len(body)) + bytes([kind])


def read_head(head: torch.Tensor) -> Head:
    """The head tensor just received, read on the host (HEAD_BYTES copied from a device)."""
    data = host_bytes(head)
    header_len, payload_len = LENGTHS.unpack_from(data)
    return Head(data[HEAD_BYTES - 1], header_len, payload_len, data)


def halves(nbytes: int) -> list[tuple[int, int]]:
    """The byte ranges a payload travels in, one send each: [0, n // 2), [n // 2, n) (a
    chunk's k pages, then its v pages), the empty ones left out."""
    return [(start, end) for start, end in ((0, nbytes // 2), (nbytes // 2, nbytes)) if end > start]


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """A byte view of a 1-D uint8 tensor, copied to the host only if it is not there."""
    return memoryview(tensor.cpu().numpy())


def fill(tensor: torch.Tensor, data: bytes) -> None:
    """Write `data` at the start of a uint8 tensor on any device (the rest is left as is)."""
    tensor[:len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def pool_chunk(pool: KVPool, layer: int, block_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk of `block_ids` at `layer` as its k pages and its v pages, each contiguous
    on the pool's device: views of the pool when the blocks are consecutive (nothing
    copied), else gathered there (the Triton pack on CUDA). Reads the pool on the current
    stream."""
    blocks = list(block_ids)
    if not blocks or min(blocks) < 0 or max(blocks) >= pool.num_blocks:
        raise ValueError(f"block ids {blocks[:8]} are not blocks of this pool's {pool.num_blocks}")
    first, count = blocks[0], len(blocks)
    if blocks == list(range(first, first + count)):
        return pool.kv[layer, 0, first:first + count], pool.kv[layer, 1, first:first + count]
    index = torch.tensor(blocks, dtype=torch.int64, device=pool.kv.device)
    if pool.kv.is_cuda:
        from pdserve.kernels.kv_pack import pack_kv  # Triton: loaded only where a CUDA pool sends

        packed = pack_kv(pool.kv[layer:layer + 1], index)[0]
    else:
        packed = pool.kv[layer].index_select(1, index)
    return packed[0], packed[1]


def chunk_pages(payload: torch.Tensor, kv_layout: KVLayout, num_pages: int) -> torch.Tensor:
    """A received chunk's bytes (uint8, admitted: its size fits) as its pages tensor
    (`layout.from_tensor`: what `layout.write_pages` takes)."""
    return layout.from_tensor(payload, kv_layout, num_pages)
