"""Logits controls: presence/frequency/repetition penalties, logit_bias and min_tokens.

Against references (transformers' RepetitionPenaltyLogitsProcessor, the OpenAI penalty
formula written out by hand) on the same logits, then end to end through the decode
engine, the prefill worker's first token, a resumed request and speculative decoding.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import NamedTuple

import pytest
import torch
from engine_runs import run_to_completion
from test_disaggregated import Pair
from transformers import RepetitionPenaltyLogitsProcessor

from pdserve.engine.engine import EngineCore
from pdserve.engine.proposers import Draft
from pdserve.engine.speculation import Speculator
from pdserve.engine.verification import verify
from pdserve.kv_transfer.messages import PrefillJob
from pdserve.runtime.config import CacheConfig, SpeculativeConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.request import Request
from pdserve.runtime.sampler import Sampler, apply_logits_controls, make_generator
from pdserve.runtime.sampling_params import MAX_LOGIT_BIAS, SAMPLING_FIELDS, SamplingParams
from pdserve.runtime.scheduler import RequestRejected
from pdserve.runtime.stopping import FinishReason

VOCAB = 64
EOS = frozenset({2})
PROMPT = [5, 17, 42, 99, 100, 7, 8]  # the tiny model's greedy continuation repeats itself


class History(NamedTuple):
    prompt_ids: list[int]
    output_ids: list[int]
    output_offset: int = 0


def _reference(logits: torch.Tensor, params: SamplingParams, history: History) -> torch.Tensor:
    """One row through transformers' repetition penalty, then OpenAI's frequency/presence
    penalties by hand, then the bias, then the min_tokens mask."""
    row = logits.clone().unsqueeze(0)
    all_ids = torch.tensor([history.prompt_ids + history.output_ids])
    row = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(all_ids, row)[0]
    carried = history.prompt_ids[len(history.prompt_ids) - history.output_offset:]
    for token, count in Counter(carried + history.output_ids).items():
        row[token] -= params.frequency_penalty * count + params.presence_penalty
    for token, bias in params.logit_bias:
        row[token] += bias
    if history.output_offset + len(history.output_ids) < params.min_tokens:
        for token in set(params.stop_token_ids) | (set() if params.ignore_eos else EOS):
            row[token] = float("-inf")
    return row


def _batch() -> tuple[torch.Tensor, list[SamplingParams], list[History]]:
    """Rows with each control alone, all together, and none, mixed in one batch. Each
    row's raw argmax token is among its history, so the controls move the argmax."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(9, VOCAB, generator=generator) * 3
    top = logits.argmax(dim=1).tolist()

    def ids(n: int, row: int) -> list[int]:
        return torch.randint(0, VOCAB, (n,), generator=generator).tolist() + [top[row]] * 2

    greedy = {"temperature": 0.0}
    rows = [
        (SamplingParams(**greedy), History(ids(9, 0), ids(4, 0))),
        (SamplingParams(repetition_penalty=1.7, **greedy), History(ids(12, 1), [])),  # the prompt counts
        (SamplingParams(repetition_penalty=0.6, **greedy), History(ids(12, 2), ids(6, 2))),  # < 1 rewards
        (SamplingParams(frequency_penalty=1.3, presence_penalty=-0.4, **greedy), History(ids(5, 3), ids(30, 3))),
        (SamplingParams(), History(ids(3, 4), ids(2, 4))),  # a sampled row without controls
        (SamplingParams(logit_bias={7: 5.0, top[5]: -100, 0: 2.5}, **greedy), History(ids(4, 5), [])),
        (SamplingParams(min_tokens=3, stop_token_ids=[top[6]], **greedy), History(ids(4, 6), [])),
        (SamplingParams(repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=0.5,
                        logit_bias={3: 1.5}, min_tokens=40, **greedy), History(ids(8, 7), ids(20, 7))),
        # A migrated request: its last 5 prompt tokens are output carried from elsewhere.
        (SamplingParams(frequency_penalty=2.0, repetition_penalty=1.2, min_tokens=8, **greedy),
         History(ids(10, 8), ids(2, 8), output_offset=5)),
    ]
    return logits, [p for p, _ in rows], [h for _, h in rows]


def test_controls_match_the_references_and_leave_other_rows_bit_identical():
    logits, params, histories = _batch()
    original = logits.clone()
    out = apply_logits_controls(logits, params, histories, EOS)
    assert torch.equal(logits, original), "the input logits must not be modified"
    for i, (p, history) in enumerate(zip(params, histories)):
        if p.has_logits_controls:
            # The same float32 operations in another order: differences are rounding only.
            torch.testing.assert_close(out[i], _reference(logits[i], p, history), rtol=1e-6, atol=1e-5)
            assert not torch.equal(out[i], logits[i]), f"row {i}: the controls changed nothing"
        else:
            assert torch.equal(out[i], logits[i])


