"""The offline `LLM` API, as vLLM users write it."""

from __future__ import annotations

import pytest
import torch
from hf_oracle import hf_greedy
from transformers import AutoModelForCausalLM

from pdserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), num_kv_blocks=256, block_size=4, max_prefill_chunk=8)


def test_generate_returns_outputs_in_prompt_order_equal_to_transformers(llm, tiny_llama_dir):
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompts = ["The quick brown fox", "Hello", "def add(a, b):\n    return", "Numbers: 12345"]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    tokenizer = llm.get_tokenizer()
    assert [o.prompt for o in outputs] == prompts
    for prompt, output in zip(prompts, outputs):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        assert output.prompt_token_ids == ids
        assert output.token_ids == hf_greedy(hf, ids, 6)
        assert output.text == tokenizer.decode(output.token_ids)
        assert output.finish_reason == "length"
        assert len(output.logprobs) == 6


def test_token_id_prompts_and_per_prompt_params(llm):
    outputs = llm.generate([[5, 6, 7], [8, 9]], [
        SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)])
    assert [o.prompt for o in outputs] == [None, None]
    assert [o.prompt_token_ids for o in outputs] == [[5, 6, 7], [8, 9]]
    assert [len(o.token_ids) for o in outputs] == [2, 5]
    with pytest.raises(ValueError, match="one for all or one per prompt"):
        llm.generate([[5], [6]], [SamplingParams()])


def test_stop_string_cuts_the_text_and_finishes_with_stop(llm):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    [full] = llm.generate("The quick brown fox", params)
    assert len(full.text) > 4
    stop = full.text[2:4]
    [cut] = llm.generate("The quick brown fox", SamplingParams(max_tokens=12, temperature=0.0,
                                                               ignore_eos=True, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    assert llm.engine.scheduler.allocator.num_used == llm.engine.scheduler.prefix_cache.num_cached_blocks


def test_seeded_sampling_is_reproducible_across_batches(llm):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    alone = llm.generate("Hello world", params)[0].token_ids
    batched = llm.generate(["Other prompt", "Hello world", "More"],
                           [SamplingParams(max_tokens=8, temperature=1.0), params,
                            SamplingParams(max_tokens=3)])[1].token_ids
    assert alone == batched


def test_chat_uses_the_template(llm):
    [out] = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3, temperature=0))
    expected = llm.get_tokenizer().encode_chat([{"role": "user", "content": "hi"}])
    assert out.prompt_token_ids == expected
