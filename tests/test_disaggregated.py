"""Prefill -> decode in one process over an in-memory link (and over nixl, whose channel
reads the prefill pool in place, so the prefill engine holds pushed pages until the
transfer settles): the engines, the ticket handshake, layer-wise pushes and the failure
policies. (Transports between OS processes are covered in test_kv_transports.py and
test_disaggregated_processes.py.)"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from pdserve.engine.engine import EngineCore
from pdserve.kv_transfer import layout, messages
from pdserve.kv_transfer.decode_side import OnTransferFailure
from pdserve.kv_transfer.messages import PrefillJob
from pdserve.kv_transfer.pusher import KVPusher
from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.transports import connect, listen
from pdserve.prefill_worker.engine import PrefillEngine
from pdserve.runtime.config import CacheConfig, SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason
from pdserve.runtime.structured_output import GrammarCompiler

BLOCK = 4


class LoopbackChannel:
    """A link that hands every message to a receiver in this process, through the wire
    encoding, optionally tampering with chunks on the way."""

    def __init__(self, receiver: KVReceiver, tamper=None) -> None:
        self.receiver = receiver
        self.tamper = tamper or (lambda header, payload: (header, payload))
        self.chunks = 0

    def send_pages(self, header, payload, wait: bool = True) -> None:  # always waits
        header, payload = self.tamper(messages.decode(messages.encode(header)), bytes(payload))
        self.chunks += 1
        self.receiver.accept_pages(header, payload)

    def send_done(self, done) -> None:
        self.receiver.accept_done(messages.decode(messages.encode(done)))

    def send_abort(self, abort) -> None:
        self.receiver.accept_abort(messages.decode(messages.encode(abort)))

    def close(self) -> None:
        pass


def _grammars(loaded) -> GrammarCompiler:
    return GrammarCompiler(loaded.tokenizer, loaded.runner.config.vocab_size, loaded.info.eos_token_ids)


class Pair:
    """A prefill engine and a decode engine with their own pools, linked in memory."""

    def __init__(self, path, tamper=None, on_failure=OnTransferFailure.RECOMPUTE, timeout=30.0, grammars=False,
                 transport="loopback"):
        cache = CacheConfig(block_size=BLOCK, num_blocks=256)
        config = SchedulerConfig(max_num_batched_tokens=32, max_prefill_chunk=8)
        self.p_model = load_model(str(path), cache=cache)
        self.d_model = load_model(str(path), cache=cache)
        self.receiver = KVReceiver(self.d_model.runner.pool)
        self.transport = transport
        self.listener = None
        if transport == "loopback":
            self.address = "loopback"
            self.channel = LoopbackChannel(self.receiver, tamper)
            self.pusher = KVPusher(self.p_model.runner.pool, lambda address: self.channel)
        else:
            self.listener = listen(transport, self.receiver)
            self.address = self.listener.address
            self.pusher = KVPusher(self.p_model.runner.pool, lambda address: connect(address, timeout=10.0))
        # grammars: each engine compiles structured outputs for its own copy of the model.
        p_grammars, d_grammars = (_grammars(self.p_model), _grammars(self.d_model)) if grammars else (None, None)
        self.prefill = PrefillEngine(self.p_model.runner, self.p_model.info, self.pusher, config,
                                     grammars=p_grammars)
        self.decode = EngineCore(self.d_model.runner, self.d_model.info, config,
                                 kv_receiver=self.receiver, on_transfer_failure=on_failure,
                                 transfer_timeout=timeout, grammars=d_grammars)

    def run(self, request_id, prompt, params, max_steps=500):
        ticket = self.decode.add_remote_request(request_id, prompt, params)
        assert ticket is not None
        self.prefill.add_job(PrefillJob(ticket, self.address, prompt, params))
        tokens, reasons = [], []
        for _ in range(max_steps):
            if self.prefill.has_unfinished:
                self.prefill.step()
            for chunk in self.decode.step():
                tokens.extend(chunk.token_ids)
                reasons.append(chunk.finish_reason)
            if not self.decode.has_unfinished and not self.prefill.has_unfinished:
                return tokens, reasons[-1], ticket
            time.sleep(0.001)  # let the pusher thread run
        raise AssertionError("transfer did not settle")

    def close(self):
        self.pusher.close()
        if self.listener is not None:
            self.listener.close()


@pytest.fixture(scope="module")
def colocated(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), cache=CacheConfig(block_size=BLOCK, num_blocks=256))
    engine = EngineCore(loaded.runner, loaded.info, enable_prefix_caching=False)

    def run(prompt, params):
        engine.add_request("ref", prompt, params)
        tokens = []
        while engine.has_unfinished:
            for chunk in engine.step():
                tokens.extend(chunk.token_ids)
        return tokens

    return run


@pytest.fixture(params=["loopback", "nixl", "gloo"])
def pair(request, tiny_llama_dir):
    pair = Pair(tiny_llama_dir, transport=request.param)
    yield pair
    pair.close()


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _pool_usage(pair: Pair) -> tuple[int, int]:
    """Blocks in use on each side beyond what the prefix caches hold."""
    p, d = pair.prefill.scheduler, pair.decode.scheduler
    return (p.allocator.num_used - p.prefix_cache.num_cached_blocks,
            d.allocator.num_used - d.prefix_cache.num_cached_blocks)


GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def test_transferred_kv_decodes_like_the_colocated_engine(pair, colocated):
    for i, n in enumerate((1, 7, 8, 21)):  # one token, a partial page, a page edge, chunked
        prompt = _prompt(n, seed=i)
        tokens, reason, _ = pair.run(f"r{i}", prompt, GREEDY)
        assert tokens == colocated(prompt, GREEDY)
        assert reason is FinishReason.LENGTH
    assert pair.decode.remote.counts["succeeded"] == 4
    assert _pool_usage(pair) == (0, 0)
    assert pair.receiver.num_live == 0
    # The wait for the KV (ticket .. settled) holds the transfer itself (first page .. settled).
    remote = pair.decode.remote
    assert 0 < remote.total_receive_seconds <= remote.total_kv_wait_seconds


def test_seeded_sampling_continues_as_in_one_process(pair, colocated):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    prompt = _prompt(13, seed=5)
    tokens, _, _ = pair.run("seeded", prompt, params)
    assert tokens == colocated(prompt, params)


def test_decode_prefix_hit_moves_only_the_delta(pair, colocated):
    shared = _prompt(16, seed=7)
    first, second = shared + [9, 10, 11], shared + [12, 13, 14, 15, 16]
    pair.run("first", first, GREEDY)
    payload_before = pair.pusher.bytes_sent
    tokens, _, ticket = pair.run("second", second, GREEDY)
    assert ticket.first_page == 4  # 16 shared tokens = 4 pages already on the decode side
    assert len(ticket.block_ids) == 2  # pages 4 and 5 (tokens 16..20) travel
    lay = ticket.layout
    assert pair.pusher.bytes_sent - payload_before == lay.num_layers * layout.chunk_nbytes(lay, 2)
    assert tokens == colocated(second, GREEDY)


def test_corrupted_chunk_is_rejected_and_decode_recomputes(tiny_llama_dir, colocated):
    def flip_a_byte(header, payload):
        payload = bytearray(payload)
        payload[len(payload) // 2] ^= 0xFF
        return header, payload

    pair = Pair(tiny_llama_dir, tamper=flip_a_byte)
    try:
        prompt = _prompt(11, seed=3)
        tokens, _, _ = pair.run("corrupt", prompt, GREEDY)
        assert tokens == colocated(prompt, GREEDY)
        assert pair.decode.remote.counts["failed_recomputed"] == 1
        assert "checksum" in pair.decode.remote.failure_reasons["corrupt"]
        assert pair.receiver.num_rejected == 1
        assert _pool_usage(pair) == (0, 0)
    finally:
        pair.close()


def test_failure_policy_fail_ends_the_request_with_an_error(tiny_llama_dir):
    def wrong_secret(header, payload):
        return dataclasses.replace(header, secret=b"\0" * 16), payload

    pair = Pair(tiny_llama_dir, tamper=wrong_secret, on_failure=OnTransferFailure.FAIL, timeout=0.5)
    try:
        started = time.time()
        tokens, reason, _ = pair.run("foreign", _prompt(9, seed=4), GREEDY)
        # A foreign secret is refused but cannot fail the real ticket: the deadline does.
        assert reason is FinishReason.ERROR and tokens == []
        assert time.time() - started < 5
        assert "deadline" in pair.decode.remote.failure_reasons["foreign"]
        assert _pool_usage(pair) == (0, 0)
    finally:
        pair.close()


def test_cancel_mid_transfer_returns_both_pools_to_baseline(pair):
    prompt = _prompt(30, seed=6)  # 4 chunks of 8 on the prefill side
    ticket = pair.decode.add_remote_request("cancel", prompt, GREEDY)
    pair.prefill.add_job(PrefillJob(ticket, pair.address, prompt, GREEDY))
    pair.prefill.step()  # first chunk computed and (being) pushed
    assert _pool_usage(pair) != (0, 0)
    pair.decode.finish_request("cancel")
    assert _pool_usage(pair)[1] == 0  # decode side: free at once
    for _ in range(100):  # prefill side: its next push is refused, the job stops
        pair.prefill.step()
        if not pair.prefill.has_unfinished:
            break
        time.sleep(0.005)
    assert _pool_usage(pair) == (0, 0)
    assert pair.receiver.num_live == 0


def test_ticket_for_a_different_model_layout_is_refused(pair):
    ticket = pair.decode.add_remote_request("odd", [5, 6, 7], GREEDY)
    odd = dataclasses.replace(ticket, layout=messages.KVLayout(1, 4, 2, 16, "float32"))
    with pytest.raises(ValueError, match="different models"):
        pair.prefill.add_job(PrefillJob(odd, pair.address, [5, 6, 7], GREEDY))
    pair.decode.finish_request("odd")


def test_abort_from_the_prefill_side_frees_its_blocks_and_decode_recomputes(pair, colocated):
    prompt = _prompt(30, seed=8)
    ticket = pair.decode.add_remote_request("p-abort", prompt, GREEDY)
    job = pair.prefill.add_job(PrefillJob(ticket, pair.address, prompt, GREEDY))
    pair.prefill.step()  # one chunk computed and pushed
    pushed = pair.prefill.scheduler.requests["p-abort"].block_table[:2]  # its 8 tokens' pages
    assert pair.prefill.abort("p-abort", "prefill worker draining")
    assert _pool_usage(pair)[0] == 0  # prefill side: free at once (the pushed pages are cached)...
    allocator = pair.prefill.scheduler.allocator
    # ... but pages a transport reads in place are also held until the transfer settles
    held = 1 if pair.pusher.holds_pages(job) else 0
    assert [allocator.ref_count(b) for b in pushed] == [1 + held] * 2

    tokens = []
    for _ in range(500):
        pair.prefill.step()
        for chunk in pair.decode.step():
            tokens.extend(chunk.token_ids)
        if not pair.decode.has_unfinished and not pair.prefill.has_unfinished:
            break
        time.sleep(0.001)
    assert "aborted by the sender: prefill worker draining" in pair.decode.remote.failure_reasons["p-abort"]
    assert pair.decode.remote.counts["failed_recomputed"] == 1
    assert tokens == colocated(prompt, GREEDY)
    assert _pool_usage(pair) == (0, 0)
    assert [allocator.ref_count(b) for b in pushed] == [1, 1]  # the cache's only


def test_step_counters_say_what_each_side_computed(tiny_llama_dir):
    """The counters the SLO planner fits its models from: prompt tokens computed, and
    requests per step summed over steps."""
    pair = Pair(tiny_llama_dir)
    try:
        tokens, _, _ = pair.run("counted", _prompt(20, seed=11), GREEDY)
    finally:
        pair.close()
    assert len(tokens) == GREEDY.max_tokens
    prefill, decode = pair.prefill, pair.decode
    assert prefill.prompt_tokens_computed == 20 and prefill.num_steps == 3  # chunks of 8, 8, 4
    assert prefill.batch_requests_stepped == prefill.num_steps  # one request in each step
    assert decode.prompt_tokens_computed == 0  # the prompt came as KV: decode rows only
    assert decode.num_steps >= GREEDY.max_tokens - 1 and decode.batch_requests_stepped == decode.num_steps

    local = EngineCore(pair.d_model.runner, pair.d_model.info, SchedulerConfig(max_num_batched_tokens=32,
                                                                            max_prefill_chunk=8))
    local.add_request("local", _prompt(12, seed=12), GREEDY)
    while local.has_unfinished:
        local.step()
    assert local.prompt_tokens_computed == 12  # a local prefill counts; its decode rows do not
    assert local.batch_requests_stepped == local.num_steps == 2 + GREEDY.max_tokens - 1
