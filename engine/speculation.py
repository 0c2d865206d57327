"""When and how much a decode worker speculates, and what it counts.

    Speculator.propose(decoding requests) -> {request id: Draft}          (before a step)
    Speculator.record(request id, proposed, accepted)                    (after verifying)

Speculation pays when a step is memory-bound: verifying k+1 positions costs about one
decode step, so every accepted token is a step saved. It does not pay when the batch is
large enough to be compute-bound, or when drafts are mostly rejected. So:

  - no drafts at all while more than `max_batch_size` requests decode;
  - per request, k adapts to its recent acceptance: after a step that accepted everything
    k grows by one (up to `num_tokens`), after one that accepted nothing it halves; a
    request whose k reached 0 rests for `rest_steps` steps, then tries k = 1 again;
  - a request whose params say `speculate=False` never gets a draft, nor does one whose
    logits controls depend on the draft position (`_position_dependent`): penalties read
    the tokens before each position, and min_tokens masks EOS at some positions only.
    Verification has no per-position history, so such a request decodes one token a step
    (its output is the same either way). logit_bias is the same at every position:
    `verify` applies it, and a bias-only request is speculated.

Counters (`proposed`, `accepted`, `accepted_at[i]`: drafts whose position i was
accepted, `steps`) feed the worker's metrics; acceptance rate per position is
accepted_at[i] / proposed_at[i].

Methods (`SpeculativeConfig.method`, in `pdserve.runtime.config`), each a `Proposer`:

    ngram    prompt lookup (`NgramProposer`); needs nothing but the request's tokens
    draft    a draft model (`DraftModelProposer`): the checkpoint `draft_model`, or the
             target's own first `draft_layers` layers (self-draft); needs the target's
             runner and runtime info, so build it with `make_proposer(config, runner, info)`
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.engine.draft_model import DraftModelProposer
from pdserve.engine.proposers import Draft, NgramProposer, Proposer
from pdserve.runtime.config import ConfigError, RuntimeInfo, SpeculativeConfig
from pdserve.runtime.model_runner import ModelRunner
from pdserve.runtime.request import Request
from pdserve.runtime.tokenizer import Tokenizer


def make_proposer(config: SpeculativeConfig, target: ModelRunner | None = None, info: RuntimeInfo | None = None,
                  tokenizer: Tokenizer | None = None) -> Proposer:
    """A new proposer for one engine. The draft method needs the target's `runner` and
    `info` (and checks the draft's whole vocabulary against `tokenizer` when given); it
    loads the draft model or builds the self-draft here."""
    if config.method == "ngram":
        return NgramProposer(max_n=config.ngram_max, min_n=config.ngram_min)
    if target is None or info is None:
        raise ConfigError("speculative method 'draft' needs the target model: build its proposer with "
                          "make_proposer(config, runner, info) and pass it to Speculator(config, proposer)")
    if config.draft_layers is not None:
        return DraftModelProposer.from_target_layers(target, info, config.draft_layers)
    return DraftModelProposer.from_checkpoint(config.draft_model, target, info, tokenizer)


def _position_dependent(request: Request) -> bool:
    """Whether the request's logits controls could differ between draft positions: it has
    a penalty, or has not reached min_tokens yet (past it, the mask is gone for good)."""
    params = request.params
    return params.has_penalties or request.output_offset + request.num_output_tokens < params.min_tokens


@dataclass
class _RequestState:
    k: int
    resting: int = 0  # steps left before trying again after k fell to 0


@dataclass
class Speculator:
    config: SpeculativeConfig
    proposer: Proposer = None  # type: ignore[assignment]  # set in __post_init__
    proposed: int = 0
    accepted: int = 0
    steps: int = 0  # steps that verified at least one draft
    proposed_at: list[int] = field(default_factory=list)  # per draft position
    accepted_at: list[int] = field(default_factory=list)
    _states: dict[str, _RequestState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.proposer is None:
            self.proposer = make_proposer(self.config)
        self.proposed_at = [0] * self.config.num_tokens
        self.accepted_at = [0] * self.config.num_tokens

    def propose(self, decoding: Sequence[Request]) -> dict[str, Draft]:
        """Drafts for this step's decoding requests (none when the batch is large)."""
        if not decoding or len(decoding) > self.config.max_batch_size:
            return {}
        chosen, ks = [], []
        for request in decoding:
            if not request.params.speculate or _position_dependent(request):
                continue
            state = self._states.setdefault(request.request_id, _RequestState(self.config.num_tokens))
            if state.k == 0:
                state.resting -= 1
                if state.resting > 0:
                    continue
                state.k = 1
            chosen.append(request)
            ks.append(state.k)
        if not chosen:
            return {}
        drafts = self.proposer.propose(chosen, ks)
        return {r.request_id: d for r, d in zip(chosen, drafts) if d.token_ids}

    def record(self, request_id: str, num_proposed: int, num_accepted: int) -> None:
        """A draft of `num_proposed` tokens was verified; the first `num_accepted` held."""
        self.steps += 1
        self.proposed += num_proposed
        self.accepted += num_accepted
        for i in range(num_proposed):
            self.proposed_at[i] += 1
            self.accepted_at[i] += i < num_accepted
        self.proposer.on_accepted(request_id, num_accepted)
        state = self._states.get(request_id)
        if state is None:
            return
        if num_accepted == num_proposed:
            state.k = min(state.k + 1, self.config.num_tokens)
        elif num_accepted == 0:
            state.k //= 2
            if state.k == 0:
                state.resting = self.config.rest_steps

    def forget(self, request_id: str) -> None:
        """The request ended."""
        self._states.pop(request_id, None)
        self.proposer.on_finished(request_id)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verifying step: accepted drafts plus the one the target adds."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0
