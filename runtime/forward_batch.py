"""`ForwardBatch`: everything one forward pass reads, built by the scheduler.

The model runner only reads it; it never allocates. Each sequence contributes a chunk of
new tokens (a whole prompt, part of one, or the single last sampled token) starting at
`start_pos`, and its block table must already cover positions [0, start_pos + len(chunk)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


class SeqChunk(NamedTuple):
    """One sequence's share of a step."""

    token_ids: Sequence[int]  # new tokens to compute this step
    start_pos: int  # tokens of this sequence already in the KV cache
    block_table: Sequence[int]
    returns_logits: bool  # whether any of this sequence's logits are returned
    # With `returns_logits`: the logits after each of the last `num_logits` new tokens, in
    # order. 1 to sample the next token; more to verify speculative draft tokens or to read
    # prompt logprobs. Why a row is wanted is the caller's business.
    num_logits: int = 1


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64 flat cache slots
    block_tables: torch.Tensor  # [B, max_pages] int64, padded with 0 (never read)
    sample_indices: torch.Tensor  # [S] int64 rows of T whose logits are returned, sequence by sequence
    query_lens: tuple[int, ...]  # host copies; sum == T
    seq_lens: tuple[int, ...]  # context length of each sequence after this step

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @classmethod
    def build(cls, chunks: Sequence[SeqChunk], block_size: int, device: torch.device | str) -> ForwardBatch:
        if not chunks:
            raise ValueError("a forward batch needs at least one sequence")
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_indices: list[int] = []
        query_lens, seq_lens = [], []
        for i, chunk in enumerate(chunks):
            n = len(chunk.token_ids)
            end = chunk.start_pos + n
            if n == 0:
                raise ValueError(f"sequence {i} has no new tokens")
            if len(chunk.block_table) * block_size < end:
                raise ValueError(
                    f"sequence {i}: block table of {len(chunk.block_table)} blocks cannot "
                    f"hold {end} tokens (block size {block_size})"
                )
            input_ids.extend(chunk.token_ids)
            for pos in range(chunk.start_pos, end):
                positions.append(pos)
                slots.append(chunk.block_table[pos // block_size] * block_size + pos % block_size)
            if chunk.returns_logits:
                if not 1 <= chunk.num_logits <= n:
                    raise ValueError(f"sequence {i}: num_logits {chunk.num_logits} outside [1, {n}]")
                sample_indices.extend(range(len(input_ids) - chunk.num_logits, len(input_ids)))
            query_lens.append(n)
            seq_lens.append(end)
        max_pages = max(-(-s // block_size) for s in seq_lens)
        tables = [list(c.block_table[:max_pages]) + [0] * (max_pages - min(len(c.block_table), max_pages))
                  for c in chunks]

        def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(
            input_ids=tensor(input_ids),
            positions=tensor(positions),
            slot_mapping=tensor(slots),
            block_tables=tensor(tables),
            sample_indices=tensor(sample_indices),
            query_lens=tuple(query_lens),
            seq_lens=tuple(seq_lens),
        )
