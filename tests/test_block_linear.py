"""Linear layers computed from GGUF blocks against dense float32.

The blocks' weights must be bit-identical to what the GGUF reader dequantizes (the model
then uses the same numbers whichever path a batch takes); the C++ product must match the
dense product up to float32 summation order (a few ulps of the outputs' magnitude); and the SmolLM2 model computing small batches from blocks must give
the dense model's greedy tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from pdserve.kernels.block_linear import (
    BLOCK_BYTES,
    block_linear,
    block_linear_ref,
    dequantize_blocks_ref,
)
from pdserve.kernels.cpu_extension import cpu_kernels_available
from pdserve.runtime.weights.checkpoint import load_checkpoint


def _random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (rows, cols // 32, BLOCK_BYTES[kind]), dtype=torch.uint8, generator=generator)
    # Sane float16 scales (random bytes could make inf/NaN): d in [0.001, 0.03], m in [-0.2, 0].
    d = (torch.rand(rows, cols // 32, generator=generator) * 0.03 + 0.001).half()
    data[..., 0:2] = d.view(torch.uint8).view(rows, cols // 32, 2)
    if kind == "q4_1":
        m = (-torch.rand(rows, cols // 32, generator=generator) * 0.2).half()
        data[..., 2:4] = m.view(torch.uint8).view(rows, cols // 32, 2)
    return data


def test_kernel_builds_on_this_machine():
    assert cpu_kernels_available()


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 17])
@pytest.mark.parametrize("features", [576, 1600])  # 1600: K walked in uneven chunks (17, 17, 16 blocks)
def test_block_linear_matches_dense(kind, rows, features):
    blocks = _random_blocks(kind, 200, features)
    x = torch.randn(rows, features)
    # Outputs reach ~50-80 (576-1600 products of up to ~4): float32 sums in another order
    # differ by a few ulps of that, ~1e-5 to 1e-4.
    torch.testing.assert_close(block_linear(x, blocks, kind), block_linear_ref(x, blocks, kind),
                               atol=2e-4, rtol=1e-5)


def test_compiled_graphs_run_it_as_one_custom_op():
    # Eager calls go straight to the extension; under torch.compile the same kernel runs
    # as the custom op pdserve::block_linear, with the same result.
    blocks = _random_blocks("q4_1", 64, 128)
    x = torch.randn(5, 128)
    compiled = torch.compile(lambda x: block_linear(x, blocks, "q4_1") * 2.0, fullgraph=True)
    torch.testing.assert_close(compiled(x), block_linear(x, blocks, "q4_1") * 2.0, atol=0, rtol=0)


def test_block_linear_rejects_mismatched_shapes():
    blocks = _random_blocks("q4_1", 8, 64)
    with pytest.raises(RuntimeError, match="features"):
        block_linear(torch.randn(2, 96), blocks, "q4_1")
    with pytest.raises(RuntimeError, match="bytes"):
        block_linear(torch.randn(2, 64), blocks, "q8_0")


def test_smollm2_blocks_are_the_dense_weights_bit_for_bit():
    checkpoint = load_checkpoint("smollm2-135m-instruct")
    path = checkpoint.source
    reader = GGUFReader(path)
    blocks = {name: (kind, data) for name, kind, data in checkpoint.iter_weight_blocks()}
    assert len(blocks) == 30 * 7 + 1  # every projection of every layer, and the tied head
    dense = dict(checkpoint.iter_weights())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.5.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight"):
        kind, data = blocks[name]
        assert torch.equal(dequantize_blocks_ref(data, kind), dense[name]), name
    # The reference dequantizer agrees with the GGUF package's on an unpermuted tensor too.
    tensor = next(t for t in reader.tensors if t.name == "blk.3.ffn_up.weight")
    expected = dequantize(tensor.data, tensor.tensor_type).reshape(1536, 576).astype(np.float32)
    assert torch.equal(dequantize_blocks_ref(blocks["model.layers.3.mlp.up_proj.weight"][1], "q4_1"),
                       torch.from_numpy(expected))


@pytest.mark.parametrize("qtype,kind", [(GGMLQuantizationType.Q4_0, "q4_0"), (GGMLQuantizationType.Q4_1, "q4_1"),
                                        (GGMLQuantizationType.Q8_0, "q8_0")])
def test_the_reference_dequantizes_as_the_gguf_package_does(qtype, kind):
    # Blocks from llama.cpp's quantizer (via gguf-py), every nibble and sign exercised.
    weight = (torch.randn(40, 256, generator=torch.Generator().manual_seed(3)) * 0.3).numpy()
    data = quantize(weight, qtype)
    blocks = torch.from_numpy(np.ascontiguousarray(data)).view(40, 8, BLOCK_BYTES[kind])
    expected = torch.from_numpy(dequantize(data, qtype).reshape(40, 256).astype(np.float32))
    assert torch.equal(dequantize_blocks_ref(blocks, kind), expected)


@pytest.mark.slow
def test_smollm2_greedy_tokens_are_the_same_with_blocks_on_and_off():
    from engine_runs import greedy_chat_answers

    from pdserve.runtime.config import DeviceConfig
    from pdserve.runtime.loader import load_model

    def greedy(weight_blocks: bool) -> dict[str, list[int]]:
        loaded = load_model("smollm2-135m-instruct", device_config=DeviceConfig(
            device="cpu", compile=False, quantization="auto" if weight_blocks else "none"))
        uses_blocks = "GGUF blocks" in loaded.runner.describe()
        assert uses_blocks == weight_blocks
        return greedy_chat_answers(loaded)

    assert greedy(True) == greedy(False)


def test_dense_and_block_products_agree_on_a_real_layer():
    checkpoint = load_checkpoint("smollm2-135m-instruct")
    name = "model.layers.7.mlp.gate_proj.weight"
    kind, data = next((k, d) for n, k, d in checkpoint.iter_weight_blocks() if n == name)
    weight = next(t for n, t in checkpoint.iter_weights() if n == name)
    x = torch.randn(8, weight.shape[1])
    torch.testing.assert_close(block_linear(x, data, kind), F.linear(x, weight), atol=2e-5, rtol=1e-5)
