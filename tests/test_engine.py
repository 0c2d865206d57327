"""The decode engine against transformers: continuous batching, preemption, prefix reuse,
cancellation and the WAITING_FOR_KV seam, on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
from hf_oracle import explain_divergence, hf_greedy
from transformers import AutoModelForCausalLM

from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import CacheConfig, SchedulerConfig
from pdserve.runtime.forward_batch import ForwardBatch, SeqChunk
from pdserve.runtime.loader import load_model
from pdserve.runtime.request import RequestState
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason

BLOCK = 4


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_qwen2_dir"])
def tiny(request):
    path = request.getfixturevalue(request.param)
    loaded = load_model(str(path), cache=CacheConfig(block_size=BLOCK, num_blocks=1024))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return loaded, hf


@pytest.fixture(scope="module")
def oracle(tiny):
    """Memoised transformers greedy continuations: (prompt, n) -> tokens."""
    _, hf = tiny
    memo: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def expected(prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in memo:
            memo[key] = hf_greedy(hf, prompt, n)
        return memo[key]

    return expected


def _engine(loaded, num_blocks=None, prefix_caching=True, **scheduler) -> EngineCore:
    info = loaded.info
    if num_blocks is not None:  # a smaller pool over the same KV tensor
        info = type(info)(**{**info.__dict__, "num_blocks": num_blocks})
    config = SchedulerConfig(**{"max_num_seqs": 64, "max_num_batched_tokens": 64,
                                "max_prefill_chunk": 16, **scheduler})
    return EngineCore(loaded.runner, info, config, enable_prefix_caching=prefix_caching)


def _prompts(count: int, vocab: int, seed: int = 0, shared_prefix: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (shared_prefix,), generator=g).tolist()
    lengths = torch.randint(1, 40, (count,), generator=g).tolist()
    return [prefix + torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _drain(engine: EngineCore, outputs: dict[str, list[int]], max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not engine.has_unfinished:
            return
        for chunk in engine.step():
            outputs.setdefault(chunk.request_id, []).extend(chunk.token_ids)
    raise AssertionError(f"requests still unfinished after {max_steps} steps (starvation?)")


def _assert_no_leak(engine: EngineCore) -> None:
    """Every used block is held by the prefix cache and by nobody else."""
    assert engine.scheduler.allocator.num_used == engine.scheduler.prefix_cache.num_cached_blocks
    engine.scheduler.prefix_cache.evict(engine.scheduler.allocator.num_blocks)
    assert engine.scheduler.allocator.num_used == 0


def _check(tiny, prompt, got, expected):
    assert got == expected, explain_divergence(tiny[1], prompt, got, expected)


def test_36_requests_arriving_over_time_match_transformers(tiny, oracle):
    loaded, _ = tiny
    prompts = _prompts(36, loaded.runner.config.vocab_size, seed=1)
    prompts += [prompts[0] + [5, 6, 7], prompts[3][:9]]  # prefix hits, page-aligned or not
    max_tokens = [4 + (i * 7) % 13 for i in range(len(prompts))]
    engine = _engine(loaded)
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished:
        while pending and pending[0][0] <= step // 2:  # two new arrivals every step or so
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, _greedy(max_tokens[i]))
        for chunk in engine.step():
            outputs.setdefault(chunk.request_id, []).extend(chunk.token_ids)
        step += 1
    for i, prompt in enumerate(prompts):
        _check(tiny, prompt, outputs[str(i)], oracle(prompt, max_tokens[i]))
    _assert_no_leak(engine)


def test_prompts_beside_decodes_stay_within_their_budget_and_change_no_output(tiny, oracle):
    loaded, _ = tiny
    vocab = loaded.runner.config.vocab_size
    engine = _engine(loaded, max_prefill_tokens_while_decoding=5)
    short, long_prompt = _prompts(1, vocab, seed=3)[0], _prompts(1, vocab, seed=4, shared_prefix=30)[0]
    outputs: dict[str, list[int]] = {}

    def step() -> None:
        for delta in engine.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)

    engine.add_request("decoding", short[:6], _greedy(40))
    step()  # its whole prompt: nobody decodes yet, so no limit
    engine.add_request("prompt", long_prompt, _greedy(3))
    prompt = next(r for r in [*engine.scheduler.waiting, *engine.scheduler.running] if r.request_id == "prompt")
    progress = []
    while prompt.num_computed_tokens < len(long_prompt) - 1:
        before = prompt.num_computed_tokens
        step()
        progress.append(prompt.num_computed_tokens - before)
    # Beside a decoding request the prompt moves 5 tokens a step, not max_prefill_chunk (16).
    assert progress[0] == 5 and max(progress) == 5
    _drain(engine, outputs)
    _check(tiny, short[:6], outputs["decoding"], oracle(short[:6], 40))
    _check(tiny, long_prompt, outputs["prompt"], oracle(long_prompt, 3))


def test_preemption_in_a_tiny_pool_changes_no_output_and_starves_nobody(tiny, oracle):
    loaded, _ = tiny
    prompts = _prompts(10, loaded.runner.config.vocab_size, seed=2)
    # 14 blocks of 4 tokens: room for two or three sequences of up to ~40+20 tokens.
    engine = _engine(loaded, num_blocks=16)
    requests = [engine.add_request(str(i), p, _greedy(20)) for i, p in enumerate(prompts)]
    outputs: dict[str, list[int]] = {}
    _drain(engine, outputs, max_steps=2000)
    assert sum(r.num_preemptions for r in requests) > 0, "the pool was large enough: no preemption"
    for i, prompt in enumerate(prompts):
        assert requests[i].finish_reason is FinishReason.LENGTH
        _check(tiny, prompt, outputs[str(i)], oracle(prompt, 20))
    _assert_no_leak(engine)


def test_prefix_hits_give_the_same_output_as_cold_runs(tiny, oracle):
    loaded, _ = tiny
    prompts = _prompts(6, loaded.runner.config.vocab_size, seed=3, shared_prefix=22)
    warm, cold = _engine(loaded), _engine(loaded, prefix_caching=False)
    results = {}
    for name, engine in (("warm", warm), ("cold", cold)):
        outputs: dict[str, list[int]] = {}
        cached = []
        for i, prompt in enumerate(prompts):  # one after another: each can reuse the last
            request = engine.add_request(str(i), prompt, _greedy(8))
            _drain(engine, outputs)
            cached.append(request.num_cached_tokens)
        results[name] = (outputs, cached)
    assert results["warm"][0] == results["cold"][0]
    assert results["cold"][1] == [0] * 6
    # The 22-token shared prefix holds 5 full pages; later prompts reuse at least those.
    assert results["warm"][1][0] == 0 and min(results["warm"][1][1:]) >= 20
    for i, prompt in enumerate(prompts):
        _check(tiny, prompt, results["warm"][0][str(i)], oracle(prompt, 8))
    # A second turn extends prompt + answer: its whole history is cached.
    first = prompts[0] + results["warm"][0]["0"]
    request = warm.add_request("turn2", first + [9, 10], _greedy(4))
    outputs = {}
    _drain(warm, outputs)
    assert request.num_cached_tokens == (len(first) - 1) // BLOCK * BLOCK
    _check(tiny, first + [9, 10], outputs["turn2"], oracle(first + [9, 10], 4))
    _assert_no_leak(warm)
    _assert_no_leak(cold)


def test_requests_arriving_together_share_a_prefix_still_being_computed(tiny, oracle):
    loaded, _ = tiny
    prompts = _prompts(6, loaded.runner.config.vocab_size, seed=6, shared_prefix=30)
    engine = _engine(loaded, max_prefill_chunk=8, max_num_batched_tokens=32)
    requests = [engine.add_request(str(i), p, _greedy(6)) for i, p in enumerate(prompts)]
    outputs: dict[str, list[int]] = {}
    _drain(engine, outputs)
    # The first computes the 7 shared pages; the others wait for them instead of
    # recomputing them side by side.
    assert requests[0].num_cached_tokens == 0
    assert all(r.num_cached_tokens == 28 for r in requests[1:]), [r.num_cached_tokens for r in requests]
    for i, prompt in enumerate(prompts):
        _check(tiny, prompt, outputs[str(i)], oracle(prompt, 6))
    _assert_no_leak(engine)


def test_cancel_mid_decode_and_mid_prefill_frees_blocks_and_spares_others(tiny, oracle):
    loaded, _ = tiny
    vocab = loaded.runner.config.vocab_size
    g = torch.Generator().manual_seed(4)
    decoding, long_prompt, bystander = (torch.randint(3, vocab, (n,), generator=g).tolist()
                                        for n in (10, 60, 12))
    engine = _engine(loaded, prefix_caching=False, max_prefill_chunk=8, max_num_batched_tokens=16)
    engine.add_request("decoding", decoding, _greedy(50))
    engine.add_request("bystander", bystander, _greedy(12))
    outputs: dict[str, list[int]] = {}

    def step():
        for chunk in engine.step():
            outputs.setdefault(chunk.request_id, []).extend(chunk.token_ids)

    for _ in range(4):
        step()
    engine.add_request("prefilling", long_prompt, _greedy(5))
    step()
    step()
    sched = engine.scheduler
    prefilling = sched.requests["prefilling"]
    assert prefilling.state is RequestState.RUNNING and 0 < prefilling.num_computed_tokens < 60
    assert len(outputs["decoding"]) > 0
    used_before = sched.allocator.num_used
    held = len(sched.requests["decoding"].block_table) + len(prefilling.block_table)
    final = [engine.finish_request("decoding"), engine.finish_request("prefilling")]
    assert [c.finish_reason for c in final] == [FinishReason.ABORT] * 2
    assert sched.allocator.num_used == used_before - held  # freed at once, not a step later
    assert engine.finish_request("decoding") is None  # already gone
    _drain(engine, outputs)
    _check(tiny, bystander, outputs["bystander"], oracle(bystander, 12))
    assert sched.allocator.num_used == 0


def test_kv_from_elsewhere_is_admitted_through_waiting_for_kv(tiny, oracle):
    loaded, _ = tiny
    vocab = loaded.runner.config.vocab_size
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, vocab, (16,), generator=g).tolist()
    warmup, transferred = shared + [7, 8, 9], shared + torch.randint(3, vocab, (9,), generator=g).tolist()
    engine = _engine(loaded)
    engine.add_request("warmup", warmup, _greedy(3))
    _drain(engine, {})
    from pdserve.runtime.request import Request

    request = Request("remote", transferred, _greedy(10))
    assert engine.scheduler.reserve_remote(request)
    assert request.state is RequestState.WAITING_FOR_KV
    m = request.num_computed_tokens
    assert m == 16  # decode-side prefix hit: only positions [16, 25) must travel
    # Stand-in for the prefill worker: compute positions [m, n) into the reserved blocks.
    batch = ForwardBatch.build([SeqChunk(transferred[m:], m, request.block_table, True)],
                               BLOCK, "cpu")
    first_token = int(loaded.runner.execute(batch).argmax(-1))
    engine.scheduler.start_remote("remote", first_token)
    outputs = {"remote": [first_token]}
    _drain(engine, outputs)
    _check(tiny, transferred, outputs["remote"], oracle(transferred, 10))
    _assert_no_leak(engine)


def test_reservation_fails_cleanly_when_the_pool_is_full(tiny):
    loaded, _ = tiny
    from pdserve.runtime.request import Request

    engine = _engine(loaded, num_blocks=12, prefix_caching=False)
    first = Request("a", list(range(3, 43)), _greedy(4))  # 10 blocks
    second = Request("b", list(range(3, 23)), _greedy(4))  # 5 blocks: does not fit
    assert engine.scheduler.reserve_remote(first)
    assert not engine.scheduler.reserve_remote(second)
    assert second.block_table == [] and engine.scheduler.allocator.num_used == 10
    engine.finish_request("a")
    assert engine.scheduler.allocator.num_used == 0


def test_requests_that_can_never_run_are_rejected(tiny):
    loaded, _ = tiny
    engine = _engine(loaded, num_blocks=8)
    with pytest.raises(ValueError, match="context is"):
        engine.add_request("long", [5] * loaded.info.max_model_len, _greedy(1))
    with pytest.raises(ValueError, match="more KV blocks than the pool's 8"):
        engine.add_request("big", [5] * 30, _greedy(10))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], _greedy(1))
    engine.add_request("ok", [5, 6], _greedy(1))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", [5, 6], _greedy(1))
