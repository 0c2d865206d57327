"""Speculative decoding's model-free parts: the n-gram proposer and the verify rule.

The proposer is checked token for token against a brute-force search. Greedy verification
is checked against the Sampler's greedy chain; sampled verification by the distribution of
what it emits (chi-square against the Sampler's distribution) over a fixed seeded stream.
"""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine.proposers import EMPTY_DRAFT, Draft, NgramProposer
from pdserve.engine.verification import Verified, verify, verify_batch
from pdserve.runtime.request import Request
from pdserve.runtime.sampler import Sampler, apply_filters, make_generator
from pdserve.runtime.sampling_params import SamplingParams


def make_request(tokens: list[int], request_id: str = "r") -> Request:
    return Request(request_id, list(tokens), SamplingParams())


def propose_one(proposer: NgramProposer, tokens: list[int], k: int) -> tuple[int, ...]:
    return proposer.propose([make_request(tokens)], [k])[0].token_ids


def reference_draft(tokens: list[int], k: int, min_n: int, max_n: int) -> tuple[int, ...]:
    """Brute force: longest n first, then the latest start that is not the suffix itself."""
    length = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        for start in range(length - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[length - n:]:
                return tuple(tokens[start + n:start + n + k])
    return ()


# ---------------------------------------------------------------------------------------
# NgramProposer
# ---------------------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_most_recent_match():
    # [1, 2] occurs at 1 (then 4, 5) and at 5 (then 6, 1, 2): the later one wins.
    tokens = [7, 1, 2, 4, 5, 1, 2, 6, 1, 2]
    assert propose_one(NgramProposer(), tokens, 3) == (6, 1, 2)
    draft = NgramProposer().propose([make_request(tokens)], [2])[0]
    assert draft == Draft((6, 1), None)


def test_ngram_prefers_the_longest_match():
    # [1, 2, 3] occurs at 0 (then 10, 11, 9); the shorter [2, 3] occurs later, at 6.
    tokens = [1, 2, 3, 10, 11, 9, 2, 3, 20, 21, 1, 2, 3]
    assert propose_one(NgramProposer(max_n=3), tokens, 3) == (10, 11, 9)
    assert propose_one(NgramProposer(max_n=2), tokens, 3) == (20, 21, 1)


def test_ngram_respects_k_and_the_end_of_the_sequence():
    tokens = [5, 6, 7, 5, 6]
    assert propose_one(NgramProposer(), tokens, 5) == (7, 5, 6)  # only 3 tokens follow
    assert propose_one(NgramProposer(), tokens, 1) == (7,)
    assert NgramProposer().propose([make_request(tokens)], [0]) == [EMPTY_DRAFT]


def test_ngram_without_a_match_proposes_nothing():
    assert propose_one(NgramProposer(), [1, 2, 3, 4], 3) == ()
    # Only the 1-gram [1] recurs: below the default min_n, within min_n=1.
    assert propose_one(NgramProposer(), [1, 2, 3, 1], 3) == ()
    assert propose_one(NgramProposer(min_n=1), [1, 2, 3, 1], 3) == (2, 3, 1)
    assert propose_one(NgramProposer(min_n=1), [4], 3) == ()


def test_ngram_never_matches_the_suffix_itself():
    # The 4- and 3-grams ending the sequence occur only as the suffix; [1, 2] at 0 counts.
    assert propose_one(NgramProposer(), [1, 2, 1, 2], 4) == (1, 2)
    assert propose_one(NgramProposer(), [3, 3], 4) == ()
    # Overlapping occurrences: [5, 5] starts at 0 and 1 before the suffix at 2.
    assert propose_one(NgramProposer(), [5, 5, 5, 5], 4) == (5,)


@pytest.mark.parametrize("seed", range(4))
def test_ngram_incremental_index_matches_brute_force(seed):
    # Two requests grow in one batch by 1 to 3 tokens per step, from a small alphabet so
    # that matches of every length come and go; every draft must equal the brute force.
    rng = random.Random(seed)
    proposer = NgramProposer(max_n=4, min_n=2)
    requests = [make_request([rng.randrange(4) for _ in range(n)], request_id=f"r{n}") for n in (1, 9)]
    for _ in range(60):
        ks = [rng.randrange(5) for _ in requests]
        before = [(list(r.prompt_ids), list(r.output_ids)) for r in requests]
        drafts = proposer.propose(requests, ks)
        assert [(r.prompt_ids, r.output_ids) for r in requests] == before  # read-only
        for request, k, draft in zip(requests, ks, drafts):
            tokens = request.token_ids(0, request.num_tokens)
            assert draft == Draft(reference_draft(tokens, k, 2, 4), None)
            request.output_ids.extend(rng.randrange(4) for _ in range(rng.randint(1, 3)))


def test_ngram_forgets_on_finished_and_never_mixes_reused_ids():
    proposer = NgramProposer()
    first = make_request([1, 2, 9, 1, 2], request_id="a")
    assert proposer.propose([first], [2])[0].token_ids == (9, 1)
    assert proposer.num_tracked == 1
    proposer.on_finished("a")
    proposer.on_finished("never-seen")  # safe for unknown ids
    assert proposer.num_tracked == 0

    # The id reused for another sequence: after on_finished, and then without it (the
    # index of the previous "a" must not be extended with the new sequence's tokens).
    second = make_request([1, 2, 7, 8, 1, 2], request_id="a")
    assert proposer.propose([second], [2])[0].token_ids == (7, 8)
    third = make_request([3, 4, 6, 0, 0, 3, 4], request_id="a")
    assert proposer.propose([third], [2])[0].token_ids == (6, 0)
    assert proposer.num_tracked == 1


def test_ngram_rejects_bad_lengths():
    with pytest.raises(ValueError, match="min_n"):
        NgramProposer(max_n=2, min_n=3)
    with pytest.raises(ValueError, match="draft lengths"):
        NgramProposer().propose([make_request([1, 2])], [1, 2])


# ---------------------------------------------------------------------------------------
# verify: greedy
# ---------------------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0, logprobs=3)


def greedy_cases(seed: int):
    """(logits, draft) pairs: random drafts, the argmax chain, and the chain broken at j."""
    gen = torch.Generator().manual_seed(seed)
    for k in range(5):
        logits = torch.randn(k + 1, 8, generator=gen)
        chain = logits.argmax(dim=-1).tolist()[:k]
        yield logits, tuple(torch.randint(8, (k,), generator=gen).tolist())
        yield logits, tuple(chain)
        for j in range(k):
            yield logits, tuple(chain[:j] + [(chain[j] + 1) % 8] + chain[j + 1:])


@pytest.mark.parametrize("seed", range(3))
def test_greedy_emits_the_samplers_greedy_chain(seed):
    for logits, draft_ids in greedy_cases(seed):
        k = len(draft_ids)
        out = Sampler()(logits, [GREEDY] * (k + 1), [None] * (k + 1))
        chain = out.token_ids.tolist()
        expected_accepted = next((i for i in range(k) if draft_ids[i] != chain[i]), k)

        verified = verify(logits, Draft(draft_ids), GREEDY, None)

        assert verified.num_accepted == expected_accepted
        assert verified.token_ids == tuple(chain[:expected_accepted + 1])
        rows = range(expected_accepted + 1)
        assert verified.logprobs == tuple(out.logprobs[i].item() for i in rows)
        # Raw logprobs: log_softmax up to float32 rounding (both compute logits - logsumexp).
        assert verified.logprobs == pytest.approx(tuple(
            torch.log_softmax(logits, dim=-1)[i, t].item() for i, t in zip(rows, verified.token_ids)), abs=1e-6)
        assert verified.top_logprobs == tuple(out.top_for(i, 3) for i in rows)


def test_greedy_ties_go_to_the_lowest_id_and_draw_nothing():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [3.0, 3.0, 0.0, 0.0]])
    gen = make_generator(7, "cpu")
    state = gen.get_state()
    assert verify(logits, Draft((2,)), GREEDY, gen).token_ids == (1,)
    assert verify(logits, Draft((1,)), GREEDY, gen).token_ids == (1, 0)
    assert torch.equal(gen.get_state(), state)


