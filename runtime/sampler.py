"""Batched next-token sampling: one `SamplingParams` and one optional generator per row.

Per row, in this order:

0. Logits controls (`apply_logits_controls`), only for rows whose params ask for one:
   repetition penalty, then frequency and presence penalties, then logit_bias, then the
   min_tokens mask (EOS and stop ids at -inf). They read the row's tokens so far (a
   `TokenHistory`). The bias comes after the penalties so that it stays exactly additive
   (+100 forces a token, -100 bans it, whatever the penalties did); vLLM adds it before
   them, which differs only for tokens that carry both a bias and a repetition penalty.
   A batch where no row uses a control skips this step entirely. Last, rows with a
   grammar (structured output) get every token it forbids at -inf
   (`pdserve.runtime.structured_output`), so no control can re-enable one.
1. Greedy rows (`params.is_greedy`) take the argmax of those logits; ties go to the
   lowest token id (`torch.argmax` returns the first maximum), so they are deterministic.
2. Other rows divide the logits by their temperature, then filter:
   top-k -> top-p -> min-p, the order of vLLM's v0 sampler. (vLLM v1 applies min-p before
   top-k/top-p. top-k and min-p commute; only top-p and min-p differ by order, because
   top-p measures cumulative mass on what earlier filters left.) Each filter renormalises
   over the survivors of the previous one, and each keeps at least the most likely token.
3. The draw is an exponential race, argmax(probs / E) with E ~ Exponential(1) i.i.d.,
   which picks token i with probability probs[i]. A row with a generator draws its V
   exponentials from that generator alone, so a seeded request gets the same tokens
   whatever else shares its batch; rows without one share the default RNG.

Ties at a filter's boundary are kept, so the support depends on the values only, never on
how a sort orders equal values: top-k keeps every token whose logit equals the k-th
largest (possibly more than k tokens); top-p keeps every token whose probability equals
the smallest probability of the minimal prefix.

Returned logprobs are those of the model's raw distribution (log_softmax of the unmodified
logits: before the controls, temperature and filters), as vLLM returns by default. So a
token forced by logit_bias may report a low logprob, and a token masked by min_tokens
still has its raw logprob among the top alternatives.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple, Protocol

import torch

from pdserve.kernels.greedy import argmax_logsumexp
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.structured_output import GrammarMatcher, apply_grammar_masks


class SamplerOutput(NamedTuple):
    """What one sampling step produced for a batch of B rows.

    token_ids: [B] int64. logprobs: [B] float32, the sampled token's raw log-probability.
    top_logprob_ids / top_logprobs: [B, n] with n the largest `params.logprobs` in the
    batch, in descending order of log-probability; None when n is 0 (nobody asked for
    alternatives). Rows that asked for fewer than n slice their own prefix.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    top_logprob_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None

    def top_for(self, row: int, n: int | None) -> tuple[tuple[int, float], ...]:
        """Row `row`'s best n (token id, logprob) pairs, best first; () when n is 0/None."""
        if not n or self.top_logprob_ids is None:
            return ()
        return tuple(zip(self.top_logprob_ids[row, :n].tolist(), self.top_logprobs[row, :n].tolist()))


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with `seed` on `device`, or None (use the default RNG) if unseeded.

    The caller keeps it for the request's lifetime; each step advances it.
    """
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _row_tensor(values: list, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=logits.device)


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) what top-k, then top-p, removes; one descending sort serves both.

    top_k: [B] int64 in [1, V] (V = disabled). top_p: [B] float32 in (0, 1] (1 = disabled).
    """
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)

    # top-k: keep logits >= the k-th largest, so ties with it survive.
    kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
    keep = sorted_logits >= kth

    # top-p on the top-k survivors: the minimal prefix whose mass reaches top_p is every
    # position whose mass *before* it is still < top_p; position 0 (mass 0) always is,
    # even for a top_p that rounds to 0 in float32 (hence the clamp).
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    prefix_len = (mass_before < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True).clamp_(min=1)
    smallest_kept = probs.gather(1, prefix_len - 1)
    # top_p == 1 keeps everything: a float cumsum can reach 1.0 before a tiny tail does.
    keep_p = (probs >= smallest_kept) | (top_p >= 1.0).unsqueeze(1)
    keep_sorted = keep & keep_p

    keep_mask = torch.empty_like(keep_sorted).scatter_(1, sorted_ids, keep_sorted)
    return logits.masked_fill(~keep_mask, float("-inf"))


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is < min_p * (the row's largest probability)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_filters(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The logits each row samples from: temperature-scaled, removed tokens set to -inf.

    Pure: `logits` ([B, V] float32) is not modified. A greedy row keeps only its argmax
    (raw value, lowest id on ties). softmax of the result is the sampling distribution.
    """
    if logits.dim() != 2 or len(params) != logits.shape[0]:
        raise ValueError(
            f"apply_filters needs logits [B, V] and B params; got logits of shape "
            f"{tuple(logits.shape)} and {len(params)} params"
        )
    vocab = logits.shape[-1]
    greedy = [p.is_greedy for p in params]
    # Greedy rows get temperature 1 here (never divide by 0); their row is replaced below.
    temperature = _row_tensor(
        [1.0 if g else p.temperature for p, g in zip(params, greedy)], logits, logits.dtype
    )
    out = logits / temperature.unsqueeze(1)

    if any(not g and (p.top_k > 0 or p.top_p < 1.0) for p, g in zip(params, greedy)):
        top_k = _row_tensor(
            [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], logits, torch.int64
        )
        top_p = _row_tensor([float(p.top_p) for p in params], logits, logits.dtype)
        out = _apply_top_k_top_p(out, top_k, top_p)
    if any(not g and p.min_p > 0 for p, g in zip(params, greedy)):
        min_p = _row_tensor([float(p.min_p) for p in params], logits, logits.dtype)
        out = _apply_min_p(out, min_p)

    if any(greedy):
        rows = torch.tensor([i for i, g in enumerate(greedy) if g], device=logits.device)
        argmax = logits[rows].argmax(dim=-1, keepdim=True)
        only_argmax = torch.full_like(logits[rows], float("-inf"))
        only_argmax.scatter_(1, argmax, logits[rows].gather(1, argmax))
        out[rows] = only_argmax
    return out


class TokenHistory(Protocol):
    """What the logits controls read of one row's sequence; a `Request` is one.

    The last `output_offset` tokens of `prompt_ids` are output a migrated request carried
    from elsewhere: penalties on output (frequency, presence) and min_tokens count them as
    output, together with `output_ids`.
    """

    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    output_offset: int


def _output_tokens(history: TokenHistory) -> list[int]:
    carried = len(history.prompt_ids) - history.output_offset
    return list(history.prompt_ids[carried:]) + list(history.output_ids)


def _prompt_tokens(history: TokenHistory) -> Sequence[int]:
    return history.prompt_ids[:len(history.prompt_ids) - history.output_offset]


def _token_counts(sequences: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, vocab] float32: how often each token occurs in each sequence.

    One scatter_add over the sequences right-padded with id `vocab`, a spare column that
    is dropped (ids beyond the vocabulary land there too).
    """
    width = max((len(seq) for seq in sequences), default=0)
    padded = [list(seq) + [vocab] * (width - len(seq)) for seq in sequences]
    ids = torch.tensor(padded, dtype=torch.int64, device=device).reshape(len(sequences), width)
    ids.clamp_(min=0, max=vocab)
    counts = torch.zeros(len(sequences), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab]


def _require_histories(histories: Sequence[TokenHistory] | None, what: str) -> Sequence[TokenHistory]:
    if histories is None:
        raise ValueError(f"{what} read each row's tokens so far; pass histories (one TokenHistory "
                         "per row, e.g. the Request)")
    return histories


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
                    histories: Sequence[TokenHistory] | None) -> torch.Tensor:
    """Repetition penalty (over prompt and output), then frequency and presence penalties
    (over output), on the rows whose params set one. Pure; returns `logits` itself when no
    row has a penalty. Other rows are copied bit for bit."""
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return logits
    histories = _require_histories(histories, "penalties")
    vocab, device = logits.shape[1], logits.device
    row_params = [params[i] for i in rows]
    row_index = torch.tensor(rows, device=device)
    counts = _token_counts([_output_tokens(histories[i]) for i in rows], vocab, device)
    x = logits[row_index]
    if any(p.repetition_penalty != 1 for p in row_params):
        # Rows without a repetition penalty count no prompt: r = 1 leaves them as they are.
        prompts = [_prompt_tokens(histories[i]) if p.repetition_penalty != 1 else ()
                   for i, p in zip(rows, row_params)]
        seen = (_token_counts(prompts, vocab, device) > 0) | (counts > 0)
        r = _row_tensor([float(p.repetition_penalty) for p in row_params], logits, logits.dtype).unsqueeze(1)
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    frequency = _row_tensor([float(p.frequency_penalty) for p in row_params], logits, logits.dtype)
    presence = _row_tensor([float(p.presence_penalty) for p in row_params], logits, logits.dtype)
    x = x - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(x.dtype)
    out = logits.clone()
    out[row_index] = x
    return out


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Add each row's `logit_bias` to its logits. Pure; returns `logits` itself when no
    row has a bias. Raises ValueError for a token id outside the logits' vocabulary."""
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return logits
    vocab = logits.shape[1]
    row_ids = [i for i in rows for _ in params[i].logit_bias]
    token_ids = [token for i in rows for token, _ in params[i].logit_bias]
    biases = [bias for i in rows for _, bias in params[i].logit_bias]
    if max(token_ids) >= vocab:
        raise ValueError(f"logit_bias names token {max(token_ids)} but the vocabulary has {vocab} tokens")
    out = logits.clone()
    out.index_put_((_row_tensor(row_ids, logits, torch.int64), _row_tensor(token_ids, logits, torch.int64)),
                   _row_tensor(biases, logits, logits.dtype), accumulate=True)
    return out


