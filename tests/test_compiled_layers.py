"""Compiled decoder layers (torch.compile on the CPU) against the eager forward.

Every bucket edge of `compile_layers` (1 token; 2; the last count computed from GGUF
blocks; the first count past it; a prefill-sized chunk) must give the eager logits, on a
mixed batch that really reads the KV cache written by earlier steps. Inductor fuses the
norms, RoPE and activations into C++ loops that may round differently from the eager ops,
so logits agree to float32 tolerance, and greedy tokens are identical: 1e-4 on the tiny
model; on SmolLM2's 30 layers the reordered reductions add up to ~1.3e-4 on logits of ~30
(5e-6 relative), hence 5e-4 there. No count may compile again after start-up.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.runtime.compiled_layers import WARMUP_TOKEN_COUNTS
from pdserve.runtime.config import CacheConfig, DeviceConfig
from pdserve.runtime.forward_batch import ForwardBatch, SeqChunk
from pdserve.runtime.loader import load_model
from pdserve.runtime.models.llama import BLOCK_LINEAR_MAX_ROWS

EDGES = (1, 2, BLOCK_LINEAR_MAX_ROWS, BLOCK_LINEAR_MAX_ROWS + 1, 100)
LOGIT_ATOL = 1e-4


def _batches(num_tokens: int, block_size: int, vocab: int) -> list[ForwardBatch]:
    """A prefix step filling blocks 0-3, then a step of `num_tokens` tokens: one decode
    per sequence for small counts, else one prefill chunk after the prefix plus a decode."""
    generator = torch.Generator().manual_seed(num_tokens)
    prefix = torch.randint(0, vocab, (40,), generator=generator).tolist()
    first = ForwardBatch.build([SeqChunk(prefix, 0, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], True)], block_size, "cpu")
    if num_tokens <= 8:
        # num_tokens sequences, each decoding one token after its own share of the prefix.
        # Sequence i writes position 8 + i of the shared table and reads what is before it.
        chunks = [SeqChunk([prefix[i]], 8 + i, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], True) for i in range(num_tokens)]
    else:
        new = torch.randint(0, vocab, (num_tokens - 1,), generator=generator).tolist()
        chunks = [SeqChunk(new, 40, list(range(10, 10 + 35)), True),  # room for 139 positions
                  SeqChunk([prefix[-1]], 39, list(range(10)), True)]
    return [first, ForwardBatch.build(chunks, block_size, "cpu")]


def _logits(runner, batches) -> torch.Tensor:
    runner.pool.kv.zero_()
    out = None
    for batch in batches:
        out = runner.execute(batch)
    return out


@pytest.fixture(scope="module")
def compiled_runner(tiny_qwen2_dir):
    loaded = load_model(str(tiny_qwen2_dir), cache=CacheConfig(block_size=4, num_blocks=64),
                        device_config=DeviceConfig(device="cpu", compile=True))
    assert loaded.runner.placement.compiled
    return loaded.runner


def test_warmup_covers_every_bucket():
    assert WARMUP_TOKEN_COUNTS == (1, 2, BLOCK_LINEAR_MAX_ROWS + 1)


@pytest.mark.parametrize("num_tokens", EDGES)
def test_compiled_matches_eager_at_bucket_edges(compiled_runner, num_tokens):
    runner = compiled_runner
    batches = _batches(num_tokens, runner.pool.block_size, runner.config.vocab_size)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = _logits(runner, batches)
    # Start-up compiled every bucket: serving never compiles.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_before
    with torch.compiler.set_stance("force_eager"):
        eager = _logits(runner, batches)
    torch.testing.assert_close(compiled, eager, atol=LOGIT_ATOL, rtol=0)
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


@pytest.mark.slow
def test_smollm2_compiled_with_blocks_matches_eager_at_bucket_edges():
    loaded = load_model("smollm2-135m-instruct", cache=CacheConfig(block_size=16, num_blocks=64),
                        device_config=DeviceConfig(device="cpu", compile=True))
    runner = loaded.runner
    assert runner.placement.compiled and "GGUF blocks" in runner.describe()
    for num_tokens in EDGES:
        batches = _batches(num_tokens, runner.pool.block_size, runner.config.vocab_size)
        compiled = _logits(runner, batches)
        with torch.compiler.set_stance("force_eager"):
            eager = _logits(runner, batches)
        torch.testing.assert_close(compiled, eager, atol=5 * LOGIT_ATOL, rtol=0, msg=f"{num_tokens} tokens")
        assert torch.equal(compiled.argmax(-1), eager.argmax(-1)), num_tokens


@pytest.mark.slow
def test_smollm2_layers_share_their_compiled_graphs():
    # Every layer runs the same graphs (weights and blocks are graph inputs): a layer that
    # compiled its own would exhaust dynamo's recompile limit and fall back to eager.
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    load_model("smollm2-135m-instruct", cache=CacheConfig(block_size=16, num_blocks=64),
                        device_config=DeviceConfig(device="cpu", compile=True))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    # before/after attention x three buckets, plus the first layer's no-residual variants
    assert graphs <= 12, graphs