def test_no_alternatives_unless_asked():
    logits = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    for logprobs in (None, 0):
        assert verify(logits, Draft((3,)), SamplingParams(temperature=0.0, logprobs=logprobs),
                      None).top_logprobs is None


# ---------------------------------------------------------------------------------------
# verify: sampled, exact properties
# ---------------------------------------------------------------------------------------

V = 6
# Target logits for positions 0..3; a verify over k draft tokens at position m uses
# rows m..m+k. Rows do not depend on earlier tokens, which is valid for testing the rule.
TARGET_LOGITS = torch.tensor([
    [1.0, 0.2, -0.5, 0.8, 0.0, -1.0],
    [-0.3, 0.9, 0.4, -1.2, 0.6, 0.1],
    [0.5, -0.8, 1.1, 0.0, -0.4, 0.3],
    [0.0, 0.7, -0.6, 0.2, 1.0, -0.2],
])
PLAIN = SamplingParams(temperature=1.0)
FILTERED = SamplingParams(temperature=0.7, top_k=4, top_p=0.9)


def target_probs(params: SamplingParams) -> torch.Tensor:
    """What the Sampler draws from at each position."""
    return torch.softmax(apply_filters(TARGET_LOGITS, [params] * len(TARGET_LOGITS)), dim=-1)


