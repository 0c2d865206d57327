"""Speculative verification: how much of a draft a request keeps, and the token after it.

The target model runs once over the last committed token and the k draft tokens, giving
k + 1 rows of logits for one request:

    row 0   predicts the token after the last committed token   checks draft[0]
    row i   predicts the token after draft[i-1]                  checks draft[i]
    row k   predicts the token after the whole draft             the bonus token

`verify` keeps the longest acceptable draft prefix and adds one token of its own (the
correction at the first rejection, or the bonus), so a step emits 1 to k + 1 tokens.

Greedy requests keep draft[i] while it is the argmax of row i: exactly the tokens k + 1
plain greedy steps would produce.

Sampled requests use speculative sampling's rejection rule. With p_i the Sampler's
distribution for row i (`apply_filters`, then softmax) and q_i the proposer's, draft token
d is kept with probability min(1, p_i(d) / q_i(d)); on rejection the token is drawn from
max(0, p_i - q_i), normalised. Invariant: every emitted token is distributed exactly as
the Sampler would draw it, whatever q is:

    P(emit x) = q(x) min(1, p(x)/q(x)) + P(reject) max(0, p(x) - q(x)) / sum(max(0, p - q))
              = min(p(x), q(x))         + max(0, p(x) - q(x))                  = p(x)

because P(reject) = 1 - sum(min(p, q)) = sum(max(0, p - q)). A good q only makes
acceptance likelier. All randomness comes from the request's generator (or the default RNG
when it has none), so a seeded request is reproducible.

Of the logits controls only `logit_bias` can reach here (the Speculator does not draft for
requests whose controls depend on the position): it is added to every row before the
greedy argmax and before p is built, as the Sampler adds it. A request with a grammar
(structured output) passes `masks`, row i's allowed tokens after draft[:i] (the caller cut
the draft at its first token the grammar forbids): they are applied last, as the Sampler
applies them, so every emitted token is allowed. Logprobs stay raw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from pdserve.engine.proposers import Draft
from pdserve.kernels.greedy import argmax_logsumexp
from pdserve.runtime.sampler import apply_filters, apply_logit_bias, exponential_race
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.structured_output import apply_bitmask


class Verified(NamedTuple):
    """What one verify step emits for one request.

    token_ids: the accepted draft prefix plus one token; 1 <= len <= k + 1.
    num_accepted: how many draft tokens were kept (len(token_ids) - 1).
    logprobs: per emitted token its raw log-probability (log_softmax of the unfiltered
    logits of its row), as the Sampler reports.
    top_logprobs: per emitted token the `params.logprobs` best (token id, raw logprob)
    pairs, best first; None when no alternatives were asked for (logprobs None or 0),
    as the engine's TokenDelta has it.
    """

    token_ids: tuple[int, ...]
    num_accepted: int
    logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None


def verify(
    logits: torch.Tensor, draft: Draft, params: SamplingParams, generator: torch.Generator | None,
    masks: torch.Tensor | None = None,
) -> Verified:
    """Accept or reject `draft` against the target's `logits` ([k + 1, V], rows as in the
    module docstring) and pick the token that follows the accepted prefix.

    Pure except for randomness: sampled requests advance `generator` (which must live on
    logits' device) or, when it is None, the default RNG; greedy requests draw nothing.
    The request must have no penalty (ValueError) and must have reached its min_tokens
    (only the caller knows its position; nothing is masked here).
    With an empty draft this is one plain Sampler step, generator use included.
    masks: [k + 1, ceil(V / 32)] int32 grammar bitmasks (`GrammarMatcher.masks_along`), or None.
    """
    k = draft.num_tokens
    if logits.dim() != 2 or logits.shape[0] != k + 1:
        raise ValueError(f"verify needs logits [k + 1, V] = [{k + 1}, V] for a {k}-token draft, "
                         f"got shape {tuple(logits.shape)}")
    if draft.probs is not None and tuple(draft.probs.shape) != (k, logits.shape[1]):
        raise ValueError(f"draft probs must be [k, V] = [{k}, {logits.shape[1]}], "
                         f"got shape {tuple(draft.probs.shape)}")
    if params.has_penalties:
        raise ValueError("verify applies only logit_bias of the logits controls; requests with penalties "
                         "are not speculated (see Speculator.propose)")
    logits = logits.float()
    # The Sampler's greedy tokens and logprob normalisers, from the same kernel.
    greedy, normaliser = argmax_logsumexp(logits)
    biased = apply_logit_bias(logits, [params] * (k + 1))
    if masks is not None:
        biased = apply_bitmask(biased, masks)
    if biased is not logits and params.is_greedy:
        greedy = argmax_logsumexp(biased)[0]
    if params.is_greedy:
        num_accepted, next_token = _verify_greedy(greedy, draft)
    else:
        num_accepted, next_token = _verify_sampled(biased, draft, params, generator)
    token_ids = draft.token_ids[:num_accepted] + (next_token,)
    logprobs, top_logprobs = _logprobs(logits, normaliser, token_ids, params.logprobs)
    return Verified(token_ids, num_accepted, logprobs, top_logprobs)


def verify_batch(
    logits_rows: Sequence[torch.Tensor],
    drafts: Sequence[Draft],
    params_list: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[Verified]:
    """`verify` for each request: logits_rows[i] is request i's [k_i + 1, V] logits."""
    if not len(logits_rows) == len(drafts) == len(params_list) == len(generators):
        raise ValueError(f"verify_batch needs one of each per request, got {len(logits_rows)} logits, "
                         f"{len(drafts)} drafts, {len(params_list)} params, {len(generators)} generators")
    return [verify(*args) for args in zip(logits_rows, drafts, params_list, generators)]


def _verify_greedy(greedy: torch.Tensor, draft: Draft) -> tuple[int, int]:
    targets = greedy.tolist()  # ties -> lowest id, as the Sampler's greedy rows
    num_accepted = 0
    while num_accepted < draft.num_tokens and draft.token_ids[num_accepted] == targets[num_accepted]:
        num_accepted += 1
    return num_accepted, targets[num_accepted]


def _verify_sampled(
    logits: torch.Tensor, draft: Draft, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, int]:
    k = draft.num_tokens
    p = torch.softmax(apply_filters(logits, [params] * (k + 1)), dim=-1)  # the Sampler's p_i
    if k == 0:
        return 0, _draw(p[0], generator)

    ids = torch.tensor(draft.token_ids, device=logits.device).unsqueeze(1)
    q = draft.probs.float() if draft.probs is not None else torch.zeros_like(p[:k]).scatter_(1, ids, 1.0)
    p_draft, q_draft = p[:k].gather(1, ids).squeeze(1), q.gather(1, ids).squeeze(1)
    u = torch.rand(k, generator=generator, device=logits.device)
    # Keep d with probability min(1, p(d)/q(d)), written u*q < p: p(d) == 0 never passes,
    # and q(d) == 0 (a proposer contradicting its own q) divides nothing by zero.
    accepted = (u * q_draft < p_draft).tolist()
    num_accepted = accepted.index(False) if False in accepted else k
    if num_accepted == k:
        return k, _draw(p[k], generator)

    residual = (p[num_accepted] - q[num_accepted]).clamp_min(0.0)
    # A rejection implies p(d) < q(d), hence mass of p elsewhere exceeding q's; only
    # rounding (or a q summing to more than 1) can leave none, and then p is the answer.
    if not residual.sum() > 0:
        residual = p[num_accepted]
    return num_accepted, _draw(residual, generator)


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """Token i with probability weights[i] / weights.sum(), drawn as the Sampler draws (V
    exponentials from `generator`), so an empty draft advances the generator exactly as a
    plain decode step does. Scale-free: no need to normalise."""
    return int(exponential_race(weights.unsqueeze(0), [0], [generator])[0])


def _logprobs(
    logits: torch.Tensor, normaliser: torch.Tensor, token_ids: tuple[int, ...], num_top: int | None
) -> tuple[tuple[float, ...], tuple[tuple[tuple[int, float], ...], ...] | None]:
    """Raw logprobs (logits - logsumexp, as the Sampler computes them) of the emitted
    tokens (token j comes from row j) and their top pairs."""
    rows = len(token_ids)
    logits, normaliser = logits[:rows], normaliser[:rows]
    ids = torch.tensor(token_ids, device=logits.device).unsqueeze(1)
    logprobs = tuple((logits.gather(1, ids).squeeze(1) - normaliser).tolist())
    if not num_top:
        return logprobs, None
    values, top_ids = logits.topk(num_top, dim=-1)
    values = values - normaliser.unsqueeze(1)
    top = tuple(tuple(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist()))
    return logprobs, top
