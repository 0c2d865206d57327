"""The checksum of a chunk whose bytes lie on a GPU, taken where they lie.

XXH3 (`layout.checksum`) hashes host bytes: a chunk sent from a CUDA pool would have to be
copied to the host for it. This checksum is computed with torch ops on the bytes' own
device; only its 8-byte sum reaches the host. The torch.distributed transport sends chunks
from a CUDA pool with it (DEVICE_CHUNK frames), and the listener verifies it on its
staging tensor before the pages are written.

Definition, over a byte string of n bytes zero-padded to whole little-endian 32-bit words
w_0 .. w_{m-1}, in 64-bit arithmetic that wraps:

    mix(x) = f(f(x * MUL1, 31) * MUL2, 29)   with  f(x, s) = x ^ (x >> s)  (logical shift)
    sum    = mix(w_0 | 0 << 32) + mix(w_1 | 1 << 32) + ... + mix(w_{m-1} | (m-1) << 32)
    result = mix(sum ^ n)

`mix` is a bijection (odd multipliers, xor-shifts), and w_i | i << 32 differs for every
(word, position) while i < 2**32 (16 GiB), so a change confined to one word (any flipped
bit, any corrupted byte run within a word) always changes the sum. Other changes (words
swapped, several words changed) change it except when two 64-bit sums collide by chance.
A sum of integers does not depend on the order it is taken in, so the result is the same
on every device and however the bytes are split into tensors. It detects corruption; it
authenticates nothing (the ticket's secret does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MASK64 = (1 << 64) - 1
_ROUNDS = ((0xBF58476D1CE4E5B9, 31), (0x94D049BB133111EB, 29))  # (MUL1, shift), (MUL2, shift)
CHECKSUM_STEP = 1 << 21  # words hashed at once: bounds each int64 temporary to 16 MiB


def device_checksum(segments: Sequence[torch.Tensor], step: int = CHECKSUM_STEP) -> int:
    """The checksum of the bytes of `segments` (contiguous tensors on one device) taken as
    one byte string, in the order given. `step`: words hashed per round of kernels."""
    parts = [segment.reshape(-1).view(torch.uint8) for segment in segments]
    nbytes = sum(part.numel() for part in parts)
    if not nbytes:
        return mix(0)
    if any(part.numel() % 4 or part.data_ptr() % 4 for part in parts[:-1]) or parts[-1].data_ptr() % 4:
        parts = [torch.cat(parts)]  # words would straddle two parts: hash one copy (on their device)
    total = torch.zeros((), dtype=torch.int64, device=parts[0].device)
    position = 0  # of the part's first word in the string
    for part in parts:
        whole = part.numel() // 4 * 4
        words = part[:whole].view(torch.int32)
        for start in range(0, words.numel(), step):
            total += _mixed_words(words[start:start + step], position + start).sum()
        position += words.numel()
        if whole < part.numel():  # the string's last bytes: only the last part can end mid-word
            tail = torch.zeros(4, dtype=torch.uint8, device=part.device)
            tail[:part.numel() - whole] = part[whole:]
            total += _mixed_words(tail.view(torch.int32), position).sum()
    return mix((total.item() & MASK64) ^ nbytes)


def mix(x: int) -> int:
    """`mix` of the definition on a Python int in [0, 2**64)."""
    for multiplier, shift in _ROUNDS:
        x = x * multiplier & MASK64
        x ^= x >> shift
    return x


def _mixed_words(words: torch.Tensor, first: int) -> torch.Tensor:
    """mix(w_i | i << 32) for int32 `words` at positions first, first + 1, ...: int64
    (signed, with the bits of the unsigned result)."""
    x = words.to(torch.int64).bitwise_and_(0xFFFFFFFF)
    positions = torch.arange(first, first + words.numel(), dtype=torch.int64, device=words.device)
    x.bitwise_or_(positions.bitwise_left_shift_(32))
    for multiplier, shift in _ROUNDS:
        x.mul_(_as_int64(multiplier))
        # int64 >> is arithmetic: mask the sign bits it copies to make it logical.
        x.bitwise_xor_(x.bitwise_right_shift(shift).bitwise_and_((1 << (64 - shift)) - 1))
    return x


def _as_int64(value: int) -> int:
    """The signed 64-bit number with the bits of `value` (torch scalars are signed)."""
    return value - (1 << 64) if value >> 63 else value
