"""Perplexity of a model on a text: one shared definition for tests and benchmarks.

`prompt_logits` runs a token sequence through a `ModelRunner` as one prefill (every
position's logits, no sampling, no scheduler); `perplexity_from_logits` scores any
engine's logits the same way (llama.cpp's included), so two engines are compared on one
formula: exp of the mean negative log-probability of token i + 1 given tokens 0..i, in
float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pdserve.runtime.forward_batch import ForwardBatch, SeqChunk


@torch.inference_mode()
def prompt_logits(runner, tokens: Sequence[int]) -> torch.Tensor:
    """Float32 logits [len(tokens), vocab] of every position of `tokens`, one forward
    from an empty cache. Writes the KV of blocks 0..len(tokens) / block_size of the
    runner's pool (call it on a runner no scheduler is using)."""
    pool = runner.pool
    blocks = list(range(-(-len(tokens) // pool.block_size)))
    if len(blocks) > pool.num_blocks:
        raise ValueError(f"{len(tokens)} tokens need {len(blocks)} KV blocks; the pool has {pool.num_blocks}")
    batch = ForwardBatch.build([SeqChunk(list(tokens), 0, blocks, True, len(tokens))], pool.block_size,
                               runner.device)
    return runner.model.compute_logits(runner.model(batch, pool)).float()


def perplexity_from_logits(logits, tokens: Sequence[int]) -> float:
    """Perplexity of `tokens[1:]` under `logits` [>= len(tokens) - 1, vocab] (a tensor or
    a numpy array; row i predicts token i + 1)."""
    logits = torch.as_tensor(logits)[: len(tokens) - 1].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs[torch.arange(len(tokens) - 1), torch.tensor(list(tokens[1:]))]
    return math.exp(-picked.mean().item())


def perplexity(runner, tokens: Sequence[int]) -> float:
    """Perplexity of `tokens` under the runner's model, from one prefill of all of them."""
    return perplexity_from_logits(prompt_logits(runner, tokens), tokens)
