"""W4A16 / W8A16 / FP8-weight linear layers in Triton (`block_linear_triton`) against the
reference on the same blocks; on a machine without CUDA in Triton's interpreter on CPU
tensors (float32 and float16 activations: the interpreter computes bfloat16 wrongly).
Shapes are small (the interpreter runs each program in Python) and hit the edges: one row,
rows and outputs that are not multiples of the tiles, K of one block and K that leaves a
partial block step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from pdserve.kernels.block_linear import block_linear_ref, dequantize_blocks_ref
from pdserve.kernels.block_linear_triton import block_linear_triton
from pdserve.runtime.weights.quantize import quantize_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32: summation order over K <= 256 products of O(1) terms; float16: x and W rounded to
# float16 before the products (the reference multiplies in float32).
TOLERANCE = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 3e-2, "rtol": 1e-2}}
SHAPES = [(1, 70, 32), (5, 64, 96), (33, 20, 256)]  # (M, N, K)


def _blocks(kind: str, weight: torch.Tensor) -> torch.Tensor:
    if kind in ("q4_0", "q4_1"):  # as a GGUF file stores them (llama.cpp's quantizer, via gguf-py)
        data = quantize(weight.numpy(), GGMLQuantizationType.Q4_1 if kind == "q4_1" else GGMLQuantizationType.Q4_0)
        return torch.from_numpy(np.ascontiguousarray(data)).view(weight.shape[0], weight.shape[1] // 32, -1)
    return quantize_blocks(weight, kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0", "f8_0"])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_block_linear_triton_matches_the_reference(kind, dtype, m, n, k):
    generator = torch.Generator().manual_seed(m * 1000 + n + k)
    weight = torch.randn(n, k, generator=generator) * 0.2
    blocks = _blocks(kind, weight)
    x = torch.randn(m, k, generator=generator).to(dtype)
    got = block_linear_triton(x.to(DEVICE), blocks.to(DEVICE), kind).cpu()
    expected = block_linear_ref(x, blocks, kind)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


def test_f8_0_blocks_hold_the_weights_within_fp8_precision_and_zeros_exactly():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 64, generator=generator)
    weight[2, :32] = 0.0  # an all-zero block: d = 0, nothing divides by it
    weight[3, 5] = 1e4  # one large weight: its block's scale follows it, no NaN from rounding d
    rebuilt = dequantize_blocks_ref(quantize_blocks(weight, "f8_0"), "f8_0")
    assert torch.isfinite(rebuilt).all() and torch.equal(rebuilt[2, :32], torch.zeros(32))
    # e4m3 keeps 3 mantissa bits: half a step is 2^-4 relative for normal values; values
    # below the block's smallest normal are off by at most d * 2^-9 (half a subnormal step).
    d = weight.reshape(8, 2, 32).abs().amax(-1, keepdim=True) / 448
    bound = torch.maximum(weight.abs() * 2**-4, (d * 2**-9).expand(8, 2, 32).reshape(8, 64)) * 1.01
    assert ((rebuilt - weight).abs() <= bound + 1e-7).all()


def test_the_e4m3_decoding_in_the_kernel_is_exact_for_every_byte():
    """Every float8_e4m3fn value (NaN aside) as a weight, one per block position: the
    kernel's bit decoding against torch's own conversion."""
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)  # 254 finite codes
    codes = torch.cat((codes, codes[:2]))  # 256: 8 blocks of 32
    blocks = torch.zeros(1, 8, 34, dtype=torch.uint8)
    blocks[0, :, 0:2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)  # d = 1
    blocks[0, :, 2:] = codes.view(8, 32)
    x = torch.eye(256)[:17]  # rows of the identity: y[r, 0] = W[0, r]
    got = block_linear_triton(x.to(DEVICE), blocks.to(DEVICE), "f8_0").cpu()[:, 0]
    assert torch.equal(got, codes[:17].view(torch.float8_e4m3fn).float())


def test_bad_blocks_are_refused_with_the_reason():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="unknown block kind"):
        block_linear_triton(x, torch.zeros(4, 2, 34, dtype=torch.uint8), "q5_k")
    from pdserve.kernels.block_linear import block_linear

    with pytest.raises(ValueError, match="computed on CUDA only"):
        block_linear(x, torch.zeros(4, 2, 34, dtype=torch.uint8), "f8_0")  # a CPU tensor: the C++ path


@pytest.mark.parametrize(("quantization", "kind"), [("int8", "q8_0"), ("fp8", "f8_0")])
def test_a_model_loaded_for_cuda_computes_every_linear_layer_from_blocks(tiny_llama_dir, monkeypatch,
                                                                         quantization, kind):
    """The CUDA loading path (`load_gpu_weights`) on CPU tensors, with the Triton kernel
    standing in for the CUDA dispatch of `block_linear`: every linear layer and the LM head
    hold blocks only, the embedding stays dense, the logits equal the reference's over the
    same blocks, and stay close to the dense model's."""
    from pdserve.runtime import models
    from pdserve.runtime.attention_backend import select_kernels
    from pdserve.runtime.kv_pool import KVPool
    from pdserve.runtime.model_runner import ModelRunner, load_gpu_weights
    from pdserve.runtime.models.llama import Linear
    from pdserve.runtime.perplexity import prompt_logits
    from pdserve.runtime.weights import load_checkpoint

    checkpoint = load_checkpoint(str(tiny_llama_dir))
    config = checkpoint.config

    def runner(quantized: bool) -> ModelRunner:
        model = models.MODEL_CLASSES[config.architecture](config, select_kernels("reference", torch.device("cpu"),
                                                                                 torch.float32, False)).eval()
        if quantized:
            load_gpu_weights(model, quantization, checkpoint.iter_weights(), checkpoint.iter_weight_blocks(),
                             torch.device("cpu"))
        else:
            model.load_weights(checkpoint.iter_weights())
        pool = KVPool(config.num_layers, 16, 4, config.num_kv_heads, config.head_dim, torch.float32)
        return ModelRunner(model, pool)

    quantized, dense = runner(True), runner(False)
    linears = [m for m in quantized.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight is None and m.block_kind == kind for m in linears)
    assert quantized.model.embed_tokens is not None and quantized.model.head_blocks.kind == kind
    prompt = list(range(3, 40))
    monkeypatch.setattr(models.llama, "block_linear", block_linear_triton)
    got = prompt_logits(quantized, prompt)
    monkeypatch.setattr(models.llama, "block_linear", block_linear_ref)
    torch.testing.assert_close(got, prompt_logits(quantized, prompt), atol=1e-4, rtol=1e-4)
    reference = prompt_logits(dense, prompt)
    agree = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agree >= (0.9 if kind == "q8_0" else 0.75), agree  # 8-bit weights rarely flip the top token


def test_a_rows_result_does_not_depend_on_its_batch():
    generator = torch.Generator().manual_seed(11)
    blocks = quantize_blocks(torch.randn(40, 64, generator=generator), "q8_0").to(DEVICE)
    x = torch.randn(37, 64, generator=generator).to(DEVICE)
    batched = block_linear_triton(x, blocks, "q8_0")
    assert all(torch.equal(block_linear_triton(x[i:i + 1], blocks, "q8_0")[0], batched[i]) for i in (0, 17, 36))