def test_empty_draft_is_exactly_one_sampler_step():
    for seed in range(20):
        gen_verify, gen_sampler = make_generator(seed, "cpu"), make_generator(seed, "cpu")
        verified = verify(TARGET_LOGITS[:1], EMPTY_DRAFT, FILTERED, gen_verify)
        out = Sampler()(TARGET_LOGITS[:1], [FILTERED], [gen_sampler])
        assert verified == Verified((out.token_ids.item(),), 0, (out.logprobs.item(),), None)
        assert torch.equal(gen_verify.get_state(), gen_sampler.get_state())


def test_seeded_verify_is_reproducible_and_leaves_the_default_rng_alone():
    q = torch.full((2, V), 1.0 / V)
    draft = Draft((5, 2), q)
    torch.manual_seed(0)
    default_state = torch.get_rng_state()
    runs = [[verify(TARGET_LOGITS[:3], draft, PLAIN, gen) for _ in range(30)]
            for gen in (make_generator(11, "cpu"), make_generator(11, "cpu"))]
    assert runs[0] == runs[1]
    assert len({v.token_ids for v in runs[0]}) > 1  # the stream does advance
    assert torch.equal(torch.get_rng_state(), default_state)


def test_a_draft_token_the_target_filters_out_is_always_rejected():
    p0 = target_probs(FILTERED)[0]
    filtered_out = int((p0 == 0).nonzero()[0])
    gen = make_generator(3, "cpu")
    for _ in range(200):
        verified = verify(TARGET_LOGITS[:2], Draft((filtered_out,)), FILTERED, gen)
        assert verified.num_accepted == 0
        assert p0[verified.token_ids[0]] > 0


def test_rejection_with_no_residual_mass_falls_back_to_the_target():
    # q = 2p overstates every token (sums to 2): d is kept with probability 1/2 and the
    # residual max(0, p - q) is all zero, so a rejection must draw from p itself. At
    # position 1 FILTERED removes token 0, which an all-zero draw would give.
    p = target_probs(FILTERED)[1:2]
    assert p[0, 0] == 0
    draft_token = int(p[0].argmax())
    gen = make_generator(5, "cpu")
    outcomes = [verify(TARGET_LOGITS[1:3], Draft((draft_token,), 2 * p), FILTERED, gen) for _ in range(200)]
    assert {v.num_accepted for v in outcomes} == {0, 1}
    assert all(p[0, v.token_ids[0]] > 0 for v in outcomes)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="logits"):
        verify(TARGET_LOGITS[:2], Draft((1, 2)), PLAIN, None)
    with pytest.raises(ValueError, match="draft probs"):
        verify(TARGET_LOGITS[:2], Draft((1,), torch.ones(1, V + 1)), PLAIN, None)
    with pytest.raises(ValueError, match="one of each"):
        verify_batch([TARGET_LOGITS[:1]], [EMPTY_DRAFT], [PLAIN], [])


def test_verify_batch_is_verify_per_request():
    drafts = [EMPTY_DRAFT, Draft((0, 3)), Draft((int(TARGET_LOGITS[0].argmax()),))]
    params = [PLAIN, FILTERED, SamplingParams(temperature=0.0)]
    logits = [TARGET_LOGITS[:d.num_tokens + 1] for d in drafts]
    batch = verify_batch(logits, drafts, params, [make_generator(i, "cpu") for i in range(3)])
    assert batch == [verify(*a) for a in zip(logits, drafts, params, [make_generator(i, "cpu") for i in range(3)])]


