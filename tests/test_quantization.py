"""Weights held quantized (`DeviceConfig.quantization`): GGUF blocks only, or int8 blocks made
at load. Checked against the dense float32 model on tiny random checkpoints and on SmolLM2
(perplexity over tests/data/perplexity_text.txt), for memory held, and for rows whose
results never depend on their neighbours in a batch.

llama.cpp on the same GGUF file is the other oracle (bench extra, see
bench/quantization.py); these tests need only torch and the gguf package."""

from __future__ import annotations

import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from pdserve.engine.engine import EngineCore
from pdserve.kernels.block_linear import block_linear, dequantize_blocks_ref
from pdserve.kernels.cpu_extension import cpu_kernels_available
from pdserve.runtime.config import CacheConfig, ConfigError, DeviceConfig, SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.models import LlamaForCausalLM
from pdserve.runtime.perplexity import perplexity, prompt_logits
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.weights import load_checkpoint
from pdserve.runtime.weights.quantize import quantizable, quantize_blocks

TEXT = Path(__file__).parent / "data" / "perplexity_text.txt"
needs_cpu_kernels = pytest.mark.skipif(not cpu_kernels_available(),
                                       reason="block weights need the C++ CPU kernels (no compiler here)")


def _load(model: str, quantization: str, **cache):
    return load_model(model, cache=CacheConfig(**cache) if cache else None,
                      device_config=DeviceConfig(device="cpu", compile=False, quantization=quantization))


def _logits(loaded, prompt: list[int]) -> torch.Tensor:
    """Logits [P, V] of every prompt position, one forward over the whole prompt."""
    return prompt_logits(loaded.runner, prompt)


# ------------------------------------------------------------------ the int8 format


def test_int8_blocks_are_gguf_q8_0_within_half_a_step_of_the_weights():
    weight = torch.randn(48, 96) * torch.linspace(0.01, 3.0, 96)
    blocks = quantize_blocks(weight)
    assert blocks.shape == (48, 3, 34) and blocks.dtype == torch.uint8
    rebuilt = dequantize_blocks_ref(blocks, "q8_0")
    # The gguf package reads the bytes as the same weights.
    theirs = dequantize(blocks.reshape(48, -1).numpy(), GGMLQuantizationType.Q8_0)
    assert torch.equal(rebuilt, torch.from_numpy(np.asarray(theirs, dtype=np.float32)).reshape(48, 96))
    step = weight.reshape(48, 3, 32).abs().amax(-1, keepdim=True) / 127  # d of each block
    error = (rebuilt - weight).reshape(48, 3, 32).abs()
    # Half a step of rounding, plus d's own rounding to float16 (2^-11 relative) times q <= 127.
    assert (error <= step * (0.5 + 127 * 2**-11)).all()
    assert (error > step * 0.45).any()  # and it is a real int8 grid, not a finer one