def apply_min_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                     histories: Sequence[TokenHistory] | None, eos_token_ids: Collection[int]) -> torch.Tensor:
    """Set EOS (unless `ignore_eos`) and the stop token ids to -inf in rows that have not
    yet reached `min_tokens` output tokens. Pure; returns `logits` itself when no row is
    masked. Ids outside the logits' vocabulary cannot be sampled anyway and are skipped."""
    rows = [i for i, p in enumerate(params) if p.min_tokens > 0]
    if not rows:
        return logits
    histories = _require_histories(histories, "min_tokens")
    vocab = logits.shape[1]
    row_ids, token_ids = [], []
    for i in rows:
        p, history = params[i], histories[i]
        if history.output_offset + len(history.output_ids) >= p.min_tokens:
            continue
        stops = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | set(eos_token_ids)
        masked = sorted(t for t in stops if t < vocab)
        row_ids += [i] * len(masked)
        token_ids += masked
    if not token_ids:
        return logits
    out = logits.clone()
    out[_row_tensor(row_ids, logits, torch.int64), _row_tensor(token_ids, logits, torch.int64)] = float("-inf")
    return out


def apply_logits_controls(logits: torch.Tensor, params: Sequence[SamplingParams],
                          histories: Sequence[TokenHistory] | None = None,
                          eos_token_ids: Collection[int] = ()) -> torch.Tensor:
    """Step 0 of the module docstring: penalties, then logit_bias, then the min_tokens
    mask. Pure; returns `logits` itself (no copy, no work beyond one look at each row's
    params) when no row uses a control. `histories` may be None when no row has a
    penalty or min_tokens."""
    if not any(p.has_logits_controls for p in params):
        return logits
    out = apply_penalties(logits, params, histories)
    out = apply_logit_bias(out, params)
    return apply_min_tokens(out, params, histories, eos_token_ids)


