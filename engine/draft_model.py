"""Draft-model speculation: a smaller model of the same tokenizer proposes the next tokens.

`DraftModelProposer` runs a draft model with its own paged KV pool and block allocator on
the decode worker; it owns both and nothing else touches them. Two ways to get the draft:

    DraftModelProposer.from_checkpoint(path, target, info)   a second, smaller checkpoint
    DraftModelProposer.from_target_layers(target, info, N)   self-draft (layer skip): the
        target's first N layers, final norm and LM head, sharing the target's weights

One `propose` per engine step, for the decoding requests the speculator chose:

  1. catch up: one batched forward over every request's tokens whose K/V the draft pool
     does not hold yet; its last row's logits give each request's first proposal;
  2. k - 1 batched decode steps, each feeding every still-growing draft its last proposal
     (each request has its own k, so the batch shrinks as drafts complete).

Greedy requests get the draft's argmax as a point mass (q None), which is all greedy
verification compares. Sampled requests draw from q = softmax(apply_filters(draft logits,
params)), padded with zeros to the target's vocabulary, so the rejection rule keeps the
target's distribution whatever the draft says. The draws come from a per-request generator
derived from the request's seed (a different stream from the request's own generator,
which only verification advances), so a seeded request stays reproducible.

Where the draft's KV comes from: under disaggregation the prefill worker ships only the
target's KV, so the draft builds its own here from the prompt ids the decode worker
already has. Cost: the first draft of a request waits for the draft's prefill of the whole
prompt, run inside the decode step after the request's first token (about the target's
prefill time scaled by the draft's size; e.g. 1/4 of it for a 1-of-4-layers self-draft).
The first token is never delayed, but that step is longer for every request in the batch:
the other requests see one slower inter-token gap, and a request whose first token is
sampled in that step (local prefill) sees a later first token. Shipping draft KV from the
prefill worker would avoid it at the price of a second KV stream per request.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pdserve.engine.proposers import EMPTY_DRAFT, Draft, Proposer
from pdserve.runtime.block_allocator import BlockAllocator
from pdserve.runtime.config import (
    CacheConfig,
    ConfigError,
    DeviceConfig,
    ModelConfig,
    RuntimeInfo,
    SpeculativeConfig,
)
from pdserve.runtime.forward_batch import ForwardBatch, SeqChunk
from pdserve.runtime.kv_pool import KVPool
from pdserve.runtime.loader import LoadedModel, load_model
from pdserve.runtime.model_runner import DecodeGraphRunner, ModelRunner
from pdserve.runtime.request import Request
from pdserve.runtime.sampler import apply_filters
from pdserve.runtime.tokenizer import Tokenizer
from pdserve.runtime.weights import load_checkpoint

# Mixes a request's seed into the seed of its draft generator (a 64-bit LCG step), so that
# drafting and verification draw from different streams of the same seed.
_SEED_MULTIPLIER, _SEED_INCREMENT = 6364136223846793005, 1442695040888963407


class LayerSkipModel(nn.Module):
    """The first `num_layers` decoder layers of `target`, then its final norm and LM head.

    Holds references to the target's parameters and modules: nothing is copied, so a
    self-draft costs only its KV pool. Decoder layer i reads and writes layer i of the pool
    it is given, so that pool needs `num_layers` layers. The forward and the logits are
    the target class's own, run over this object's shorter `layers`; they read only
    `kernels`, `embed_tokens`, `embed_blocks`, `layers`, `fused_layers`, `norm`,
    `cos_sin_cache`, `lm_head` and `head_blocks`.
    """

    def __init__(self, target: nn.Module, num_layers: int) -> None:
        super().__init__()
        if not 1 <= num_layers <= len(target.layers):
            raise ConfigError(f"draft_layers must be in [1, {len(target.layers)}] (the target's layers), "
                              f"got {num_layers}")
        self.config = dataclasses.replace(target.config, num_layers=num_layers)
        self.kernels = target.kernels
        self.embed_tokens = target.embed_tokens
        self.embed_blocks = target.embed_blocks
        self.layers = target.layers[:num_layers]
        self.norm = target.norm
        self.lm_head = target.lm_head
        self.head_blocks = target.head_blocks
        # The target's layers as one C++ call, if fused: it runs the first num_layers.
        self.fused_layers = target.fused_layers
        self.cos_sin_cache = target.cos_sin_cache
        # The layers call the target's kernel objects, whose attention backend keeps the
        # metadata of the batch last prepared. Sharing them is safe because every forward
        # prepares its own batch first and forwards never interleave (one engine thread).
        self._target_class = type(target)

    def forward(self, batch: ForwardBatch, pool: KVPool, on_layer_done=None) -> torch.Tensor:
        return self._target_class.forward(self, batch, pool, on_layer_done)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._target_class.compute_logits(self, hidden)


@dataclass
class _DraftSequence:
    """What the draft pool holds for one request:

        positions 0 ....... num_cached | ... + len(speculated) | ... len(block_table) * block_size
                  the request's tokens | proposals of the last | reserved, not written
                  (valid K/V)          | draft, not verified   |

    Invariant: num_cached <= the request's length, tokens [0, num_cached) are the
    request's and their K/V are valid; the block table covers at least num_cached +
    len(speculated) positions.
    """

    owner: weakref.ref  # the Request: a reused request id is a different sequence
    generator: torch.Generator | None  # draws of sampled drafts; None: the default RNG
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    speculated: tuple[int, ...] = ()


@dataclass
class _GrowingDraft:
    """One request's draft while `propose` builds it."""

    request: Request
    sequence: _DraftSequence
    k: int
    token_ids: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)  # q rows; none for greedy requests

    @property
    def draft(self) -> Draft:
        return Draft(tuple(self.token_ids), torch.stack(self.probs) if self.probs else None)


