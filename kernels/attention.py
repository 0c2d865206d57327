"""Attention over a paged KV cache: PyTorch reference.

One call serves a mixed batch. Sequence i contributes `query_lens[i]` new query tokens
(1 for a decoding sequence, a chunk for a prefilling one) whose keys and values are
already stored in the cache. Its context is positions [0, seq_lens[i]) and its queries
sit at the last `query_lens[i]` of them:

    positions   0 ........................ seq_lens[i]-1
    cached      |----- prefix -----|------ new ------|
    queries                        |------ new ------|   causal within `new`

Page p of sequence i holds positions [p * block_size, (p + 1) * block_size) in block
`block_tables[i, p]`. Entries of a block table past the context are never read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pdserve.kernels.kv_quant import dequantize_kv_ref


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int,
                   scales: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return `cache` rows for positions [0, context_len) as [context_len, kv_heads, head_dim];
    with `scales` (a quantized cache's), dequantized to `dtype`."""
    block_size = cache.shape[1]
    num_pages = -(-context_len // block_size)
    pages = cache.index_select(0, block_table[:num_pages])
    rows = pages.reshape(-1, *cache.shape[2:])[:context_len]
    if scales is None:
        return rows
    row_scales = scales.index_select(0, block_table[:num_pages]).reshape(-1, scales.shape[2])[:context_len]
    return dequantize_kv_ref(rows, row_scales, dtype)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries against their paged context.

    q: [num_tokens, num_heads, head_dim], the queries of all sequences packed in order.
    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]; num_heads must be a
        multiple of kv_heads (grouped-query attention).
    k_scale, v_scale: [num_blocks, block_size, kv_heads] float16 for a quantized (int8 or
        fp8) cache, whose rows are dequantized to q's dtype as they are read; else None.
    block_tables: [batch, max_pages] block ids; query_lens, seq_lens: host ints per sequence.
    Returns [num_tokens, num_heads, head_dim]. Reads the cache only.
    """
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape
    assert q.shape[1] % k_cache.shape[2] == 0, "num_heads must be a multiple of kv_heads"
    assert len(query_lens) == len(seq_lens) == block_tables.shape[0]
    out = torch.empty_like(q)
    start = 0
    for i, (n_new, context_len) in enumerate(zip(query_lens, seq_lens)):
        assert 0 < n_new <= context_len, f"sequence {i}: {n_new} queries for context {context_len}"
        k = gather_context(k_cache, block_tables[i], context_len, k_scale, q.dtype)
        v = gather_context(v_cache, block_tables[i], context_len, v_scale, q.dtype)
        out[start:start + n_new] = attend_context(q[start:start + n_new], k, v, scale)
        start += n_new
    assert start == q.shape[0], "query_lens must add up to the number of query tokens"
    return out


def attend_context(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [n, H, D] at the last n of the L positions of k, v: [L, KVH, D]."""
    n, heads, head_dim = q.shape
    context_len, kv_heads = k.shape[0], k.shape[1]
    group = heads // kv_heads
    if n == 1:
        # Decode: the queries of one kv-head group share its keys; two small bmms beat
        # SDPA's generic path, which would copy k and v once per query head.
        qg = q.view(kv_heads, group, head_dim)
        scores = torch.bmm(qg, k.permute(1, 2, 0)).mul_(scale).float().softmax(-1)
        out = torch.bmm(scores.to(v.dtype), v.transpose(0, 1))
        return out.reshape(1, heads, head_dim)
    # Query j sits at position context_len - n + j and sees keys up to and including it.
    mask = torch.ones(n, context_len, dtype=torch.bool, device=q.device).tril(context_len - n)
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)