def _q8_0_in_one_call(weight: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks from one call of the gguf quantizer over the whole weight (how
    `quantize_blocks` made them before it went a few rows at a time)."""
    from gguf.quants import quantize

    data = quantize(weight.float().contiguous().numpy(), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.ascontiguousarray(data)).view(weight.shape[0], weight.shape[1] // 32, -1)


def test_int8_blocks_made_a_few_rows_at_a_time_are_those_of_one_call():
    weight = torch.randn(2500, 1024) * torch.linspace(0.01, 3.0, 1024)  # 3 calls, the last partial
    weight[7, 64:96] = 0.0  # an all-zero block (d = 0)
    assert torch.equal(quantize_blocks(weight), _q8_0_in_one_call(weight))
    assert torch.equal(quantize_blocks(weight[:1]), _q8_0_in_one_call(weight[:1]))


def test_a_weight_that_does_not_split_into_blocks_is_refused():
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize_blocks(torch.randn(4, 48))


@needs_cpu_kernels
@pytest.mark.parametrize("kind", ["q8_0", "q4_1"])
@pytest.mark.parametrize("features", [128, 1600])  # 1600: 8 rows of x walk K in chunks, 1 row in one pass
def test_a_rows_product_is_the_same_whatever_else_is_in_the_batch(kind, features):
    weight = torch.randn(80, features)
    blocks = quantize_blocks(weight) if kind == "q8_0" else _q4_1(weight)
    x = torch.randn(64, features)
    together = block_linear(x, blocks, kind)
    for rows in (1, 3, 8, 25, 64):
        assert torch.equal(block_linear(x[:rows], blocks, kind), together[:rows]), rows
    assert torch.equal(block_linear(x[17:18], blocks, kind), together[17:18])


def _q4_1(weight: torch.Tensor) -> torch.Tensor:
    from gguf.quants import quantize

    data = quantize(weight.numpy(), GGMLQuantizationType.Q4_1)
    return torch.from_numpy(np.ascontiguousarray(data)).view(weight.shape[0], weight.shape[1] // 32, -1)


# ------------------------------------------------------------------ models


@needs_cpu_kernels
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"], ids=["untied-head", "tied-qwen2"])
def test_int8_weights_keep_the_dense_models_logits_and_no_dense_copy(fixture, request):
    path = str(request.getfixturevalue(fixture))
    dense, int8 = _load(path, "none"), _load(path, "int8")
    assert "every batch from GGUF blocks (q8_0)" in int8.runner.describe()
    model = int8.runner.model
    assert model.embed_tokens is None and all(
        m.weight is None for m in model.modules() if hasattr(m, "block_kind"))
    assert int8.runner.weight_bytes() < 0.3 * dense.runner.weight_bytes()
    prompt = list(range(5, 45))
    ours, theirs = _logits(int8, prompt), _logits(dense, prompt)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.95
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()


def _int8_model_the_dense_way(model: str) -> LlamaForCausalLM:
    """int8 as it was made before loading streamed: the whole model loaded in float32,
    then every weight quantized (in one quantizer call each), then the dense copies dropped."""
    checkpoint = load_checkpoint(model)
    dense = LlamaForCausalLM(checkpoint.config.with_dtype(torch.float32))
    dense.load_weights(checkpoint.iter_weights())
    dense.store_weights_input_major()
    assert dense.quantize_weights("q8_0", _q8_0_in_one_call, quantizable)
    dense.drop_dense_weights()
    return dense


def _assert_same_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Same blocks, byte for byte, and the same dense parameters, in every module."""
    theirs_modules = dict(theirs.named_modules())
    for name, module in ours.named_modules():
        other = theirs_modules[name]
        if hasattr(module, "block_kind"):
            assert (module.block_kind, module.weight) == (other.block_kind, other.weight) == ("q8_0", None), name
            assert torch.equal(module.block_data, other.block_data), name
    for attr in ("embed_blocks", "head_blocks"):
        assert getattr(ours, attr).kind == getattr(theirs, attr).kind == "q8_0", attr
        assert torch.equal(getattr(ours, attr).data, getattr(theirs, attr).data), attr
    assert (ours.head_blocks is ours.embed_blocks) == ours.config.tie_word_embeddings
    ours_params, theirs_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert ours_params.keys() == theirs_params.keys()
    assert all(torch.equal(ours_params[n], theirs_params[n]) for n in ours_params)


@needs_cpu_kernels
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"], ids=["untied-head", "tied-qwen2"])
def test_int8_quantized_while_loading_is_the_dense_models_quantization_exactly(fixture, request):
    path = str(request.getfixturevalue(fixture))
    _assert_same_weights(_load(path, "int8").runner.model, _int8_model_the_dense_way(path))


@pytest.mark.slow
@needs_cpu_kernels
def test_smollm2_int8_quantized_while_loading_is_the_dense_models_quantization_exactly():
    model = "smollm2-135m-instruct"
    _assert_same_weights(_load(model, "int8", num_blocks=16).runner.model, _int8_model_the_dense_way(model))


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"], ids=["untied-head", "tied-qwen2"])
def test_int8_loading_holds_one_float_matrix_at_a_time(fixture, request):
    """While the stream is read, the float copies of matrices alive (tensors handed out
    earlier and dense parameters of the model) are never more than the one being read."""
    checkpoint = load_checkpoint(str(request.getfixturevalue(fixture)))
    model = LlamaForCausalLM(checkpoint.config.with_dtype(torch.float32))
    handed_out: list[weakref.ref] = []
    most_alive = 0

    def watched():
        nonlocal most_alive
        for name, tensor in checkpoint.iter_weights():
            earlier = [ref() for ref in handed_out]
            dense = [p for p in model.parameters() if p.dim() == 2]
            most_alive = max(most_alive, sum(t is not None for t in earlier) + len(dense))
            del earlier
            if tensor.dim() == 2:
                handed_out.append(weakref.ref(tensor))
            yield name, tensor

    layers = model.load_weights_quantized(watched(), "q8_0", quantize_blocks, quantizable)
    assert layers == 4 * checkpoint.config.num_layers + 1  # qkv, o, gate_up, down; the head
    assert len(handed_out) == 7 * checkpoint.config.num_layers + 1 + (not checkpoint.config.tie_word_embeddings)
    assert most_alive == 0  # the one being read is only made after the check
    assert not [p for p in model.parameters() if p.dim() == 2]


def test_int8_loading_names_a_missing_or_misshapen_weight(tiny_llama_dir):
    checkpoint = load_checkpoint(str(tiny_llama_dir))

    def load(weights):
        model = LlamaForCausalLM(checkpoint.config.with_dtype(torch.float32))
        return model.load_weights_quantized(weights, "q8_0", quantize_blocks, quantizable)

    k_proj = "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(ValueError, match=r"lacks weights for: layers\.1\.self_attn\.qkv_proj\.weight"):
        load((n, t) for n, t in checkpoint.iter_weights() if n != k_proj)
    with pytest.raises(ValueError, match=f"{k_proj}' has shape \\(64, 64\\), expected \\(32, 64\\)"):
        load((n, torch.zeros(64, 64) if n == k_proj else t) for n, t in checkpoint.iter_weights())
    with pytest.raises(ValueError, match="lm_head.weight' comes twice"):
        load((n, t) for n, t in [*checkpoint.iter_weights(), *[(n, t) for n, t in checkpoint.iter_weights()
                                                              if n == "lm_head.weight"]])


def test_gguf_blocks_only_needs_a_checkpoint_that_has_them(tiny_llama_dir):
    with pytest.raises(ConfigError, match="no GGUF blocks"):
        _load(str(tiny_llama_dir), "gguf")


def test_an_unknown_quantization_is_refused():
    with pytest.raises(ConfigError, match="quantization must be one of"):
        DeviceConfig(quantization="fp4")


def test_quantized_weights_need_the_cpu_kernels(tiny_llama_dir, monkeypatch):
    from pdserve.runtime import model_runner

    monkeypatch.setattr(model_runner, "cpu_kernels_available", lambda: False)
    with pytest.raises(ConfigError, match="needs the CPU kernels"):
        _load(str(tiny_llama_dir), "int8")
    assert "blocks" not in _load(str(tiny_llama_dir), "auto").runner.describe()  # auto just goes without


@pytest.fixture(scope="module")
def smollm2_modes():
    """SmolLM2 held each way, loaded once for the module."""
    if not cpu_kernels_available():
        pytest.skip("block weights need the C++ CPU kernels (no compiler here)")
    return {mode: _load("smollm2-135m-instruct", mode, num_blocks=160) for mode in ("none", "gguf", "int8")}


def _perplexity(loaded, tokens: list[int]) -> float:
    return perplexity(loaded.runner, tokens)


@pytest.mark.slow
def test_smollm2_quantized_weights_hold_less_and_keep_perplexity(smollm2_modes):
    none, gguf, int8 = (smollm2_modes[m] for m in ("none", "gguf", "int8"))
    tokens = none.tokenizer.encode(TEXT.read_text(), add_special_tokens=False)[:2048]
    assert len(tokens) > 1500
    dense_ppl, gguf_ppl, int8_ppl = (_perplexity(m, tokens) for m in (none, gguf, int8))
    # gguf: the file's own weights, bit for bit, so only summation order differs.
    assert gguf_ppl == pytest.approx(dense_ppl, rel=1e-4)
    # int8 of the (Q4_1-dequantized) weights: within 1% of them.
    assert int8_ppl == pytest.approx(dense_ppl, rel=0.01)
    assert 3 < dense_ppl < 60, dense_ppl  # a real model reading real text
    assert gguf.runner.weight_bytes() < 0.2 * none.runner.weight_bytes()
    assert int8.runner.weight_bytes() < 0.3 * none.runner.weight_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["gguf", "int8"])
