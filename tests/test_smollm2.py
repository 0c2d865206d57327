"""The embedded default model end to end: SmolLM2-135M-Instruct from its GGUF file."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hf_oracle import explain_divergence, hf_greedy

from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return load_model("smollm2-135m-instruct")


def _greedy(loaded, prompts: list[list[int]], max_tokens: int, ignore_eos: bool) -> list[list[int]]:
    return _greedy_run(loaded, prompts, max_tokens, ignore_eos)[0]


def _greedy_run(loaded, prompts: list[list[int]], max_tokens: int, ignore_eos: bool,
                speculative=None) -> tuple[list[list[int]], EngineCore]:
    engine = EngineCore(loaded.runner, loaded.info, SchedulerConfig(max_prefill_chunk=16),
                        enable_prefix_caching=False, speculative=speculative)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs = [[] for _ in prompts]
    while engine.has_unfinished:
        for chunk in engine.step():
            outputs[int(chunk.request_id)].extend(chunk.token_ids)
    assert engine.scheduler.allocator.num_used == 0
    return outputs, engine


def test_greedy_32_tokens_match_transformers(smollm2, smollm2_hf_model):
    prompts = [smollm2.tokenizer.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    ours = _greedy(smollm2, prompts, 32, ignore_eos=True)  # run together, chunked prefill
    for prompt, got in zip(prompts, ours):
        expected = hf_greedy(smollm2_hf_model, prompt, 32)
        assert got == expected, explain_divergence(smollm2_hf_model, prompt, got, expected)


def test_default_model_knows_the_capital_of_france(smollm2):
    prompt = smollm2.tokenizer.encode_chat([{"role": "user", "content": CHATS[0]}])
    [answer] = _greedy(smollm2, [prompt], 48, ignore_eos=False)
    text = smollm2.tokenizer.decode(answer)
    assert "Paris" in text, text
    assert answer[-1] in smollm2.info.eos_token_ids  # a complete answer, not cut off


def test_cli_streams_only_the_answer_to_stdout():
    result = subprocess.run(
        [sys.executable, "-m", "pdserve", "generate", "--chat", "--max-tokens", "40",
         "--prompt", "What is the capital of France?"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "pdserve:" not in result.stdout  # progress and timing go to stderr
    assert "loading smollm2-135m-instruct" in result.stderr
    assert "finish reason: stop" in result.stderr


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_output_is_identical_with_each_proposer(smollm2, k):
    from pdserve.runtime.config import SpeculativeConfig

    passage = ("The keeper climbed the one hundred and twelve steps every evening, trimmed the wick, "
               "polished the lens and wrote three lines in a leather book.")
    prompts = [smollm2.tokenizer.encode_chat([{"role": "user", "content": c}]) for c in (
        f"Repeat this passage exactly, replacing 'keeper' with 'warden': {passage}", CHATS[1])]

    def run(speculative):
        outputs, engine = _greedy_run(smollm2, prompts, 40, ignore_eos=False, speculative=speculative)
        return outputs, engine.speculator

    baseline, _ = run(None)
    got, speculator = run(SpeculativeConfig(num_tokens=k, ngram_min=1))
    assert got == baseline
    assert speculator.accepted > 10, "the repeat task is where prompt lookup is accepted"
    # Self-draft: the first 8 of SmolLM2's 30 layers, its norm and head, with their own KV.
    got, speculator = run(SpeculativeConfig(method="draft", num_tokens=k, draft_layers=8))
    assert got == baseline
    assert speculator.proposed > 0
    if k == 3:  # a draft model equal to the target: every proposal is accepted
        got, speculator = run(SpeculativeConfig(method="draft", num_tokens=k, draft_model="smollm2-135m-instruct"))
        assert got == baseline
        assert speculator.proposed > 0 and speculator.accepted == speculator.proposed
