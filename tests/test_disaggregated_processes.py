"""Prefill and decode in separate OS processes, over each real transport.

The test process only coordinates: it asks the decode process for a ticket, hands it to
the prefill process, and collects the decode output. KV goes from the prefill process to
the decode process over the transport under test, never through the test process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time

import pytest

from pdserve.runtime.sampling_params import SamplingParams

BLOCK = 4
TRANSPORTS = ["grpc", "tcp", "gloo", "shm", "nixl"]
GREEDY = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


def _decode_main(model_dir, kind, transfer_timeout, commands, replies):
    import torch

    torch.set_num_threads(1)
    from pdserve.engine.engine import EngineCore
    from pdserve.kv_transfer import messages
    from pdserve.kv_transfer.receiver import KVReceiver
    from pdserve.kv_transfer.transports import listen
    from pdserve.runtime.config import CacheConfig, SchedulerConfig
    from pdserve.runtime.loader import load_model

    loaded = load_model(model_dir, cache=CacheConfig(block_size=BLOCK, num_blocks=256))
    receiver = KVReceiver(loaded.runner.pool)
    engine = EngineCore(loaded.runner, loaded.info, SchedulerConfig(max_prefill_chunk=8, max_num_batched_tokens=32),
                        kv_receiver=receiver, transfer_timeout=transfer_timeout)
    listener = listen(kind, receiver)
    replies.put(("address", listener.address))
    outputs: dict[str, list[int]] = {}
    while True:
        try:
            command = commands.get(timeout=0.002 if engine.has_unfinished else 0.05)
        except queue.Empty:
            command = None
        if command is not None:
            op = command[0]
            if op == "stop":
                break
            if op == "submit":
                _, request_id, prompt, params = command
                ticket = engine.add_remote_request(request_id, prompt, SamplingParams(**params))
                replies.put(("ticket", messages.encode(ticket) if ticket else None))
            elif op == "local":
                _, request_id, prompt, params = command
                engine.add_request(request_id, prompt, SamplingParams(**params))
            elif op == "abort":
                engine.finish_request(command[1])
                replies.put(("aborted", command[1]))
            elif op == "usage":
                s = engine.scheduler
                replies.put(("usage", s.allocator.num_used - s.prefix_cache.num_cached_blocks,
                             receiver.num_live, dict(engine.remote.counts)))
        for chunk in engine.step():
            outputs.setdefault(chunk.request_id, []).extend(chunk.token_ids)
            if chunk.finish_reason is not None:
                replies.put(("done", chunk.request_id, outputs.pop(chunk.request_id), chunk.finish_reason.value))
    listener.close()


def _prefill_main(model_dir, step_delay, commands, replies):
    import torch

    torch.set_num_threads(1)
    from pdserve.kv_transfer import messages
    from pdserve.kv_transfer.messages import PrefillJob
    from pdserve.kv_transfer.pusher import KVPusher
    from pdserve.kv_transfer.transports import connect
    from pdserve.prefill_worker.engine import PrefillEngine
    from pdserve.runtime.config import CacheConfig, SchedulerConfig
    from pdserve.runtime.loader import load_model

    loaded = load_model(model_dir, cache=CacheConfig(block_size=BLOCK, num_blocks=256))
    pusher = KVPusher(loaded.runner.pool, connect)
    engine = PrefillEngine(loaded.runner, loaded.info, pusher,
                           SchedulerConfig(max_prefill_chunk=8, max_num_batched_tokens=32))
    replies.put(("ready",))
    while True:
        try:
            command = commands.get(timeout=0.002 if engine.has_unfinished else 0.05)
        except queue.Empty:
            command = None
        if command is not None:
            if command[0] == "stop":
                break
            if command[0] == "job":
                _, ticket, address, prompt, params = command
                engine.add_job(PrefillJob(messages.decode(ticket, messages.KVTicket), address,
                                          prompt, SamplingParams(**params)))
            elif command[0] == "usage":
                s = engine.scheduler
                replies.put(("usage", s.allocator.num_used - s.prefix_cache.num_cached_blocks))
        for outcome in engine.step():
            replies.put(("outcome", outcome.request_id, outcome.ok, outcome.reason))
        if step_delay and engine.has_unfinished:
            time.sleep(step_delay)
    pusher.close()


class Worker:
    """A worker process and the two queues the test talks to it through."""

    def __init__(self, target, *args):
        ctx = mp.get_context("spawn")
        self.commands, self.replies = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=target, args=(*args, self.commands, self.replies), daemon=True)
        self.process.start()

    def expect(self, kind, timeout=60.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                reply = self.replies.get(timeout=0.1)
            except queue.Empty:
                if not self.process.is_alive():
                    raise AssertionError(f"worker died (exit code {self.process.exitcode})") from None
                continue
            if reply[0] == kind:
                return reply
        raise AssertionError(f"no {kind!r} reply within {timeout}s")

    def stop(self):
        if self.process.is_alive():
            self.commands.put(("stop",))
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def _decode_worker(model_dir, kind, transfer_timeout=30.0):
    return Worker(_decode_main, model_dir, kind, transfer_timeout)


def _prefill_worker(model_dir, step_delay=0.0):
    return Worker(_prefill_main, model_dir, step_delay)


@pytest.fixture(scope="module", params=TRANSPORTS)
def workers(request, tiny_llama_dir):
    decode = _decode_worker(str(tiny_llama_dir), request.param)
    prefill = _prefill_worker(str(tiny_llama_dir))
    try:
        address = decode.expect("address")[1]
        prefill.expect("ready")
        yield decode, prefill, address
    finally:
        prefill.stop()
        decode.stop()


def _disaggregated(decode, prefill, address, request_id, prompt, params=GREEDY):
    """Run one request through P -> D; return (tokens, finish reason, decode's ticket)."""
    from pdserve.kv_transfer import messages

    decode.commands.put(("submit", request_id, prompt, params))
    ticket = decode.expect("ticket")[1]
    assert ticket is not None
    prefill.commands.put(("job", ticket, address, prompt, params))
    _, rid, tokens, reason = decode.expect("done")
    assert rid == request_id
    return tokens, reason, messages.decode(ticket, messages.KVTicket)


def _local(decode, request_id, prompt, params=GREEDY):
    decode.commands.put(("local", request_id, prompt, params))
    _, rid, tokens, _ = decode.expect("done")
    assert rid == request_id
    return tokens


def _usage(worker):
    worker.commands.put(("usage",))
    return worker.expect("usage")[1:]


def test_transferred_output_equals_colocated_with_and_without_prefix_hit(workers):
    decode, prefill, address = workers
    tag = address.split(":")[0]
    # No hit: a prompt the decode worker has never seen travels whole.
    fresh = list(range(150, 173))
    tokens, reason, ticket = _disaggregated(decode, prefill, address, f"fresh-{tag}", fresh)
    assert ticket.first_page == 0 and len(ticket.block_ids) == 6
    assert reason == "length"
    assert tokens == _local(decode, f"ref-fresh-{tag}", fresh)
    # Hit: after a local run of shared + a, only the pages past `shared` travel.
    shared = list(range(40, 60))  # 5 pages
    _local(decode, f"warmup-{tag}", shared + [7, 8, 9])
    warm = shared + [10, 11, 12, 13]
    tokens, _, ticket = _disaggregated(decode, prefill, address, f"warm-{tag}", warm)
    assert ticket.first_page == 5 and len(ticket.block_ids) == 1
    assert tokens == _local(decode, f"ref-warm-{tag}", warm)
    usage, live, counts = _usage(decode)
    assert usage == 0 and live == 0 and counts["succeeded"] == 2
    assert _usage(prefill)[0] == 0


def test_outputs_match_for_a_batch_of_concurrent_transfers(workers):
    decode, prefill, address = workers
    prompts = {f"c{i}-{address}": [(7 * i + j) % 250 + 3 for j in range(5 + 3 * i)] for i in range(6)}
    expected = {rid: _local(decode, "ref-" + rid, p) for rid, p in prompts.items()}
    for rid, prompt in prompts.items():
        decode.commands.put(("submit", rid, prompt, GREEDY))
        ticket = decode.expect("ticket")[1]
        prefill.commands.put(("job", ticket, address, prompt, GREEDY))
    got = {}
    while len(got) < len(prompts):
        _, rid, tokens, _ = decode.expect("done")
        got[rid] = tokens
    assert got == expected


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_killed_sender_leads_to_local_recompute_within_the_deadline(kind, tiny_llama_dir):
    decode = _decode_worker(str(tiny_llama_dir), kind, transfer_timeout=2.0)
    prefill = _prefill_worker(str(tiny_llama_dir), step_delay=0.5)
    try:
        address = decode.expect("address")[1]
        prefill.expect("ready")
        prompt = list(range(100, 140))  # 5 chunks of 8: about 2.5 s at 0.5 s a step
        decode.commands.put(("submit", "victim", prompt, GREEDY))
        ticket = decode.expect("ticket")[1]
        prefill.commands.put(("job", ticket, address, prompt, GREEDY))
        time.sleep(0.8)  # the first chunks have been pushed
        os.kill(prefill.process.pid, signal.SIGKILL)
        started = time.time()
        _, rid, tokens, reason = decode.expect("done", timeout=30)
        assert rid == "victim" and reason == "length"
        assert time.time() - started < 2.0 + 5.0  # deadline plus recompute time
        assert tokens == _local(decode, "reference-after", prompt)
        usage, live, counts = _usage(decode)
        assert counts["failed_recomputed"] == 1 and usage == 0 and live == 0
    finally:
        prefill.stop()
        decode.stop()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_cancel_mid_transfer_returns_both_pools_to_baseline(kind, tiny_llama_dir):
    decode = _decode_worker(str(tiny_llama_dir), kind)
    prefill = _prefill_worker(str(tiny_llama_dir), step_delay=0.3)
    try:
        address = decode.expect("address")[1]
        prefill.expect("ready")
        prompt = list(range(60, 100))
        decode.commands.put(("submit", "cancel", prompt, GREEDY))
        ticket = decode.expect("ticket")[1]
        prefill.commands.put(("job", ticket, address, prompt, GREEDY))
        time.sleep(0.5)
        decode.commands.put(("abort", "cancel"))
        decode.expect("aborted")
        outcome = prefill.expect("outcome", timeout=30)
        assert outcome[1] == "cancel" and outcome[2] is False
        assert _usage(prefill)[0] == 0
        usage, live, counts = _usage(decode)
        assert usage == 0 and live == 0 and counts["aborted"] == 1
    finally:
        prefill.stop()
        decode.stop()