def test_smollm2_greedy_tokens_do_not_depend_on_the_batch(smollm2_modes, mode):
    loaded = smollm2_modes[mode]
    tokenizer = loaded.tokenizer
    questions = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
                 "What is 12 times 12?", "Explain what a lighthouse does in one sentence."]
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

    def run(batch: list[int]) -> dict[int, list[int]]:
        engine = EngineCore(loaded.runner, loaded.info, SchedulerConfig(max_num_batched_tokens=64,
                                                                        max_prefill_chunk=16),
                            enable_prefix_caching=False)
        for index in batch:
            engine.add_request(str(index), prompts[index], params)
        out: dict[int, list[int]] = {}
        while engine.has_unfinished:
            for delta in engine.step():
                out.setdefault(int(delta.request_id), []).extend(delta.token_ids)
        return out

    together = run(list(range(len(prompts))))
    for index in range(len(prompts)):
        assert run([index])[index] == together[index], questions[index]


@needs_cpu_kernels
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_a_cpu_worker_never_imports_triton(tiny_llama_dir, kv_cache_dtype):
    # Triton holds ~70 MiB of a process: a CPU worker (C++ kernels, int8 block weights,
    # float or int8 KV) loads and generates without importing it. A fresh interpreter: this
    # one has imported Triton for other tests.
    code = f"""
import sys
from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import CacheConfig, DeviceConfig, SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams
loaded = load_model(sys.argv[1], cache=CacheConfig(block_size=4, num_blocks=32, kv_cache_dtype={kv_cache_dtype!r}),
                    device_config=DeviceConfig(device="cpu", compile=False, quantization="int8"))
assert loaded.runner.model.kernels.name == "cpu", loaded.runner.model.kernels.name
engine = EngineCore(loaded.runner, loaded.info, SchedulerConfig())
engine.add_request("a", [5, 6, 7, 8, 9], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
tokens = [t for _ in range(8) for chunk in engine.step() for t in chunk.token_ids]
assert len(tokens) == 4, tokens
print("triton imported:", "triton" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code, tiny_llama_dir], check=False, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("triton imported: False"), result.stdout