class Sampler:
    """Picks one token per row of a logits batch; stateless, safe to share.

    `eos_token_ids`: the model's end-of-sequence ids, which min_tokens masks.
    """

    def __init__(self, eos_token_ids: Collection[int] = ()) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        histories: Sequence[TokenHistory] | None = None,
        grammars: Sequence[GrammarMatcher | None] | None = None,
    ) -> SamplerOutput:
        """Sample row i under params[i], drawing randomness only from generators[i].

        logits: [B, V] float32, not modified. A generator must live on logits' device.
        histories[i]: row i's tokens so far (its Request); needed only when some row has a
        penalty or min_tokens. grammars[i]: row i's grammar matcher or None (read, not
        advanced: the caller accepts the sampled token). Advances each given generator by one draw of V values
        (random rows only), and the default RNG if some random row has no generator.
        """
        if len(generators) != len(params):
            raise ValueError(
                f"got {len(params)} params but {len(generators)} generators; "
                "pass one generator (or None) per row"
            )
        logits = logits.float()
        # log_softmax(logits) == logits - logsumexp, computed only where it is read.
        token_ids, normaliser = argmax_logsumexp(logits)
        controlled = apply_logits_controls(logits, params, histories, self.eos_token_ids)
        controlled = apply_grammar_masks(controlled, grammars)
        if controlled is not logits:
            greedy_rows = [i for i, p in enumerate(params) if p.is_greedy
                           and (p.has_logits_controls or (grammars and grammars[i] is not None))]
            if greedy_rows:
                rows = torch.tensor(greedy_rows, device=logits.device)
                token_ids[rows] = argmax_logsumexp(controlled[rows])[0]

        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            probs = torch.softmax(apply_filters(controlled, params), dim=-1)
            sampled = exponential_race(probs, random_rows, generators)
            token_ids[random_rows] = sampled

        token_logprobs = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1) - normaliser
        n = max((p.logprobs or 0 for p in params), default=0)
        top_ids = top_values = None
        if n > 0:
            top_values, top_ids = logits.topk(n, dim=-1)
            top_values = top_values - normaliser.unsqueeze(1)
        return SamplerOutput(token_ids, token_logprobs, top_ids, top_values)


def exponential_race(
    probs: torch.Tensor, rows: list[int], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """argmax(probs[r] / E_r) for each r in rows, E_r drawn from generators[r] or the default.

    Only this draw loops over rows: a generator fills exactly its own row.
    """
    race = torch.empty_like(probs[rows])
    unseeded = [j for j, r in enumerate(rows) if generators[r] is None]
    if unseeded:
        race.exponential_()
    for j, r in enumerate(rows):
        if generators[r] is not None:
            race[j].exponential_(generator=generators[r])
    # Exponential draws can be exactly 0; clamping keeps 0/0 (a masked token) from giving
    # NaN while p/tiny stays finite for p <= 1 in float32.
    race.clamp_min_(torch.finfo(race.dtype).tiny)
    return (probs[rows] / race).argmax(dim=-1)