def draft_kv_share(config: SpeculativeConfig | None, target: ModelConfig) -> float:
    """The bytes of a draft pool's block over those of the target pool's block (both pools
    have as many blocks, of the same size and dtype): what `CacheConfig.draft_kv_share`
    needs so the KV memory limit covers both pools. 0 when the method has no draft pool."""
    if config is None or config.method != "draft":
        return 0.0
    if config.draft_layers is not None:
        return min(config.draft_layers, target.num_layers) / target.num_layers
    draft = load_checkpoint(config.draft_model).config  # metadata only
    return (draft.num_layers * draft.num_kv_heads * draft.head_dim) / (
        target.num_layers * target.num_kv_heads * target.head_dim)


class DraftModelProposer(Proposer):
    """Proposes with a draft model over its own KV pool; see the module docstring.

    `runner` is the draft's model runner, whose pool belongs to this proposer alone.
    `target_vocab_size` is the width of the target's logits, which each q is padded to.
    Drafts never run past `max_model_len` tokens (the smaller of the two contexts).

    Memory: a request holds draft blocks from its first draft until `on_finished`. When
    the pool cannot hold a request's next draft, that request gets no draft this step
    (it decodes one token as usual) and keeps what it holds.
    """

    def __init__(self, runner: ModelRunner, target_vocab_size: int, max_model_len: int) -> None:
        if runner.config.vocab_size > target_vocab_size:
            raise ConfigError(f"the draft model's vocabulary ({runner.config.vocab_size} ids) is larger than "
                              f"the target's ({target_vocab_size}); use a draft of the target's tokenizer")
        self.runner = runner
        self.target_vocab_size = target_vocab_size
        self.max_model_len = max_model_len
        self.allocator = BlockAllocator(runner.pool.num_blocks)
        self._sequences: dict[str, _DraftSequence] = {}

    @classmethod
    def from_checkpoint(cls, model: str, target: ModelRunner, info: RuntimeInfo,
                        tokenizer: Tokenizer | None = None) -> DraftModelProposer:
        """Load the draft `model` (HF directory or GGUF) where the target runs, with as
        many KV blocks as the target's pool. Raises ConfigError when the draft's
        tokenizer differs from the target's: its BOS/EOS ids always, and with the
        target's `tokenizer` its whole vocabulary."""
        placement = DeviceConfig(device=str(target.device), dtype=target.config.dtype,
                                 kernels=target.model.kernels.name, cuda_graphs=target.graphs is not None,
                                 compile=target.placement.compiled)
        draft = load_model(model, cache=CacheConfig(block_size=info.block_size, num_blocks=info.num_blocks),
                           device_config=placement)
        _check_same_tokenizer(model, draft, info, tokenizer)
        context = min(info.max_model_len, draft.runner.config.max_position_embeddings)
        return cls(draft.runner, target.config.vocab_size, context)

    @classmethod
    def from_target_layers(cls, target: ModelRunner, info: RuntimeInfo, num_layers: int) -> DraftModelProposer:
        """Self-draft: the target's first `num_layers` layers (see `LayerSkipModel`) over a
        pool of that many layers and as many blocks as the target's."""
        model = LayerSkipModel(target.model, num_layers)
        cache = CacheConfig(block_size=info.block_size, num_blocks=info.num_blocks, dtype=target.pool.dtype)
        pool = KVPool.for_model(model.config, cache, target.device)
        graphs = None
        if target.graphs is not None:
            graphs = DecodeGraphRunner(model, pool, target.graphs.max_pages)
        return cls(ModelRunner(model, pool, graphs, target.placement), target.config.vocab_size, info.max_model_len)

    @property
    def block_size(self) -> int:
        return self.runner.pool.block_size

    @property
    def num_tracked(self) -> int:
        """Requests holding draft state (until `on_finished`)."""
        return len(self._sequences)

    def propose(self, requests: Sequence[Request], num_tokens: Sequence[int]) -> list[Draft]:
        """See `Proposer.propose`. Runs the draft model max(k) times and grows the draft
        pool by the blocks the new drafts need."""
        if len(requests) != len(num_tokens):
            raise ValueError(f"got {len(requests)} requests but {len(num_tokens)} draft lengths")
        drafts = [EMPTY_DRAFT] * len(requests)
        growing: dict[int, _GrowingDraft] = {}  # by position in `requests`
        for i, (request, k) in enumerate(zip(requests, num_tokens)):
            # A step emits at most k + 1 tokens; all must fit the context and max_tokens.
            k = min(k, self.max_model_len - request.num_tokens - 1,
                    request.params.max_tokens - request.num_output_tokens - 1)
            if k <= 0:
                continue
            sequence = self._sequence_for(request)
            # The draft writes K/V up to position L + k - 2 (its last proposal is not fed).
            if self._reserve(sequence, request.num_tokens + k - 1):
                growing[i] = _GrowingDraft(request, sequence, k)
        if growing:
            self._run(list(growing.values()))
        for i, draft in growing.items():
            drafts[i] = draft.draft
        return drafts

    def on_accepted(self, request_id: str, num_accepted: int) -> None:
        """Keep the K/V of the accepted proposals; drop the rest and their whole blocks."""
        sequence = self._sequences.get(request_id)
        if sequence is not None:
            self._truncate(sequence, sequence.num_cached + min(num_accepted, len(sequence.speculated)))

    def on_finished(self, request_id: str) -> None:
        """Free the request's draft blocks. Safe for unknown ids."""
        sequence = self._sequences.pop(request_id, None)
        if sequence is not None:
            self.allocator.free(sequence.block_table)

    # ------------------------------------------------------------------ internals

    def _sequence_for(self, request: Request) -> _DraftSequence:
        """The request's draft state, new when the id is unseen or names another request.
        Proposals of a draft that was never verified (the scheduler dropped it) are
        dropped too."""
        sequence = self._sequences.get(request.request_id)
        if sequence is not None and sequence.owner() is not request:
            self.on_finished(request.request_id)
            sequence = None
        if sequence is None:
            generator = None
            if request.params.seed is not None:
                generator = torch.Generator(device=self.runner.device)
                generator.manual_seed((request.params.seed * _SEED_MULTIPLIER + _SEED_INCREMENT) % 2**64)
            sequence = self._sequences[request.request_id] = _DraftSequence(weakref.ref(request), generator)
        if sequence.speculated:
            self._truncate(sequence, sequence.num_cached)
        return sequence

    def _reserve(self, sequence: _DraftSequence, num_positions: int) -> bool:
        """Grow the block table to cover `num_positions`; False (nothing taken) if the
        pool is short."""
        missing = -(-num_positions // self.block_size) - len(sequence.block_table)
        if missing > self.allocator.num_free:
            return False
        if missing > 0:
            sequence.block_table.extend(self.allocator.allocate(missing))
        return True

    def _truncate(self, sequence: _DraftSequence, num_valid: int) -> None:
        """Only tokens [0, num_valid) stay; blocks past them go back to the pool."""
        sequence.num_cached, sequence.speculated = num_valid, ()
        keep = -(-num_valid // self.block_size)
        if len(sequence.block_table) > keep:
            self.allocator.free(sequence.block_table[keep:])
            del sequence.block_table[keep:]

    def _run(self, drafts: list[_GrowingDraft]) -> None:
        """The catch-up forward, then decode steps until every draft has its k tokens."""
        chunks = []
        for d in drafts:
            # At least the last token is fed, its logits giving the first proposal; K/V
            # past the sequence's end (there when a proposal was rejected) is never read
            # and is overwritten as the new proposals are fed.
            start = min(d.sequence.num_cached, d.request.num_tokens - 1)
            chunks.append(SeqChunk(d.request.token_ids(start, d.request.num_tokens), start,
                                   d.sequence.block_table, True))
            d.sequence.num_cached = d.request.num_tokens
        logits = self._execute(chunks)
        while True:  # row r of `logits` belongs to drafts[r]
            tokens, probs = self._draw(logits, drafts)
            for d, token, q in zip(drafts, tokens, probs):
                d.token_ids.append(token)
                if q is not None:
                    d.probs.append(q)
            drafts = [d for d in drafts if len(d.token_ids) < d.k]
            if not drafts:
                return
            for d in drafts:
                d.sequence.speculated = tuple(d.token_ids)
            logits = self._execute([SeqChunk(d.token_ids[-1:], d.request.num_tokens + len(d.token_ids) - 1,
                                             d.sequence.block_table, True) for d in drafts])

    def _execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        batch = ForwardBatch.build(chunks, self.block_size, self.runner.device)
        # Ids past the draft's vocabulary (rows only the target's embedding pads to) read as
        # the draft's last id: a worse guess at worst, never an out-of-range lookup.
        batch.input_ids.clamp_(max=self.runner.config.vocab_size - 1)
        return self.runner.execute(batch)

    def _draw(self, logits: torch.Tensor, drafts: list[_GrowingDraft]):
        """One proposal per row: greedy rows the argmax (q None), sampled rows a draw from
        q = softmax(apply_filters(logits, params)), returned padded to the target's vocab."""
        tokens = logits.argmax(dim=-1)
        probs: list[torch.Tensor | None] = [None] * len(drafts)
        sampled = [r for r, d in enumerate(drafts) if not d.request.params.is_greedy]
        if sampled:
            q = torch.softmax(apply_filters(logits[sampled], [drafts[r].request.params for r in sampled]), dim=-1)
            # Exponential race, as the Sampler draws: argmax(q / E) picks i with probability q[i].
            race = torch.empty_like(q)
            for j, r in enumerate(sampled):
                race[j].exponential_(generator=drafts[r].sequence.generator)
            race.clamp_min_(torch.finfo(race.dtype).tiny)
            tokens[sampled] = (q / race).argmax(dim=-1)
            padded = q.new_zeros(len(sampled), self.target_vocab_size)
            padded[:, :q.shape[1]] = q
            for j, r in enumerate(sampled):
                probs[r] = padded[j]
        return tokens.tolist(), probs


def _check_same_tokenizer(model: str, draft: LoadedModel, info: RuntimeInfo, tokenizer: Tokenizer | None) -> None:
    """Raise ConfigError naming the first difference between the draft's tokenizer and the
    target's (its `info`, and its `tokenizer` when known)."""
    differences = []
    if draft.info.bos_token_id != info.bos_token_id:
        differences.append(f"BOS id {draft.info.bos_token_id} vs the target's {info.bos_token_id}")
    if draft.info.eos_token_ids != info.eos_token_ids:
        differences.append(f"end ids {sorted(draft.info.eos_token_ids)} vs the target's {sorted(info.eos_token_ids)}")
    if tokenizer is not None:
        theirs = draft.tokenizer
        if theirs.vocab_size != tokenizer.vocab_size:
            differences.append(f"{theirs.vocab_size} tokens vs the target's {tokenizer.vocab_size}")
        else:
            token = next((i for i in range(tokenizer.vocab_size)
                          if theirs.token_text(i) != tokenizer.token_text(i)), None)
            if token is not None:
                differences.append(f"token {token} is {theirs.token_text(token)!r} vs the target's "
                                   f"{tokenizer.token_text(token)!r}")
    if differences:
        raise ConfigError(f"draft model {model!r} does not share the target's tokenizer ({'; '.join(differences)}); "
                          "a draft must be a model of the same tokenizer (e.g. a smaller one of the same "
                          "family), or use a self-draft of the target's first layers (draft_layers)")
