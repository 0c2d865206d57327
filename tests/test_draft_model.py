"""Draft-model speculation: proposals are the draft model's own continuation, its KV pool
rolls back exactly and never leaks, greedy output is token-identical with it on or off,
and sampled output keeps its distribution even with a bad draft."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from engine_runs import run_to_completion

from pdserve.cluster.cli import main
from pdserve.engine.draft_model import DraftModelProposer
from pdserve.engine.engine import EngineCore
from pdserve.engine.proposers import EMPTY_DRAFT
from pdserve.engine.speculation import Speculator, make_proposer
from pdserve.runtime.config import CacheConfig, ConfigError, SchedulerConfig, SpeculativeConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.request import Request
from pdserve.runtime.sampling_params import SamplingParams

BLOCK = 4
GREEDY = {"temperature": 0.0, "ignore_eos": True}


# ---------------------------------------------------------------------------------------
# Checkpoints of the tiny Llama's tokenizer: a random small draft, a near copy of the
# target with sharpened logits, and a target whose embedding is padded past the draft's.
# ---------------------------------------------------------------------------------------


def _copy_tokenizer(source: Path, path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(source / name, path / name)


def _save_random_llama(path: Path, tokenizer_dir: Path, seed: int, **shape) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(initializer_range=0.1, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                         **shape)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    _copy_tokenizer(tokenizer_dir, path)
    return path


@pytest.fixture(scope="module")
def random_draft_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """An unrelated random Llama, 2 layers, hidden 32, tied embeddings, vocab 320."""
    return _save_random_llama(tmp_path_factory.mktemp("random_draft"), tiny_llama_dir, seed=7, vocab_size=320,
                              hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def sharpened_draft_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The target with noise on every layer matrix and its LM head times 3: its argmax is
    mostly the target's, its distribution much sharper, so sampled drafts are accepted
    about half the time and the rejections' residual draws matter."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("sharpened_draft")
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layers" in name and param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)
        model.lm_head.weight.mul_(3.0)
    model.save_pretrained(path)
    _copy_tokenizer(tiny_llama_dir, path)
    return path


@pytest.fixture(scope="module")
def wide_target_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """A target whose embedding has 352 rows for the 320-id tokenizer (as real models pad)."""
    return _save_random_llama(tmp_path_factory.mktemp("wide_target"), tiny_llama_dir, seed=5, vocab_size=352,
                              hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=False)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def _engine(model_dir, speculative: SpeculativeConfig | None, num_blocks: int = 512, **scheduler) -> EngineCore:
    loaded = load_model(str(model_dir), cache=CacheConfig(block_size=BLOCK, num_blocks=num_blocks))
    engine = EngineCore(loaded.runner, loaded.info, SchedulerConfig(**scheduler))
    if speculative is not None:
        # Built here rather than through `EngineCore(speculative=...)` to hand the proposer
        # the tokenizer too, so that it compares the whole vocabularies.
        engine.speculator = Speculator(speculative,
                                       make_proposer(speculative, loaded.runner, loaded.info, loaded.tokenizer))
    return engine


_run = run_to_completion


def _used_blocks(engine: EngineCore) -> int:
    s = engine.scheduler
    return s.allocator.num_used - s.prefix_cache.num_cached_blocks


def _draft(model_dir, num_blocks: int = 64, target_vocab: int = 320) -> DraftModelProposer:
    loaded = load_model(str(model_dir), cache=CacheConfig(block_size=BLOCK, num_blocks=num_blocks))
    return DraftModelProposer(loaded.runner, target_vocab, loaded.info.max_model_len)


def _greedy_continuation(model_dir, tokens: list[int], n: int) -> list[int]:
    return _run(_engine(model_dir, None), {"g": (tokens, SamplingParams(max_tokens=n, **GREEDY))})["g"]


def _draft_config(source: str, draft_dir, k: int, **options) -> SpeculativeConfig:
    options.setdefault("max_batch_size", 16)
    if source == "self-1-layer":
        return SpeculativeConfig(method="draft", num_tokens=k, draft_layers=1, **options)
    return SpeculativeConfig(method="draft", num_tokens=k, draft_model=str(draft_dir), **options)


# ---------------------------------------------------------------------------------------
# The proposer alone: what it proposes, and its KV blocks
# ---------------------------------------------------------------------------------------


def test_proposals_are_the_draft_models_greedy_continuation_before_and_after_a_rollback(random_draft_dir):
    proposer = _draft(random_draft_dir)
    request = Request("r", list(range(40, 57)), SamplingParams(max_tokens=50, **GREEDY))
    with torch.inference_mode():
        first = proposer.propose([request], [4])[0]
    expected = _greedy_continuation(random_draft_dir, request.prompt_ids, 4)
    assert first.token_ids == tuple(expected) and first.probs is None
    # Verification keeps 2 proposals and corrects the third: the draft KV of the first two
    # stays, the rest is recomputed from the corrected sequence.
    correction = (first.token_ids[2] + 1) % 320
    request.output_ids += [*first.token_ids[:2], correction]
    proposer.on_accepted("r", 2)
    with torch.inference_mode():
        second = proposer.propose([request], [3])[0]
    assert second.token_ids == tuple(_greedy_continuation(random_draft_dir, request.token_ids(0, 20), 3))
    proposer.on_finished("r")
    assert proposer.allocator.num_used == 0 and proposer.num_tracked == 0


def test_rollback_frees_whole_blocks_past_the_accepted_tokens(random_draft_dir):
    proposer = _draft(random_draft_dir)
    request = Request("r", list(range(40, 47)), SamplingParams(max_tokens=50, **GREEDY))  # 7 tokens
    with torch.inference_mode():
        proposer.propose([request], [3])
    # K/V written for the 7 tokens and the first 2 proposals: positions 0..8, 3 blocks of 4.
    assert proposer.allocator.num_used == 3
    proposer.on_accepted("r", 0)  # 7 tokens stay valid: 2 blocks
    assert proposer.allocator.num_used == 2
    request.output_ids.append(5)
    with torch.inference_mode():
        proposer.propose([request], [5])  # 8 tokens + 4 fed proposals: 3 blocks
    assert proposer.allocator.num_used == 3
    proposer.on_accepted("r", 5)  # everything fed was accepted: 12 valid positions
    assert proposer.allocator.num_used == 3
    proposer.on_finished("r")
    proposer.on_finished("r")  # a second finish (or an unknown id) is a no-op
    assert proposer.allocator.num_used == 0


def test_a_draft_the_scheduler_dropped_is_forgotten_at_the_next_proposal(random_draft_dir):
    """No verification, so no on_accepted: the request went on with one plain token."""
    proposer = _draft(random_draft_dir)
    request = Request("r", list(range(40, 47)), SamplingParams(max_tokens=50, **GREEDY))
    with torch.inference_mode():
        dropped = proposer.propose([request], [7])[0]
        assert proposer.allocator.num_used == 4  # 7 tokens + 6 fed proposals
        request.output_ids.append((dropped.token_ids[0] + 1) % 320)
        draft = proposer.propose([request], [2])[0]
    assert draft.token_ids == tuple(_greedy_continuation(random_draft_dir, request.token_ids(0, 8), 2))
    assert proposer.allocator.num_used == 3  # 8 tokens + 1 fed proposal; the stale ones dropped
    proposer.on_finished("r")
    assert proposer.allocator.num_used == 0


def test_a_request_the_draft_pool_cannot_hold_gets_no_draft(random_draft_dir):
    proposer = _draft(random_draft_dir, num_blocks=8)  # 32 positions
    small = Request("small", list(range(40, 50)), SamplingParams(max_tokens=50, **GREEDY))
    large = Request("large", list(range(60, 80)), SamplingParams(max_tokens=50, **GREEDY))
    with torch.inference_mode():
        drafts = proposer.propose([small, large], [3, 3])
    # small takes ceil(12 / 4) = 3 blocks; large needs ceil(22 / 4) = 6 of the 5 left.
    assert drafts[0].num_tokens == 3 and drafts[1] == EMPTY_DRAFT
    assert proposer.allocator.num_used == 3
    proposer.on_finished("small")
    with torch.inference_mode():
        assert proposer.propose([large], [3])[0].num_tokens == 3
    proposer.on_finished("large")
    assert proposer.allocator.num_used == 0


def test_drafts_respect_max_tokens_and_a_reused_request_id_starts_afresh(random_draft_dir):
    proposer = _draft(random_draft_dir)
    near_end = Request("r", list(range(40, 50)), SamplingParams(max_tokens=3, **GREEDY))
    near_end.output_ids.append(7)
    with torch.inference_mode():
        # 2 more tokens may be emitted, so at most 1 proposal (+ the verifier's own token).
        assert proposer.propose([near_end], [4])[0].num_tokens == 1
        other = Request("r", list(range(90, 95)), SamplingParams(max_tokens=50, **GREEDY))
        draft = proposer.propose([other], [2])[0]
    assert draft.token_ids == tuple(_greedy_continuation(random_draft_dir, other.prompt_ids, 2))
    assert proposer.allocator.num_used == 2  # 5 tokens + 1 fed proposal; the old table is gone
    proposer.on_finished("r")
    assert proposer.allocator.num_used == 0


def test_sampled_drafts_carry_q_padded_to_the_target_vocabulary(random_draft_dir):
    params = SamplingParams(max_tokens=50, temperature=1.0, top_k=2, seed=11)
    drafts = []
    for _ in range(2):  # a fresh proposer draws the same draft for the same seed
        proposer = _draft(random_draft_dir, target_vocab=352)
        with torch.inference_mode():
            drafts.append(proposer.propose([Request("r", list(range(40, 52)), params)], [3])[0])
    draft = drafts[0]
    assert draft.probs.shape == (3, 352)
    assert torch.all(draft.probs[:, 320:] == 0)
    torch.testing.assert_close(draft.probs.sum(dim=1), torch.ones(3))  # softmax rows: float32 rounding
    assert all(int((row > 0).sum()) <= 2 for row in draft.probs)  # top_k 2 (no exact ties here)
    assert all(draft.probs[i, t] > 0 for i, t in enumerate(draft.token_ids))
    assert drafts[1].token_ids == draft.token_ids and torch.equal(drafts[1].probs, draft.probs)


# ---------------------------------------------------------------------------------------
# Self-draft and configuration
# ---------------------------------------------------------------------------------------


def test_self_draft_shares_the_targets_weights(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), cache=CacheConfig(block_size=BLOCK, num_blocks=32))
    proposer = make_proposer(SpeculativeConfig(method="draft", draft_layers=2), loaded.runner, loaded.info)
    draft, target = proposer.runner.model, loaded.runner.model
    assert draft.embed_tokens is target.embed_tokens and draft.lm_head is target.lm_head
    assert draft.norm is target.norm
    assert list(draft.layers) == list(target.layers[:2])
    assert proposer.runner.pool.kv.shape[0] == 2  # its own pool, of 2 layers
    assert proposer.runner.pool.kv.data_ptr() != loaded.runner.pool.kv.data_ptr()
    with pytest.raises(ConfigError, match="draft_layers must be in"):
        make_proposer(SpeculativeConfig(method="draft", draft_layers=4), loaded.runner, loaded.info)


@pytest.mark.parametrize("options, message", [
    ({"method": "draft"}, "exactly one draft source"),
    ({"method": "draft", "draft_model": "m", "draft_layers": 1}, "exactly one draft source"),
    ({"method": "ngram", "draft_layers": 1}, "need speculative method 'draft'"),
    ({"method": "draft", "draft_layers": 0}, "draft_layers must be >= 1"),
])
def test_draft_config_is_validated(options, message):
    with pytest.raises(ConfigError, match=message):
        SpeculativeConfig(**options)


def test_draft_method_needs_the_target():
    with pytest.raises(ConfigError, match="needs the target model"):
        Speculator(SpeculativeConfig(method="draft", draft_layers=1))


def test_a_draft_of_another_tokenizer_is_refused(tiny_llama_dir, tiny_qwen2_dir, random_draft_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir), cache=CacheConfig(block_size=BLOCK, num_blocks=32))
    with pytest.raises(ConfigError, match="does not share the target's tokenizer.*BOS id None"):
        DraftModelProposer.from_checkpoint(str(tiny_qwen2_dir), loaded.runner, loaded.info)
    # Same special ids, different merges: only the vocabulary tells them apart.
    other_vocab = tmp_path / "other_vocab"
    shutil.copytree(random_draft_dir, other_vocab)
    shutil.copy(tiny_qwen2_dir / "tokenizer.json", other_vocab / "tokenizer.json")
    with pytest.raises(ConfigError, match="does not share the target's tokenizer.*token"):
        DraftModelProposer.from_checkpoint(str(other_vocab), loaded.runner, loaded.info, loaded.tokenizer)


def test_a_draft_with_a_larger_vocabulary_is_refused(tiny_llama_dir, wide_target_dir):
    loaded = load_model(str(tiny_llama_dir), cache=CacheConfig(block_size=BLOCK, num_blocks=32))
    with pytest.raises(ConfigError, match=r"vocabulary \(352 ids\) is larger than the target's \(320\)"):
        DraftModelProposer.from_checkpoint(str(wide_target_dir), loaded.runner, loaded.info, loaded.tokenizer)


@pytest.mark.parametrize("argv, message", [
    (["--draft-layers", "1"], "need --speculative draft"),
    (["--speculative", "draft"], "exactly one draft source"),
    (["--speculative", "ngram", "--draft-model", "m"], "need speculative method 'draft'"),
])
def test_serve_refuses_inconsistent_draft_flags(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# In the engine
# ---------------------------------------------------------------------------------------


def _mixed_batch(stop_token: int, probe: list[int]) -> dict[str, tuple[list[int], SamplingParams]]:
    requests = {f"r{i}": (list(range(40 + 7 * i, 58 + 10 * i)), SamplingParams(max_tokens=10 + 4 * i, **GREEDY))
                for i in range(3)}
    requests["eos"] = (list(range(100, 130)), SamplingParams(max_tokens=30, temperature=0.0))
    requests["stop"] = (probe, SamplingParams(max_tokens=40, stop_token_ids=[stop_token], **GREEDY))
    requests["max"] = (probe, SamplingParams(max_tokens=7, **GREEDY))
    requests["opted-out"] = (list(range(60, 85)), SamplingParams(max_tokens=15, speculate=False, **GREEDY))
    requests["long-prefill"] = (list(range(40, 140)), SamplingParams(max_tokens=9, **GREEDY))  # chunked
    # A seeded sampled request in the same batch: its tokens may differ with speculation.
    requests["sampled"] = (list(range(70, 90)), SamplingParams(max_tokens=12, temperature=0.8, seed=4,
                                                               ignore_eos=True))
    return requests


@pytest.fixture(scope="module")
def greedy_baseline(tiny_llama_dir):
    probe = list(range(150, 190))
    plain = _greedy_continuation(tiny_llama_dir, probe, 40)
    stop_token = plain[len(plain) // 2]
    requests = _mixed_batch(stop_token, probe)
    outputs = _run(_engine(tiny_llama_dir, None, max_prefill_chunk=16, max_num_batched_tokens=64), requests)
    assert outputs["stop"] == plain[:plain.index(stop_token) + 1] and outputs["max"] == plain[:7]
    return requests, outputs


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("source", ["random-model", "sharpened-model", "self-1-layer"])
def test_greedy_output_is_identical_with_a_draft(request, tiny_llama_dir, greedy_baseline, source, k):
    draft_dir = {"random-model": "random_draft_dir", "sharpened-model": "sharpened_draft_dir"}.get(source)
    draft_dir = request.getfixturevalue(draft_dir) if draft_dir else None
    requests, baseline = greedy_baseline
    engine = _engine(tiny_llama_dir, _draft_config(source, draft_dir, k),
                     max_prefill_chunk=16, max_num_batched_tokens=64)
    outputs = _run(engine, requests)
    sampled = outputs.pop("sampled")
    assert outputs == {r: tokens for r, tokens in baseline.items() if r != "sampled"}
    assert len(sampled) == 12
    assert engine.speculator.proposed > 0
    if source == "sharpened-model":  # runs of accepted tokens, and rejections
        assert 0 < engine.speculator.accepted < engine.speculator.proposed
    assert _used_blocks(engine) == 0
    assert engine.speculator.proposer.allocator.num_used == 0


def test_greedy_output_is_identical_when_the_target_pads_its_vocabulary(wide_target_dir, random_draft_dir):
    requests = {f"r{i}": (list(range(40 + 9 * i, 70 + 9 * i)), SamplingParams(max_tokens=20, **GREEDY))
                for i in range(3)}
    baseline = _run(_engine(wide_target_dir, None), requests)
    engine = _engine(wide_target_dir, _draft_config("random-model", random_draft_dir, 3))
    assert _run(engine, requests) == baseline
    assert engine.speculator.proposed > 0


@pytest.mark.parametrize("source", ["same-checkpoint", "self-all-layers"])
def test_a_draft_equal_to_the_target_is_always_accepted(tiny_llama_dir, greedy_baseline, source):
    requests, baseline = greedy_baseline
    if source == "same-checkpoint":
        config = SpeculativeConfig(method="draft", num_tokens=4, draft_model=str(tiny_llama_dir))
    else:
        config = SpeculativeConfig(method="draft", num_tokens=4, draft_layers=3)
    greedy = {r: v for r, v in requests.items() if r != "sampled"}
    engine = _engine(tiny_llama_dir, config, max_prefill_chunk=16, max_num_batched_tokens=64)
    assert _run(engine, greedy) == {r: baseline[r] for r in greedy}
    assert engine.speculator.proposed > 50
    assert engine.speculator.accepted == engine.speculator.proposed


def test_no_block_leaks_after_accepts_rejects_finishes_and_an_abort(tiny_llama_dir, sharpened_draft_dir):
    engine = _engine(tiny_llama_dir, _draft_config("sharpened-model", sharpened_draft_dir, 4), num_blocks=256)
    proposer = engine.speculator.proposer
    params = [SamplingParams(max_tokens=25, **GREEDY), SamplingParams(max_tokens=30, temperature=1.0, seed=2),
              SamplingParams(max_tokens=18, temperature=0.7, top_p=0.9, seed=3, ignore_eos=True)]
    for i in range(6):
        engine.add_request(f"r{i}", list(range(40 + 11 * i, 61 + 13 * i)), params[i % 3])
    engine.add_request("victim", list(range(200, 230)), SamplingParams(max_tokens=60, **GREEDY))
    with torch.inference_mode():
        for _ in range(4):
            engine.step()
        held = proposer.allocator.num_used
        victim_blocks = len(proposer._sequences["victim"].block_table)
        assert victim_blocks > 0
        engine.finish_request("victim")
        assert proposer.allocator.num_used == held - victim_blocks
        while engine.has_unfinished:
            engine.step()
    spec = engine.speculator
    assert 0 < spec.accepted < spec.proposed  # both accepts and rejects happened
    assert _used_blocks(engine) == 0
    assert proposer.allocator.num_used == 0 and proposer.num_tracked == 0


# ---------------------------------------------------------------------------------------
# The output distribution
# ---------------------------------------------------------------------------------------


def _pair_counts(model_dir, speculative, seeds, prompt):
    engine = _engine(model_dir, speculative, num_blocks=2048, max_num_seqs=64)
    requests = {f"s{seed}": (prompt, SamplingParams(max_tokens=3, temperature=1.0, top_k=2, seed=seed,
                                                    ignore_eos=True)) for seed in seeds}
    counts: dict[tuple[int, ...], int] = {}
    for tokens in _run(engine, requests).values():
        counts[tuple(tokens[1:3])] = counts.get(tuple(tokens[1:3]), 0) + 1
    return counts, engine


def _homogeneity_p_value(a: dict, b: dict) -> float:
    """Two-sample chi-square test of homogeneity over the union of cells."""
    cells = sorted(set(a) | set(b))
    n_a, n_b = sum(a.values()), sum(b.values())
    statistic = 0.0
    for cell in cells:
        pooled = (a.get(cell, 0) + b.get(cell, 0)) / (n_a + n_b)
        for observed, total in ((a.get(cell, 0), n_a), (b.get(cell, 0), n_b)):
            statistic += (observed - pooled * total) ** 2 / (pooled * total)
    dof = torch.tensor(float(len(cells) - 1))
    return 1.0 - torch.distributions.Chi2(dof).cdf(torch.tensor(statistic)).item()


def test_sampled_distribution_is_unchanged_with_a_bad_draft(tiny_llama_dir, sharpened_draft_dir):
    """The 2nd and 3rd output tokens (the 1st comes from prefill, before any draft) at
    temperature 1 with top_k 2: at most 4 cells per token pair. The draft's q is three
    times sharper than the target's p, so about half its proposals are rejected and the
    residual max(0, p - q) decides the rest. Seeds are fixed: the test is deterministic."""
    seed_prompt = list(range(60, 80))
    prompt = seed_prompt + _greedy_continuation(tiny_llama_dir, seed_prompt, 80)
    off, _ = _pair_counts(tiny_llama_dir, None, range(1200), prompt)
    config = _draft_config("sharpened-model", sharpened_draft_dir, 2, max_batch_size=64)
    on, engine = _pair_counts(tiny_llama_dir, config, range(10_000, 11_200), prompt)
    p_value = _homogeneity_p_value(off, on)
    assert p_value > 0.01, (p_value, off, on)
    spec = engine.speculator
    assert spec.proposed > 1000
    assert 200 < spec.accepted < spec.proposed - 200  # both branches of the rule were taken