def test_greedy_rows_take_the_argmax_after_the_controls():
    logits, params, histories = _batch()
    out = Sampler(EOS)(logits, params, [None] * len(params), histories)
    expected = [int(_reference(logits[i], p, h).argmax()) if p.has_logits_controls else int(logits[i].argmax())
                for i, (p, h) in enumerate(zip(params, histories))]
    greedy_rows = [i for i, p in enumerate(params) if p.is_greedy]
    assert [out.token_ids[i].item() for i in greedy_rows] == [expected[i] for i in greedy_rows]
    # The controls moved the argmax, so this is not the raw greedy choice in disguise.
    moved = {i for i in greedy_rows if expected[i] != int(logits[i].argmax())}
    assert moved >= {1, 3, 5, 6, 8}
    # Logprobs stay those of the raw distribution.
    raw = torch.log_softmax(logits, dim=-1).gather(1, out.token_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.logprobs, raw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_controls_on_cuda_equal_the_cpu_result():
    logits, params, histories = _batch()
    on_cpu = apply_logits_controls(logits, params, histories, EOS)
    on_cuda = apply_logits_controls(logits.cuda(), params, histories, EOS)
    torch.testing.assert_close(on_cuda.cpu(), on_cpu)
    greedy = Sampler(EOS)(logits.cuda(), params, [None] * len(params), histories).token_ids.cpu()
    assert greedy.tolist() == [int(row.argmax()) if p.is_greedy else greedy[i].item()
                               for i, (row, p) in enumerate(zip(on_cpu, params))]


def test_sampled_rows_draw_from_the_controlled_distribution():
    logits = torch.zeros(2, VOCAB)
    logits[:, 2] = 10.0  # EOS dominates the raw distribution
    params = [SamplingParams(min_tokens=2, seed=1), SamplingParams(logit_bias={9: 100}, seed=2)]
    histories = [History([4], []), History([4], [])]
    sampler = Sampler(EOS)
    for draw in range(50):
        generators = [make_generator(100 + draw, "cpu"), make_generator(200 + draw, "cpu")]
        tokens = sampler(logits, params, generators, histories).token_ids.tolist()
        assert tokens[0] != 2 and tokens[1] == 9


def test_a_batch_without_controls_costs_nothing():
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_k=5)]
    assert apply_logits_controls(logits, params, None, EOS) is logits


def test_history_is_required_only_where_it_is_read():
    logits = torch.randn(1, VOCAB)
    assert Sampler()(logits, [SamplingParams(logit_bias={1: 100}, temperature=0)], [None]).token_ids.item() == 1
    with pytest.raises(ValueError, match="histories"):
        Sampler()(logits, [SamplingParams(frequency_penalty=1.0)], [None])


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("presence_penalty", "1"), ("frequency_penalty", -2.01),
    ("frequency_penalty", float("nan")), ("repetition_penalty", 0.0), ("repetition_penalty", float("inf")),
    ("repetition_penalty", -1.0), ("min_tokens", -1), ("min_tokens", 1.5), ("min_tokens", True),
    ("logit_bias", {-1: 1.0}), ("logit_bias", {"5": 1.0}), ("logit_bias", {5: 100.5}),
    ("logit_bias", {5: float("nan")}), ("logit_bias", [(5, 1.0), (5, 2.0)]), ("logit_bias", [5]),
    ("logit_bias", "5:1"), ("logit_bias", {i: 0.0 for i in range(MAX_LOGIT_BIAS + 1)}),
])
def test_validation_errors_name_the_field_first(field, value):
    with pytest.raises(ValueError) as caught:
        SamplingParams(**{field: value})
    assert str(caught.value).split(" ")[0] == field


def test_the_new_fields_have_their_defaults_and_logit_bias_is_normalised():
    assert {"presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
            "min_tokens"} <= set(SAMPLING_FIELDS)
    default = SamplingParams()
    assert (default.presence_penalty, default.frequency_penalty, default.repetition_penalty,
            default.logit_bias, default.min_tokens) == (0.0, 0.0, 1.0, (), 0)
    assert not default.has_logits_controls
    assert SamplingParams(logit_bias={9: 1, 3: -2.5}).logit_bias == ((3, -2.5), (9, 1.0))
    assert SamplingParams(logit_bias=[(9, 1), (3, -2.5)]) == SamplingParams(logit_bias={3: -2.5, 9: 1.0})
    assert len(SamplingParams(logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS)}).logit_bias) == MAX_LOGIT_BIAS


