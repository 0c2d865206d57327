"""The decoder layers as one C++ call (`LlamaForCausalLM.fuse_layers`) against the Python
layers on the same "cpu" kernels.

Both run the same kernels in the same order, so the logits and every K/V written to the
pool must be identical bit for bit: on tiny Llama (untied head, GQA) and Qwen2 (q/k/v
biases, tied head) checkpoints and on SmolLM2 computing from its GGUF blocks, for
prefill chunks, decodes and mixed batches, small (block path) and large (dense path),
and layer by layer when the caller wants each layer's K/V as soon as it is stored. The
fused path is the CPU default: it must build here, never skip.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.runtime.config import CacheConfig, DeviceConfig
from pdserve.runtime.forward_batch import ForwardBatch, SeqChunk
from pdserve.runtime.loader import load_model


def _loaded(model: str):
    loaded = load_model(model, cache=CacheConfig(block_size=16, num_blocks=64),
                        device_config=DeviceConfig(device="cpu", kernels="cpu", compile=False))
    assert loaded.runner.model.fused_layers is not None, "the CPU kernels fuse the layers by default"
    return loaded


def _batches(vocab: int, block_size: int) -> list[ForwardBatch]:
    """Three forwards over one pool: two prompts (one crossing page edges), then a mixed
    step (decodes of both, a third prompt, a continued chunk), then 30 decode rows (the
    dense path beyond the block rows) reusing the same contexts."""
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=generator).tolist()

    tables = [[0, 1, 2], [3, 4], [5, 6], [7, 8, 9]]
    first = [SeqChunk(tokens(37), 0, tables[0], True), SeqChunk(tokens(5), 0, tables[1], True),
             SeqChunk(tokens(16), 0, tables[3], False)]
    mixed = [SeqChunk(tokens(1), 37, tables[0], True), SeqChunk(tokens(1), 5, tables[1], True),
             SeqChunk(tokens(20), 0, tables[2], True), SeqChunk(tokens(9), 16, tables[3], True, num_logits=3)]
    # 30 one-token rows at distinct positions of sequence 0's first page (its context
    # reread, its slots rewritten): a decode batch too large for the block path.
    wide = [SeqChunk(tokens(1), p, tables[0], True) for p in range(30)]
    return [ForwardBatch.build(chunks, block_size, "cpu") for chunks in (first, mixed, wide)]


def _run(runner, batches, fused: bool, per_layer: bool = False):
    """(logits of each batch, the pool after them) from a zeroed pool."""
    model = runner.model
    kept = model.fused_layers
    if not fused:
        model.fused_layers = None
    runner.pool.kv.zero_()
    layers_done: list[int] = []
    callback = layers_done.append if per_layer else None
    try:
        logits = [runner.execute(batch, callback) for batch in batches]
    finally:
        model.fused_layers = kept
    if per_layer:
        assert layers_done == list(range(len(model.layers))) * len(batches)
    return logits, runner.pool.kv.clone()


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_fused_layers_are_bit_identical_on_tiny_models(fixture, request):
    runner = _loaded(str(request.getfixturevalue(fixture))).runner
    batches = _batches(runner.config.vocab_size, runner.pool.block_size)
    logits, pool = _run(runner, batches, fused=True)
    expected_logits, expected_pool = _run(runner, batches, fused=False)
    for got, expected in zip(logits, expected_logits, strict=True):
        assert torch.equal(got, expected)
    assert torch.equal(pool, expected_pool)
    assert pool.abs().sum() > 0  # the K/V were written at all


def test_fused_layers_layer_by_layer_give_the_same_result(tiny_llama_dir):
    runner = _loaded(str(tiny_llama_dir)).runner
    batches = _batches(runner.config.vocab_size, runner.pool.block_size)
    logits, pool = _run(runner, batches, fused=True, per_layer=True)
    expected_logits, expected_pool = _run(runner, batches, fused=False)
    assert all(torch.equal(a, b) for a, b in zip(logits, expected_logits, strict=True))
    assert torch.equal(pool, expected_pool)


def test_fused_layers_on_smollm2_blocks_are_bit_identical():
    runner = _loaded("smollm2-135m-instruct").runner
    assert "GGUF blocks" in runner.describe()
    batches = _batches(runner.config.vocab_size, runner.pool.block_size)
    logits, pool = _run(runner, batches, fused=True)
    expected_logits, expected_pool = _run(runner, batches, fused=False)
    assert all(torch.equal(a, b) for a, b in zip(logits, expected_logits, strict=True))
    assert torch.equal(pool, expected_pool)


def test_fused_layers_refuse_bad_calls(tiny_llama_dir):
    runner = _loaded(str(tiny_llama_dir)).runner
    layers = runner.model.fused_layers
    assert len(layers) == 3
    x = torch.zeros(1, runner.config.hidden_size)
    empty = torch.zeros(0, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="out of 3"):
        layers.forward(x, None, 0, 4, runner.pool.kv, empty, empty, empty, empty, empty, empty)
    with pytest.raises(RuntimeError, match="residual stream is needed"):
        layers.forward(x, None, 1, 2, runner.pool.kv, empty, empty, empty, empty, empty, empty)
    reference = load_model(str(tiny_llama_dir), device_config=DeviceConfig(device="cpu", kernels="reference"))
    assert reference.runner.model.fused_layers is None
    with pytest.raises(ValueError, match="eager 'cpu' kernel family"):
        reference.runner.model.fuse_layers()


def test_layer_skip_draft_runs_the_first_fused_layers(tiny_llama_dir):
    # A self-draft shares the target's fused layers and runs only its first ones over a
    # pool of that many layers.
    from pdserve.engine.draft_model import LayerSkipModel
    from pdserve.runtime.kv_pool import KVPool
    from pdserve.runtime.model_runner import ModelRunner

    target = _loaded(str(tiny_llama_dir)).runner
    draft = LayerSkipModel(target.model, 2)
    assert draft.fused_layers is target.model.fused_layers
    pool = KVPool.for_model(draft.config, CacheConfig(block_size=16, num_blocks=64), "cpu")
    runner = ModelRunner(draft, pool, None, target.placement)
    batches = _batches(target.config.vocab_size, 16)
    logits, kv = _run(runner, batches, fused=True)
    expected_logits, expected_kv = _run(runner, batches, fused=False)
    assert all(torch.equal(a, b) for a, b in zip(logits, expected_logits, strict=True))
    assert torch.equal(kv, expected_kv) and kv.shape[0] == 2
