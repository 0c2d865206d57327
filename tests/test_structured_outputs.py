"""Structured outputs in the engines: grammars (JSON schema, JSON object, regex, choice, Lark
and GBNF) checked and compiled once, their masks applied by the sampler and by speculative
verification, the matcher advanced by every accepted token, rebuilt on the decode worker
from the prefill worker's first token and on a resumed request from its carried output.

Outputs are checked for what they promise (parse, validate with `jsonschema`, match the
regex), and speculation and disaggregation against the plain colocated engine's tokens."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from engine_runs import run_to_completion
from test_disaggregated import Pair

from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import SchedulerConfig, SpeculativeConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampler import Sampler
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.scheduler import RequestRejected
from pdserve.runtime.stopping import FinishReason
from pdserve.runtime.structured_output import (
    GrammarCompiler,
    StructuredOutput,
    bitmask_to_allowed,
    new_bitmask,
)

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colors"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "colors": {"type": "array", "maxItems": 3,
                                    "items": {"enum": ["red", "green", "blue"]}}}}
SCHEMAS = [
    PERSON,
    {"type": "object", "required": ["city", "location"], "additionalProperties": False,
     "properties": {"city": {"type": "string", "maxLength": 30},
                    "location": {"type": "object", "required": ["lat", "lon"], "additionalProperties": False,
                                 "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                "lon": {"type": "number", "minimum": -180, "maximum": 180}}}}},
    {"type": "object", "required": ["answer", "confidence"], "additionalProperties": False,
     "properties": {"answer": {"type": "boolean"}, "confidence": {"enum": ["low", "medium", "high"]}}},
    {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "integer", "minimum": 1, "maximum": 9}},
]


def _chat(loaded, text: str) -> list[int]:
    return loaded.tokenizer.encode_chat([{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def grammars(smollm2):
    return GrammarCompiler(smollm2.tokenizer, smollm2.runner.config.vocab_size, smollm2.info.eos_token_ids)


def _engine(loaded, grammars, speculative=None) -> EngineCore:
    return EngineCore(loaded.runner, loaded.info, SchedulerConfig(max_prefill_chunk=64), speculative=speculative,
                      grammars=grammars)


def _text(loaded, tokens: list[int]) -> str:
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True)


# ---------------------------------------------------------------- the spec and its checks

@pytest.mark.parametrize(("structured", "named"), [
    (StructuredOutput.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (StructuredOutput.json_schema({"not": {"type": "string"}}), "not"),
    (StructuredOutput.json_schema({"type": "strin"}), "strin"),
    (StructuredOutput.regex("(unclosed"), "regex"),
    (StructuredOutput.grammar("start: missing_rule"), "missing_rule"),
])
def test_unsupported_or_broken_grammars_are_refused_naming_the_problem(structured, named):
    with pytest.raises(ValueError, match="not supported") as caught:
        structured.check()
    assert named in str(caught.value)


def test_non_strict_schemas_ignore_unsupported_keywords():
    StructuredOutput.json_schema({"type": "array", "uniqueItems": True}, strict=False).check()


@pytest.mark.parametrize("bad", [
    lambda: StructuredOutput.json_schema("{not json"),
    lambda: StructuredOutput.json_schema([1, 2]),
    lambda: StructuredOutput.choice([]),
    lambda: StructuredOutput.choice(["a", ""]),
    lambda: StructuredOutput("xml"),
])
def test_malformed_specs_are_value_errors(bad):
    with pytest.raises(ValueError):
        bad()


def test_grammars_compile_once_and_matchers_are_independent(grammars, smollm2):
    choice = StructuredOutput.choice(["yes", "no"])
    before = grammars.num_cached
    first, second = grammars.matcher(choice), grammars.matcher(StructuredOutput.choice(["yes", "no"]))
    assert grammars.num_cached == before + 1
    yes = smollm2.tokenizer.encode("yes")
    assert first.accept_all(yes) and first.is_terminated
    assert not second.is_terminated and second.validate_prefix(yes) == len(yes)


def test_gbnf_and_lark_grammars_are_both_accepted(grammars, smollm2):
    for text in ('root ::= "ab" [0-9]+', 'start: "ab" /[0-9]+/'):
        matcher = grammars.matcher(StructuredOutput.grammar(text))
        assert matcher.accept_all(smollm2.tokenizer.encode("ab12"))
        assert matcher.validate_prefix(smollm2.tokenizer.encode("x")) == 0


# ---------------------------------------------------------------- the sampler

def test_the_mask_comes_after_every_control(grammars, smollm2):
    """The grammar forbids the raw argmax and a token logit_bias pushes by +100: greedy and
    sampled rows alike only ever pick allowed tokens."""
    vocab = smollm2.runner.config.vocab_size
    structured = StructuredOutput.choice(["yes", "no"])
    forbidden = smollm2.tokenizer.encode(" maybe")[0]
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    logits[:, forbidden] = 50.0
    sampler = Sampler(smollm2.info.eos_token_ids)
    mask = new_bitmask(1, vocab)
    grammars.matcher(structured).fill_mask(mask, 0)
    allowed = set(bitmask_to_allowed(mask, vocab)[0].nonzero().flatten().tolist())
    assert forbidden not in allowed and allowed
    for seed in range(20):
        params = [SamplingParams(temperature=0.0, logit_bias={forbidden: 100.0}, structured_output=structured),
                  SamplingParams(temperature=1.5, seed=seed, logit_bias={forbidden: 100.0},
                                 structured_output=structured)]
        matchers = [grammars.matcher(structured) for _ in params]
        out = sampler(logits, params, [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)],
                      grammars=matchers)
        assert set(out.token_ids.tolist()) <= allowed
    # Greedy picks the best allowed token; logprobs stay the raw distribution's.
    best = max(allowed, key=lambda t: logits[0, t].item())
    assert out.token_ids[0].item() == best
    assert out.logprobs[0].item() == pytest.approx(torch.log_softmax(logits[0], -1)[best].item(), abs=1e-5)


# ---------------------------------------------------------------- the engine on SmolLM2

@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_outputs_validate(smollm2, grammars, schema):
    engine = _engine(smollm2, grammars)
    prompt = _chat(smollm2, f"Reply with JSON matching this schema: {json.dumps(schema)}")
    requests = {f"{mode}": (prompt, SamplingParams(max_tokens=160, seed=7, temperature=t,
                                                   structured_output=StructuredOutput.json_schema(schema)))
                for mode, t in (("greedy", 0.0), ("sampled", 1.0))}
    outputs = run_to_completion(engine, requests)
    for tokens in outputs.values():
        jsonschema.validate(json.loads(_text(smollm2, tokens)), schema)
    assert engine.scheduler.allocator.num_used - engine.scheduler.prefix_cache.num_cached_blocks == 0


@pytest.mark.parametrize(("structured", "matches"), [
    (StructuredOutput.json_object(), lambda text: isinstance(json.loads(text), dict)),
    (StructuredOutput.regex(r"[0-9]{3}-[0-9]{4}"), lambda text: re.fullmatch(r"[0-9]{3}-[0-9]{4}", text)),
    (StructuredOutput.choice(["Paris", "London", "Rome"]), lambda text: text in ("Paris", "London", "Rome")),
    (StructuredOutput.grammar('root ::= "The answer is " ("yes" | "no") "."'),
     lambda text: text in ("The answer is yes.", "The answer is no.")),
])
def test_each_kind_of_grammar_holds_and_ends_the_request(smollm2, grammars, structured, matches):
    engine = _engine(smollm2, grammars)
    prompt = _chat(smollm2, "What is the capital of France? Answer briefly.")
    engine.add_request("r", prompt, SamplingParams(max_tokens=80, temperature=0.0, structured_output=structured))
    tokens, reasons = [], []
    while engine.has_unfinished:
        for delta in engine.step():
            tokens.extend(delta.token_ids)
            reasons.append(delta.finish_reason)
    assert matches(_text(smollm2, tokens))
    assert reasons[-1] is FinishReason.STOP


@pytest.mark.parametrize("speculative", [SpeculativeConfig(num_tokens=4, ngram_min=1),
                                         SpeculativeConfig(method="draft", num_tokens=3, draft_layers=8)],
                         ids=["ngram", "self-draft"])
def test_speculation_with_a_grammar_gives_the_plain_greedy_output(smollm2, grammars, speculative):
    record = {"name": "Ada Lovelace", "age": 36, "colors": ["green", "blue"]}
    prompt = _chat(smollm2, f"Repeat this JSON exactly: {json.dumps(record)}")
    params = SamplingParams(max_tokens=80, temperature=0.0, structured_output=StructuredOutput.json_schema(PERSON))
    plain = run_to_completion(_engine(smollm2, grammars), {"r": (prompt, params)})["r"]
    engine = _engine(smollm2, grammars, speculative)
    got = run_to_completion(engine, {"r": (prompt, params)})["r"]
    assert got == plain
    jsonschema.validate(json.loads(_text(smollm2, got)), PERSON)
    assert engine.speculator.proposed > 0


def test_drafts_are_cut_at_the_first_token_the_grammar_forbids(smollm2, grammars):
    """An n-gram proposer copies the prompt's unquoted text; the grammar wants a digit
    string, so every draft is cut and the output still matches."""
    prompt = _chat(smollm2, "alpha beta gamma alpha beta gamma alpha beta gamma. Give a number.")
    structured = StructuredOutput.regex(r"[0-9]{1,12}")
    params = SamplingParams(max_tokens=20, temperature=0.0, structured_output=structured)
    engine = _engine(smollm2, grammars, SpeculativeConfig(num_tokens=4, ngram_min=1))
    got = run_to_completion(engine, {"r": (prompt, params)})["r"]
    plain = run_to_completion(_engine(smollm2, grammars), {"r": (prompt, params)})["r"]
    assert got == plain and re.fullmatch(r"[0-9]{1,12}", _text(smollm2, got))


def test_a_resumed_request_continues_its_grammar_from_the_carried_output(smollm2, grammars):
    prompt = _chat(smollm2, "Describe a person as JSON.")
    params = SamplingParams(max_tokens=120, temperature=0.0, structured_output=StructuredOutput.json_schema(PERSON))
    whole = run_to_completion(_engine(smollm2, grammars), {"r": (prompt, params)})["r"]
    carried = whole[:9]
    engine = _engine(smollm2, grammars)
    engine.add_request("m1", prompt + carried, params, resume_at=len(carried))
    tokens = []
    while engine.has_unfinished:
        for delta in engine.step():
            tokens.extend(delta.token_ids)
    assert carried + tokens == whole


def test_requests_the_engine_cannot_constrain_are_rejected(smollm2, grammars):
    params = SamplingParams(structured_output=StructuredOutput.json_schema({"type": "array", "uniqueItems": True}))
    with pytest.raises(RequestRejected, match="uniqueItems"):
        _engine(smollm2, grammars).add_request("r", [1, 2, 3], params)
    with pytest.raises(RequestRejected, match="no grammar compiler"):
        _engine(smollm2, None).add_request("r", [1, 2, 3], SamplingParams(
            structured_output=StructuredOutput.json_object()))
    engine = _engine(smollm2, grammars)
    carried = smollm2.tokenizer.encode("not json")
    with pytest.raises(RequestRejected, match="breaks its grammar"):
        engine.add_request("m", [1, 2, 3, *carried], SamplingParams(structured_output=StructuredOutput.json_object()),
                           resume_at=len(carried))
    assert engine.scheduler.allocator.num_used == 0


# ---------------------------------------------------------------- prefill -> decode

def test_disaggregated_output_equals_colocated_with_the_first_token_from_prefill(tiny_llama_dir):
    pair = Pair(tiny_llama_dir, grammars=True)
    try:
        loaded = pair.d_model
        compiler = GrammarCompiler(loaded.tokenizer, loaded.runner.config.vocab_size, loaded.info.eos_token_ids)
        colocated = EngineCore(loaded.runner, loaded.info, enable_prefix_caching=False, grammars=compiler)
        for i, structured in enumerate([StructuredOutput.regex(r"(ab|cd)[0-9]{2,5}"),
                                        StructuredOutput.json_schema(SCHEMAS[2])]):
            params = SamplingParams(max_tokens=40, temperature=0.0, structured_output=structured)
            prompt = [5, 6, 7, 8, 9, 10, 11]
            tokens, reason, _ = pair.run(f"r{i}", prompt, params)
            assert tokens == run_to_completion(colocated, {f"c{i}": (prompt, params)})[f"c{i}"]
            assert reason is FinishReason.STOP
    finally:
        pair.close()
