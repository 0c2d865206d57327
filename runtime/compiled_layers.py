"""Decoder layers under torch.compile on the CPU, compiled once at start-up.

Every layer of a model runs the same code on same-shaped weights, so each layer is
compiled in place (`nn.Module.compile`) and all of them share one set of compiled graphs:
the weights are graph inputs, not constants. A layer's attention (`Attention.attend`)
is excluded: it writes the KV pool in place and has its own kernels, so each layer runs
as two compiled graphs - norm, QKV projection and RoPE before it; output projection,
residual, norm and MLP after it - with inductor's fused C++ loops around the matmuls.

Shapes: the token count is dynamic. Dynamo specialises a count of 1 and compiles one
symbolic graph for the other counts on each side of every branch the layer takes on the
count (linear layers with GGUF blocks use them up to BLOCK_LINEAR_MAX_ROWS rows), and the
first layer (no residual yet) has its own graphs, so the buckets are

    tokens == 1       2 <= tokens <= BLOCK_LINEAR_MAX_ROWS       tokens > BLOCK_LINEAR_MAX_ROWS
    (one decode)      (decode batches)                           (larger batches, prefill chunks)

`compile_layers` compiles both buckets before the runner serves anything, with a log line
per bucket, so no request ever waits for a compile. Inductor caches its output on disk
(its cache directory, /tmp/torchinductor_$USER by default), so later start-ups of the
same model on the same machine mostly load it.
"""

from __future__ import annotations

import logging
import time

import torch

from pdserve.runtime.forward_batch import ForwardBatch, SeqChunk
from pdserve.runtime.models.llama import BLOCK_LINEAR_MAX_ROWS

log = logging.getLogger(__name__)

# Token counts run at start-up: one in each bucket, at its lower edge.
WARMUP_TOKEN_COUNTS = (1, 2, BLOCK_LINEAR_MAX_ROWS + 1)


def compile_layers(runner) -> None:
    """Compile `runner.model`'s decoder layers in place and run every bucket once.

    Writes nothing to the pool (the warm-up batches use padding slots) and reads only its
    first block. Safe to call once, before the runner serves."""
    started = time.perf_counter()
    for layer in runner.model.layers:
        layer.before_attention = torch.compile(layer.before_attention, dynamic=True)
        layer.after_attention = torch.compile(layer.after_attention, dynamic=True)
    for count in WARMUP_TOKEN_COUNTS:
        bucket_started = time.perf_counter()
        runner.execute(_warmup_batch(count, runner.pool.block_size))
        log.info("compiled forward: %d token(s) ready in %.1fs", count, time.perf_counter() - bucket_started)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    log.info("compiled the decoder layers (torch.compile, inductor): %d graphs in %.1fs", graphs,
             time.perf_counter() - started)


def _warmup_batch(num_tokens: int, block_size: int) -> ForwardBatch:
    """One sequence of `num_tokens` new tokens whose slots are all padding (-1): the
    forward computes everything and stores no K/V. Its context lies in block 0."""
    pages = -(-num_tokens // block_size)
    batch = ForwardBatch.build([SeqChunk([0] * num_tokens, 0, [0] * pages, True)], block_size, "cpu")
    return ForwardBatch(batch.input_ids, batch.positions, torch.full_like(batch.slot_mapping, -1),
                        batch.block_tables, batch.sample_indices, batch.query_lens, batch.seq_lens)