# ---------------------------------------------------------------------------------------
# verify: sampled, distributions
# ---------------------------------------------------------------------------------------

# Two draft kinds: a deterministic proposer that always guesses tokens 3 then 1 (q is a
# point mass), and a bad random proposer whose q puts 0.9 on token 5, which the target
# finds unlikely (and FILTERED removes at positions 0 and 3, so p(d) = 0 happens).
FIXED_GUESS = (3, 1, 3, 1)
BAD_Q = torch.full((len(TARGET_LOGITS), V), 0.02).index_fill_(1, torch.tensor([5]), 0.9)


def propose(kind: str, position: int, k: int, gen: torch.Generator) -> Draft:
    if kind == "point_mass":
        return Draft(FIXED_GUESS[position:position + k])
    q = BAD_Q[position:position + k]
    return Draft(tuple(torch.multinomial(q, 1, generator=gen).squeeze(1).tolist()), q)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(chi-square >= observed) for `counts` drawn from `probs`; 0 if a count lands where
    probs is 0 (impossible under the null)."""
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    n = counts.sum()
    expected = n * probs[support].double()
    statistic = ((counts[support].double() - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    return 1.0 - torch.distributions.Chi2(torch.tensor(float(df), dtype=torch.float64)).cdf(statistic).item()


# Under a correct rule each statistic is chi-square distributed, so any one seed set fails
# with probability 0.01; the seeds are fixed, so the outcome is deterministic. The trial
# counts keep every expected cell count >= 5 (the chi-square approximation's usual bar)
# and are large enough that the draft's own distribution fails (checked below), so a rule
# that accepted too often could not pass.
ALPHA = 0.01
FIRST_TOKEN_TRIALS = 3000
PAIR_TRIALS = 5000


@pytest.mark.parametrize("params", [PLAIN, FILTERED], ids=["plain", "filtered"])
@pytest.mark.parametrize("kind", ["point_mass", "bad_q"])
def test_first_emitted_token_follows_the_target(params, kind):
    gen_verify, gen_draft = make_generator(1234, "cpu"), make_generator(99, "cpu")
    emitted = torch.zeros(V, dtype=torch.int64)
    proposed = torch.zeros(V, dtype=torch.int64)
    for _ in range(FIRST_TOKEN_TRIALS):
        draft = propose(kind, 0, 2, gen_draft)
        emitted[verify(TARGET_LOGITS[:3], draft, params, gen_verify).token_ids[0]] += 1
        proposed[draft.token_ids[0]] += 1
    p0 = target_probs(params)[0]
    assert chi_square_p_value(emitted, p0) > ALPHA
    # Emitting the draft unchecked would fail: the test has the power to see it.
    assert chi_square_p_value(proposed, p0) < 1e-6


@pytest.mark.parametrize("params, kind, k", [(PLAIN, "bad_q", 1), (FILTERED, "point_mass", 2)],
                         ids=["plain-bad_q-k1", "filtered-point_mass-k2"])
def test_first_two_tokens_follow_the_target_jointly(params, kind, k):
    # Decode as the engine would, k draft tokens per step, until two tokens are out: the
    # second is the bonus (k = 1) or the check of draft[1] (k = 2) when the first draft
    # token was accepted, else the first token of a second step.
    gen_verify, gen_draft = make_generator(4321, "cpu"), make_generator(77, "cpu")
    pairs = torch.zeros(V, V, dtype=torch.int64)
    for _ in range(PAIR_TRIALS):
        tokens: list[int] = []
        while len(tokens) < 2:
            position = len(tokens)
            draft = propose(kind, position, k, gen_draft)
            tokens += verify(TARGET_LOGITS[position:position + k + 1], draft, params, gen_verify).token_ids
        pairs[tokens[0], tokens[1]] += 1
    p = target_probs(params)
    joint = p[0].unsqueeze(1) * p[1].unsqueeze(0)
    assert (joint[joint > 0] * PAIR_TRIALS).min() >= 5
    assert chi_square_p_value(pairs.flatten(), joint.flatten()) > ALPHA
