"""Penalties and logit_bias end to end on SmolLM2, against transformers: the decode engine's
greedy tokens under each control equal the argmax of transformers' own logits for the same
sequence, put through transformers' RepetitionPenaltyLogitsProcessor, OpenAI's frequency
and presence formula and the bias (`test_sampling_controls._reference`), at every step."""

from __future__ import annotations

import pytest
import torch
from engine_runs import run_to_completion
from hf_oracle import hf_logits
from test_sampling_controls import History, _reference

from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams

STEPS = 24
# Our float32 logits and transformers' differ by ~1e-4 (same weights, other kernels and
# summation orders); a reference whose best two tokens are closer than this is a tie either
# side may break.
NEAR_TIE = 2e-3


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return load_model("smollm2-135m-instruct")


@pytest.mark.parametrize("controls", [
    {"repetition_penalty": 1.3},
    {"frequency_penalty": 1.2},
    {"presence_penalty": 1.5, "frequency_penalty": -0.5},
    {"logit_bias": {}},  # filled in below: +8 on a token the model would not pick, -100 on its favourite
], ids=["repetition", "frequency", "presence", "logit_bias"])
def test_greedy_tokens_under_controls_equal_transformers(smollm2, smollm2_hf_model, controls):
    prompt = smollm2.tokenizer.encode_chat([{"role": "user", "content": "List the days of the week, twice."}])
    if "logit_bias" in controls:
        favourite = int(hf_logits(smollm2_hf_model, prompt)[-1].argmax())
        comma = smollm2.tokenizer.encode(",")[0]
        controls = {"logit_bias": {favourite: -100.0, comma: 8.0}}
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, **controls)
    engine = EngineCore(smollm2.runner, smollm2.info, SchedulerConfig(max_prefill_chunk=16))
    output = run_to_completion(engine, {"r": (prompt, params)})["r"]
    plain = run_to_completion(engine, {"p": (prompt, SamplingParams(max_tokens=STEPS, temperature=0.0,
                                                                      ignore_eos=True))})["p"]
    assert output != plain, "the control changes the output, so the comparison means something"
    logits = hf_logits(smollm2_hf_model, prompt + output)  # row P - 1 + i predicts output[i]
    for i, token in enumerate(output):
        reference = _reference(logits[len(prompt) - 1 + i], params, History(prompt, output[:i]))
        best, second = torch.topk(reference, 2).values.tolist()
        if token != int(reference.argmax()):
            assert best - second < NEAR_TIE, f"step {i}: engine chose {token}, transformers {int(reference.argmax())}"
            return  # past a tie the sequences are different sequences