# ------------------------------------------------------------------ through the engines


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), cache=CacheConfig(block_size=4, num_blocks=256))


def _run(engine: EngineCore, prompt: list[int], params: SamplingParams, resume_at: int | None = None,
         request_id: str = "r") -> tuple[list[int], FinishReason | None]:
    engine.add_request(request_id, prompt, params, resume_at)
    tokens, reason = [], None
    while engine.has_unfinished:
        for delta in engine.step():
            tokens.extend(delta.token_ids)
            reason = delta.finish_reason or reason
    return tokens, reason


def _engine(loaded, speculative: SpeculativeConfig | None = None) -> EngineCore:
    return EngineCore(loaded.runner, loaded.info, enable_prefix_caching=False, speculative=speculative)


def test_a_large_frequency_penalty_stops_greedy_repetition(loaded):
    greedy = {"temperature": 0.0, "ignore_eos": True, "max_tokens": 40}
    plain, _ = _run(_engine(loaded), PROMPT, SamplingParams(**greedy))
    assert len(set(plain)) < len(plain), "precondition: the model repeats itself without a penalty"
    penalised, _ = _run(_engine(loaded), PROMPT, SamplingParams(frequency_penalty=2.0, **greedy))
    assert len(set(penalised)) == len(penalised) == 40


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 5}])
def test_logit_bias_forces_a_token(loaded, sampling):
    tokens, reason = _run(_engine(loaded), PROMPT, SamplingParams(max_tokens=6, logit_bias={77: 100}, **sampling))
    assert tokens == [77] * 6 and reason == FinishReason.LENGTH


def test_min_tokens_delays_an_eos_forced_by_logit_bias(loaded):
    forced_eos = {"temperature": 0.0, "max_tokens": 20, "logit_bias": {2: 100}}
    tokens, reason = _run(_engine(loaded), PROMPT, SamplingParams(**forced_eos))
    assert tokens == [2] and reason == FinishReason.STOP
    tokens, reason = _run(_engine(loaded), PROMPT, SamplingParams(min_tokens=5, **forced_eos))
    # Five tokens, then the forced EOS: min_tokens counts the tokens before the stop token.
    assert len(tokens) == 6 and tokens[-1] == 2 and reason == FinishReason.STOP
    assert not {0, 2} & set(tokens[:-1]), "both EOS ids are masked before min_tokens"


def test_min_tokens_also_holds_back_stop_token_ids(loaded):
    params = SamplingParams(temperature=0.0, max_tokens=20, logit_bias={50: 100}, stop_token_ids=[50],
                            min_tokens=3, ignore_eos=True)
    tokens, reason = _run(_engine(loaded), PROMPT, params)
    assert tokens[-1] == 50 and len(tokens) == 4 and reason == FinishReason.STOP


def test_a_logit_bias_outside_the_vocabulary_is_rejected(loaded):
    engine = _engine(loaded)
    with pytest.raises(RequestRejected, match=r"^logit_bias names token 320 .* 320 tokens"):
        engine.add_request("r", PROMPT, SamplingParams(logit_bias={320: 1.0}))
    assert not engine.has_unfinished


@pytest.mark.parametrize("cut", [1, 6, 13])
def test_a_resumed_request_with_penalties_continues_exactly(loaded, cut):
    def params(max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, frequency_penalty=1.5,
                              presence_penalty=0.5, repetition_penalty=1.2, min_tokens=18, logit_bias={2: 8.0})

    whole, _ = _run(_engine(loaded), PROMPT, params(24))
    assert len(whole) == 19 and whole[-1] == 2, "the biased EOS ends it right after min_tokens"
    rest, _ = _run(_engine(loaded), PROMPT + whole[:cut], params(24 - cut), resume_at=cut)
    assert whole[:cut] + rest == whole


CONTROLS = {"frequency_penalty": 1.2, "presence_penalty": 0.8, "repetition_penalty": 1.5,
            "logit_bias": {0: 100, 2: 100, 302: -100, 7: 4.0}, "min_tokens": 4}


