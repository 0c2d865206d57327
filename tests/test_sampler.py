"""Sampler, filters and SamplingParams: exact supports, determinism, and distributions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdserve.runtime.sampler import Sampler, SamplerOutput, apply_filters, make_generator
from pdserve.runtime.sampling_params import SamplingParams

# Probabilities that float32 represents exactly, and whose prefix sums are exact, so
# top-p and min-p boundaries can be tested with ==. Token ids are the positions.
DYADIC = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
DYADIC_LOGITS = torch.log(DYADIC)

# Logits with a tie at 3.0: sorted order is 1, {2, 3}, 5, 0, 4.
TIED_LOGITS = torch.tensor([1.0, 4.0, 3.0, 3.0, 0.5, 2.0])


def support(logits: torch.Tensor, **kwargs) -> set[int]:
    filtered = apply_filters(logits.unsqueeze(0), [SamplingParams(**kwargs)])[0]
    return set(torch.isfinite(filtered).nonzero().flatten().tolist())


def test_dyadic_softmax_is_exact():
    # Precondition of the boundary tests below: if this platform's exp/softmax rounds
    # differently, those tests would be testing rounding instead of the rule.
    assert torch.equal(torch.softmax(DYADIC_LOGITS, dim=-1), DYADIC)


@pytest.mark.parametrize(
    "top_k, expected",
    [
        (2, {1, 2, 3}),  # the 2nd largest (3.0) is tied: ties at the boundary are kept
        (3, {1, 2, 3}),
        (4, {1, 2, 3, 5}),
        (5, {0, 1, 2, 3, 5}),
        (6, {0, 1, 2, 3, 4, 5}),
        (100, {0, 1, 2, 3, 4, 5}),  # k > V keeps everything
        (0, {0, 1, 2, 3, 4, 5}),
        (-1, {0, 1, 2, 3, 4, 5}),
    ],
)
def test_top_k_support(top_k, expected):
    assert support(TIED_LOGITS, top_k=top_k) == expected


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.1, {0}),
        (0.5, {0}),  # the first token alone reaches exactly 0.5: the rule is mass >= top_p
        (0.5001, {0, 1}),
        (0.75, {0, 1}),  # exact boundary again
        (0.7501, {0, 1, 2}),
        (0.875, {0, 1, 2}),
        (0.9, {0, 1, 2, 3, 4}),  # the prefix needs token 3; token 4 ties with it
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_support(top_p, expected):
    assert support(DYADIC_LOGITS, top_p=top_p) == expected


def test_top_p_always_keeps_the_most_likely_token():
    peaked = torch.tensor([0.0, 0.0, 30.0, 0.0])
    assert support(peaked, top_p=1e-9) == {2}
    assert support(peaked, top_p=0.999) == {2}


def test_top_p_one_keeps_a_vanishing_tail():
    # A float cumsum reaches 1.0 before the tail does; top_p == 1 must still keep it all.
    logits = torch.tensor([0.0, -30.0, -40.0, -50.0])
    assert support(logits, top_p=1.0) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "min_p, expected",
    [
        (0.0, {0, 1, 2, 3, 4}),
        (0.12, {0, 1, 2, 3, 4}),  # threshold 0.06 < 0.0625
        (0.125, {0, 1, 2, 3, 4}),  # threshold exactly 0.0625: kept (prob >= min_p * max)
        (0.25, {0, 1, 2}),  # threshold exactly 0.125
        (0.3, {0, 1}),
        (1.0, {0}),
    ],
)
def test_min_p_support(min_p, expected):
    assert support(DYADIC_LOGITS, min_p=min_p) == expected


def test_filters_apply_to_temperature_scaled_logits():
    # At temperature 2 the probabilities are ~[.343, .243, .172, .121, .121]: top_p 0.5
    # needs two tokens, where at temperature 1 it needs one.
    assert support(DYADIC_LOGITS, top_p=0.5, temperature=1.0) == {0}
    assert support(DYADIC_LOGITS, top_p=0.5001, temperature=2.0) == {0, 1}


def test_filters_compose_top_k_then_top_p_then_min_p():
    # top-k 3 leaves [4/7, 2/7, 1/7]; top_p 0.8 then needs 6/7 -> two tokens. Without
    # top-k the mass 0.75 of two tokens is short of 0.8 -> three tokens.
    assert support(DYADIC_LOGITS, top_p=0.8) == {0, 1, 2}
    assert support(DYADIC_LOGITS, top_k=3, top_p=0.8) == {0, 1}
    # top-p before min-p: top_p 0.8 keeps {0, 1, 2}, then min_p 0.2 (threshold ratio 0.2,
    # token 2 has 0.25) keeps them all. Min-p first (vLLM v1's order) would give {0, 1}.
    assert support(DYADIC_LOGITS, top_p=0.8, min_p=0.2) == {0, 1, 2}
    assert support(DYADIC_LOGITS, top_k=4, top_p=0.9, min_p=0.3) == {0, 1}


def test_apply_filters_keeps_scaled_values_and_is_pure():
    logits = TIED_LOGITS.unsqueeze(0).clone()
    out = apply_filters(logits, [SamplingParams(temperature=0.5, top_k=4)])
    assert torch.equal(logits, TIED_LOGITS.unsqueeze(0))
    kept = torch.isfinite(out[0])
    assert torch.equal(out[0][kept], TIED_LOGITS[kept] / 0.5)


def test_apply_filters_rows_are_independent():
    torch.manual_seed(0)
    logits = torch.randn(4, 32)
    params = [
        SamplingParams(top_k=5),
        SamplingParams(temperature=0),
        SamplingParams(top_p=0.6, temperature=0.7),
        SamplingParams(min_p=0.1, top_k=20),
    ]
    batched = apply_filters(logits, params)
    for i, p in enumerate(params):
        assert torch.equal(batched[i], apply_filters(logits[i : i + 1], [p])[0])


def test_greedy_row_support_is_its_argmax():
    assert support(TIED_LOGITS, temperature=0.0) == {1}
    assert support(torch.tensor([0.0, 2.0, 2.0]), top_k=1) == {1}


def test_greedy_equals_argmax_with_lowest_index_on_ties():
    torch.manual_seed(1)
    logits = torch.randn(6, 100)
    logits[5, 7] = logits[5, 70] = logits[5].max() + 1.0
    params = [SamplingParams(temperature=0.0)] * 5 + [SamplingParams(top_k=1)]
    out = Sampler()(logits, params, [None] * 6)
    expected = logits.argmax(dim=-1)
    assert torch.equal(out.token_ids, expected)
    assert out.token_ids[5].item() == 7


def _draw_sequence(logits_row, seed, position, batch_size, steps=50):
    """Tokens a seeded request gets at `position` in a batch of other (varied) rows."""
    sampler = Sampler()
    generator = make_generator(seed, "cpu")
    # The neighbours' logits differ per layout too.
    layout_rng = torch.Generator().manual_seed(100 + position)
    others = torch.randn(batch_size, logits_row.shape[0], generator=layout_rng)
    logits = others.clone()
    logits[position] = logits_row
    neighbour_params = [SamplingParams(top_k=3), SamplingParams(), SamplingParams(temperature=0)]
    params = [neighbour_params[i % 3] for i in range(batch_size)]
    params[position] = SamplingParams(top_p=0.95, seed=seed)
    tokens = []
    for _ in range(steps):
        # Seeded and unseeded neighbours: neither may disturb this row's draws.
        generators = [make_generator(i, "cpu") if i % 2 else None for i in range(batch_size)]
        generators[position] = generator
        tokens.append(sampler(logits, params, generators).token_ids[position].item())
    return tokens


def test_same_seed_gives_same_tokens_at_any_batch_position():
    torch.manual_seed(2)
    row = torch.randn(40) * 0.5  # flat enough that 50 draws are far from constant
    alone = _draw_sequence(row, seed=1234, position=0, batch_size=1)
    assert len(set(alone)) > 5
    assert _draw_sequence(row, seed=1234, position=0, batch_size=1) == alone
    assert _draw_sequence(row, seed=1234, position=3, batch_size=5) == alone
    assert _draw_sequence(row, seed=1234, position=1, batch_size=8) == alone
    assert _draw_sequence(row, seed=4321, position=0, batch_size=1) != alone


def test_make_generator_without_seed_is_none():
    assert make_generator(None, "cpu") is None
    assert isinstance(make_generator(0, torch.device("cpu")), torch.Generator)


# Chi-square critical value at significance 0.001 for 4 degrees of freedom (5 categories),
# from the standard table (scipy.stats.chi2.ppf(0.999, 4) = 18.467); scipy is not a
# dependency. Seeds are fixed, so each run computes the same statistic: the test cannot
# flake, and a wrong distribution (e.g. sampling from unscaled logits) lands far above it.
CHI2_CRIT_DF4 = 18.467


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.shape[0]).double()
    expected = probs.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


LOGITS_5 = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5])


def test_unseeded_distribution_matches_softmax():
    n = 20_000
    with torch.random.fork_rng():
        torch.manual_seed(3)
        out = Sampler()(LOGITS_5.expand(n, 5), [SamplingParams()] * n, [None] * n)
    assert chi_square(out.token_ids, torch.softmax(LOGITS_5, -1)) < CHI2_CRIT_DF4
    # Sensitivity: the same draws are far from the temperature-2 distribution.
    assert chi_square(out.token_ids, torch.softmax(LOGITS_5 / 2, -1)) > 10 * CHI2_CRIT_DF4


def test_seeded_distribution_matches_tempered_softmax():
    generator, sampler = make_generator(7, "cpu"), Sampler()
    params = [SamplingParams(temperature=0.7, seed=7)]
    tokens = torch.tensor(
        [sampler(LOGITS_5.unsqueeze(0), params, [generator]).token_ids[0].item()
         for _ in range(3000)]
    )
    assert chi_square(tokens, torch.softmax(LOGITS_5 / 0.7, -1)) < CHI2_CRIT_DF4


def test_filtered_sampling_stays_in_support_and_renormalises():
    n = 20_000
    params = SamplingParams(top_k=3)  # keeps tokens 0, 1, 2 (2 df)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        out = Sampler()(LOGITS_5.expand(n, 5), [params] * n, [None] * n)
    assert set(out.token_ids.tolist()) == {0, 1, 2}
    probs = torch.softmax(LOGITS_5[:3], -1)
    # Chi-square critical value at 0.001 for 2 degrees of freedom: 13.816 (table).
    assert chi_square(out.token_ids, probs) < 13.816


def test_logprobs_are_raw_log_softmax_and_top_n_in_order():
    torch.manual_seed(5)
    logits = torch.randn(3, 10)
    params = [
        SamplingParams(logprobs=3, temperature=0.5),
        SamplingParams(temperature=0),
        SamplingParams(logprobs=0, top_k=2),
    ]
    out = Sampler()(logits, params, [make_generator(0, "cpu"), None, None])
    assert isinstance(out, SamplerOutput)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    assert torch.equal(out.logprobs, raw.gather(1, out.token_ids.unsqueeze(1)).squeeze(1))
    assert out.top_logprob_ids.shape == (3, 3)
    expected_ids = raw.argsort(dim=-1, descending=True)[:, :3]
    assert torch.equal(out.top_logprob_ids, expected_ids)
    assert torch.equal(out.top_logprobs, raw.gather(1, expected_ids))


def test_no_top_logprobs_unless_requested():
    logits = torch.randn(2, 10)
    for requested in (None, 0):
        params = [SamplingParams(logprobs=requested), SamplingParams()]
        out = Sampler()(logits, params, [None, None])
        assert out.top_logprob_ids is None and out.top_logprobs is None
        assert out.logprobs.shape == (2,)


def test_sampler_rejects_mismatched_generators():
    with pytest.raises(ValueError, match="generators"):
        Sampler()(torch.zeros(2, 4), [SamplingParams()] * 2, [None])


# --- SamplingParams -------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("temperature", -0.1, "-0.1"),
        ("temperature", float("nan"), "nan"),
        ("top_p", 0.0, "0.0"),
        ("top_p", 1.5, "1.5"),
        ("top_k", -2, "-2"),
        ("top_k", 2.5, "2.5"),
        ("min_p", -0.01, "-0.01"),
        ("min_p", 1.01, "1.01"),
        ("max_tokens", 0, "0"),
        ("max_tokens", True, "True"),
        ("logprobs", -1, "-1"),
        ("logprobs", 21, "21"),
        ("seed", "7", "'7'"),
        ("stop", ["ok", ""], "('ok', '')"),
        ("stop", [3], "3"),
        ("stop_token_ids", [-1], "-1"),
    ],
)
def test_sampling_params_errors_name_field_and_value(field, value, shown):
    with pytest.raises(ValueError, match=field) as excinfo:
        SamplingParams(**{field: value})
    assert f"got {shown}" in str(excinfo.value)


def test_sampling_params_normalises_stop_to_tuples():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=7).stop_token_ids == (7,)
    assert SamplingParams(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)


def test_sampling_params_is_frozen_and_hashable():
    params = SamplingParams(stop=["x"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.0  # type: ignore[misc]
    assert hash(params) == hash(SamplingParams(stop=("x",)))


@pytest.mark.parametrize(
    "kwargs, greedy",
    [
        ({}, False),
        ({"temperature": 0.0}, True),
        ({"top_k": 1}, True),
        ({"top_k": 2}, False),
        ({"temperature": 1e-3}, False),
    ],
)
def test_is_greedy(kwargs, greedy):
    assert SamplingParams(**kwargs).is_greedy is greedy


@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 15), (7, 49152), (33, 1000)])
def test_argmax_logsumexp_kernel_matches_torch(rows, vocab):
    # The CPU default (C++) against torch: the first maximum on ties, -inf entries, widths
    # that are not a multiple of the 16-lane vector, a row of all -inf.
    from pdserve.kernels.cpu_extension import cpu_kernels_available
    from pdserve.kernels.greedy import argmax_logsumexp, argmax_logsumexp_ref

    assert cpu_kernels_available()
    generator = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=generator) * 8
    logits[0, vocab // 2:] = logits[0].max() + 1  # ties: the first one wins
    if rows > 1:
        logits[1, ::3] = float("-inf")
        logits[-1] = float("-inf")
    ids, lse = argmax_logsumexp(logits)
    expected_ids, expected_lse = argmax_logsumexp_ref(logits)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-6)
    # Strided rows (a view of every other row) give the same as a contiguous copy.
    view_ids, view_lse = argmax_logsumexp(logits[::2])
    assert torch.equal(view_ids, expected_ids[::2]) and torch.equal(view_lse, lse[::2])
