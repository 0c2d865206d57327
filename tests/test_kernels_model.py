"""The model on the Triton kernel family against the same model on the PyTorch references.

Without CUDA the Triton kernels run in the interpreter (slow), so the tiny checkpoints
generate only a few tokens from two short prompts; the schedule still covers prefill
from an empty prefix, chunked prefill after a prefix mixed with a decode (extend kernel)
and pure decode steps (split decode kernel).
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import CacheConfig, ConfigError, DeviceConfig, SchedulerConfig
from pdserve.runtime.forward_batch import ForwardBatch, SeqChunk
from pdserve.runtime.loader import load_model
from pdserve.runtime.model_runner import Placement
from pdserve.runtime.sampling_params import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Same float32 model, kernels that sum in another order: see test_model_vs_hf.LOGIT_ATOL.
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_qwen2_dir"])
def runners(request):
    path = str(request.getfixturevalue(request.param))
    cache = CacheConfig(block_size=4, num_blocks=64)
    # Both float32 and without CUDA graphs: the comparison is about the kernels alone.
    reference = load_model(path, cache=cache, device_config=DeviceConfig(
        device=DEVICE, dtype=torch.float32, kernels="reference", cuda_graphs=False))
    triton = load_model(path, cache=cache, device_config=DeviceConfig(
        device=DEVICE, dtype=torch.float32, kernels="triton", cuda_graphs=False))
    assert reference.runner.model.kernels.name == "reference"
    assert triton.runner.model.kernels.name == "triton"
    return reference, triton


def _greedy(loaded, prompts, max_tokens):
    # Chunks of 4 within a budget of 8 tokens: prefill is chunked and mixed with decodes.
    engine = EngineCore(loaded.runner, loaded.info, SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=8, max_prefill_chunk=4), enable_prefix_caching=False)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished:
        for chunk in engine.step():
            outputs[chunk.request_id].extend(chunk.token_ids)
    return [outputs[str(i)] for i in range(len(prompts))]


def test_triton_kernels_give_the_reference_greedy_tokens(runners, monkeypatch):
    reference, triton = runners
    calls = {"decode": 0, "extend": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    attention = triton.runner.model.kernels.attention
    monkeypatch.setattr(attention, "_decode", counted("decode", attention._decode))
    monkeypatch.setattr(attention, "_extend", counted("extend", attention._extend))
    g = torch.Generator().manual_seed(99)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 11)]
    expected = _greedy(reference, prompts, 6)
    assert _greedy(triton, prompts, 6) == expected
    assert calls["decode"] > 0 and calls["extend"] > 0, calls


def test_triton_kernels_give_the_reference_logits(runners):
    reference, triton = runners
    a, b = [3, 14, 15, 92, 65, 35], [2, 71, 82, 81, 82, 84, 59, 4, 52]
    steps = [
        # a whole (empty prefix), the first 5 tokens of b
        [SeqChunk(a, 0, [5, 1, 9], True), SeqChunk(b[:5], 0, [8, 0, 7], False)],
        # a decodes while b's prompt finishes after its cached prefix
        [SeqChunk([7], 6, [5, 1, 9], True), SeqChunk(b[5:], 5, [8, 0, 7], True)],
        # both decode, beside a one-token prompt (context 1): all through the decode kernel
        [SeqChunk([9], 7, [5, 1, 9], True), SeqChunk([1], 9, [8, 0, 7], True),
         SeqChunk([42], 0, [3], True)],
    ]
    for chunks in steps:
        batch = ForwardBatch.build(chunks, 4, DEVICE)
        torch.testing.assert_close(triton.runner.execute(batch), reference.runner.execute(batch),
                                   atol=LOGIT_ATOL, rtol=0)


def test_device_config_resolves_to_the_cpu_defaults_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only resolution")
    placement = Placement.resolve(DeviceConfig())
    # The compiled batch attention builds on every CI machine (tests/test_kernels_cpu.py).
    assert placement == Placement(torch.device("cpu"), torch.float32, "cpu", False, False)
    assert Placement.resolve(DeviceConfig(compile=True)).compiled is True
    # Triton under the interpreter is never compiled around.
    assert Placement.resolve(DeviceConfig(kernels="triton", compile=True)).compiled is False
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Placement.resolve(DeviceConfig(device="cuda"))


def test_load_model_rejects_dtype_beside_a_device_config(tiny_llama_dir):
    with pytest.raises(ConfigError, match="inside device_config"):
        load_model(str(tiny_llama_dir), dtype=torch.float16, device_config=DeviceConfig())