def _run_disaggregated(pair: Pair, prompt: list[int], params: SamplingParams,
                       resume_at: int | None = None) -> list[int]:
    ticket = pair.decode.add_remote_request("remote", prompt, params, resume_at)
    assert ticket is not None
    pair.prefill.add_job(PrefillJob(ticket, "loopback", prompt, params, resume_at))
    tokens = []
    for _ in range(500):
        if pair.prefill.has_unfinished:
            pair.prefill.step()
        for delta in pair.decode.step():
            tokens.extend(delta.token_ids)
        if not pair.decode.has_unfinished and not pair.prefill.has_unfinished:
            return tokens
        time.sleep(0.001)  # let the pusher thread run
    raise AssertionError("transfer did not settle")


@pytest.fixture
def pair(tiny_llama_dir):
    pair = Pair(tiny_llama_dir)
    yield pair
    pair.close()


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.8, "seed": 9}])
def test_the_prefill_workers_first_token_sees_the_controls(loaded, pair, sampling):
    params = SamplingParams(max_tokens=12, **CONTROLS, **sampling)
    colocated, reason = _run(_engine(loaded), PROMPT, params)
    if params.is_greedy:
        raw_first, _ = _run(_engine(loaded), PROMPT, SamplingParams(max_tokens=1, **sampling))
        assert colocated[0] != raw_first[0], "precondition: the controls change the first token"
    assert len(colocated) == 5 and colocated[-1] in (0, 2) and reason == FinishReason.STOP
    assert _run_disaggregated(pair, PROMPT, params) == colocated


def test_a_resumed_disaggregated_request_counts_its_carried_output(loaded, pair):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, frequency_penalty=2.0)
    whole, _ = _run(_engine(loaded), PROMPT, params)
    cut = 1  # the unpenalised model would repeat the carried token next
    rest = _run_disaggregated(pair, PROMPT + whole[:cut],
                              SamplingParams(max_tokens=16 - cut, temperature=0.0, ignore_eos=True,
                                             frequency_penalty=2.0), resume_at=cut)
    assert whole[:cut] + rest == whole


# ------------------------------------------------------------------ speculative decoding


def test_requests_with_position_dependent_controls_get_no_draft():
    speculator = Speculator(SpeculativeConfig(num_tokens=3, ngram_min=1))
    repetitive = [4, 5, 6, 4, 5, 6, 4, 5]
    requests = {name: Request(name, list(repetitive), SamplingParams(temperature=0.0, **kw)) for name, kw in [
        ("plain", {}), ("bias", {"logit_bias": {3: 1.0}}), ("frequency", {"frequency_penalty": 0.1}),
        ("repetition", {"repetition_penalty": 1.1}), ("presence", {"presence_penalty": -0.1}),
        ("min-tokens", {"min_tokens": 2}), ("min-tokens-reached", {"min_tokens": 2}),
    ]}
    requests["min-tokens-reached"].output_ids = [6, 4]
    drafts = speculator.propose(list(requests.values()))
    assert set(drafts) == {"plain", "bias", "min-tokens-reached"}


def test_verify_applies_logit_bias_and_refuses_penalties():
    logits = torch.zeros(3, VOCAB)
    logits[:, 1] = 5.0  # raw argmax everywhere: token 1
    biased = SamplingParams(temperature=0.0, logit_bias={9: 10.0})
    verified = verify(logits, Draft((9, 9)), biased, None)
    assert verified.token_ids == (9, 9, 9) and verified.num_accepted == 2
    assert verify(logits, Draft((1, 1)), biased, None).token_ids == (9,)
    with pytest.raises(ValueError, match="penalties"):
        verify(logits[:2], Draft((1,)), SamplingParams(temperature=0.0, frequency_penalty=1.0), None)


def test_greedy_output_with_controls_is_identical_with_speculation(loaded):
    greedy = {"temperature": 0.0, "max_tokens": 30, "ignore_eos": True}
    repetitive = [40, 51, 62, 73, 84] * 5
    requests = {
        "plain": (repetitive, SamplingParams(**greedy)),
        "bias": (repetitive, SamplingParams(logit_bias={302: 3.0, 3: -2.0, 254: 1.5}, **greedy)),
        "penalties": (repetitive, SamplingParams(frequency_penalty=0.7, repetition_penalty=1.3, **greedy)),
        "min-tokens": (PROMPT, SamplingParams(min_tokens=6, **{**greedy, "ignore_eos": False,
                                                               "logit_bias": {2: 6.0}})),
    }
    baseline = run_to_completion(_engine(loaded), requests)
    engine = _engine(loaded, SpeculativeConfig(num_tokens=3, ngram_min=1))
    assert run_to_completion(engine, requests) == baseline
    assert engine.speculator.proposed > 0
    assert baseline["bias"] != baseline["plain"], "precondition: the bias changes the output"
