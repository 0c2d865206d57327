"""KV transports (grpc, tcp, gloo, shm, nixl) between real processes.

The decode side runs in a spawned child: a small KVPool, a KVReceiver and a listener,
driven by plain-data commands over a multiprocessing Queue. The parent is the prefill side:
it reads pages from a pool of known values and sends them over a channel. Each transport
gets the same checks: bit-exact pages at the ticket's blocks, every kind of rejection, a
sender killed mid-transfer, a decode worker killed under a sender.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import msgpack
import pytest
import torch
import torch.distributed as dist
from kv_helpers import CALL_S, child_answer, chunk, eventually, rejections

from pdserve.kv_transfer import layout, messages
from pdserve.kv_transfer.decode_side import RemoteRequests
from pdserve.kv_transfer.messages import KVTicket, MessageRejected, TransferAbort, TransferDone
from pdserve.kv_transfer.pusher import KVPusher, SendState
from pdserve.kv_transfer.receiver import KVReceiver, TransferState
from pdserve.kv_transfer.transports import (
    PeerInfo,
    TransportError,
    choose_transport,
    connect,
    grpc_transport,
    listen,
    probe,
    shm,
    torch_dist,
)
from pdserve.kv_transfer.transports.base import MAX_HEADER_BYTES, REPLY_HEAD_BYTES, serve_frame
from pdserve.kv_transfer.transports.select import (
    PROBE_PAGES,
    candidate_transports,
    fastest,
    measure,
    probe_source,
    transport_table,
)
from pdserve.kv_transfer.transports.stream import FRAME, HELLO, recv_exact
from pdserve.kv_transfer.transports.torch_dist_backends import run_op
from pdserve.kv_transfer.transports.torch_dist_frames import LENGTHS as HEAD_LENGTHS
from pdserve.kv_transfer.transports.torch_dist_frames import fill as fill_head
from pdserve.kv_transfer.transports.torch_dist_pairs import COUNTER as PAIR_COUNTER
from pdserve.runtime.config import RuntimeInfo, SchedulerConfig
from pdserve.runtime.kv_pool import KVPool
from pdserve.runtime.request import Request
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.scheduler import BatchScheduler

KINDS = ["grpc", "tcp", "gloo", "shm", "nixl"]
CTX = multiprocessing.get_context("spawn")
POOL_SHAPE = {"num_layers": 2, "num_blocks": 16, "block_size": 4, "num_kv_heads": 2, "head_dim": 8,
              "dtype": torch.float32}
# Small enough that a 2 MiB payload is over the limit; every test chunk is a few KiB.
LISTENER_OPTIONS = {"max_chunk_bytes": 1 << 20}
STARTUP_S = 60.0  # a spawned child imports torch: seconds on a busy 2-core machine


def _pool() -> KVPool:
    return KVPool(**POOL_SHAPE)


def _source_pool() -> KVPool:
    """Known values, all distinct and exact in float32."""
    pool = _pool()
    pool.kv.copy_(torch.arange(pool.kv.numel(), dtype=torch.float32).view_as(pool.kv) * 0.5 + 1.0)
    return pool



def _send_all(channel, source: KVPool, ticket: KVTicket, src_blocks: list[int], first_token: int) -> None:
    for layer in range(source.kv.shape[0]):
        channel.send_pages(*chunk(source, ticket, layer, 0, src_blocks))
    channel.send_done(_done(ticket, first_token))


def _done(ticket: KVTicket, first_token: int = 0) -> TransferDone:
    return TransferDone(ticket.request_id, ticket.ticket_id, ticket.secret, first_token, -0.25)


def _expected_bytes(source: KVPool, src_blocks: list[int]) -> bytes:
    return source.kv[:, :, src_blocks].contiguous().numpy().tobytes()


# --------------------------------------------------------------------- decode child


def _decode_main(kind: str, options: dict, commands, results) -> None:
    """The decode worker: answers (name, *args) commands with ("ok", value) or ("error", text)."""
    torch.set_num_threads(1)
    pool = _pool()
    receiver = KVReceiver(pool, default_timeout=30.0)
    free = list(range(pool.num_blocks))  # popped from the end: tickets get descending blocks
    tickets: dict[int, KVTicket] = {}

    def issue(request_id, num_pages, first_page, timeout):
        blocks = [free.pop() for _ in range(num_pages)]
        ticket = receiver.issue(request_id, blocks, first_page, first_page * pool.block_size + 7, timeout)
        tickets[ticket.ticket_id] = ticket
        return messages.encode(ticket)

    def poll(ticket_id):
        status = receiver.poll(ticket_id)
        return status.state.value, status.reason, status.done.first_token if status.done else None

    def pages(ticket_id):
        return pool.kv[:, :, list(tickets[ticket_id].block_ids)].contiguous().numpy().tobytes()

    def release(ticket_id):
        receiver.release(ticket_id)
        free.extend(tickets.pop(ticket_id).block_ids)

    handlers = {"issue": issue, "poll": poll, "pages": pages, "release": release,
                "expire": lambda: receiver.expire(), "rejected": lambda: dict(receiver.rejected)}
    listener = listen(kind, receiver, **options)
    results.put(("ok", listener.address))
    while True:
        try:
            name, *args = commands.get(timeout=120)  # the parent is gone: stop
        except queue.Empty:
            break
        if name == "stop":
            break
        try:
            results.put(("ok", handlers[name](*args)))
        except Exception as exc:  # noqa: BLE001 (the parent fails the test with it)
            results.put(("error", f"{type(exc).__name__}: {exc}"))
    listener.close()


class DecodePeer:
    """The parent's handle on a decode child."""

    def __init__(self, kind: str, **options) -> None:
        self.kind = kind
        self.commands, self.results = CTX.Queue(), CTX.Queue()
        self.process = CTX.Process(target=_decode_main, args=(kind, options, self.commands, self.results),
                                   daemon=True)
        self.process.start()
        self.address = self._result(STARTUP_S, "start")

    def call(self, name: str, *args, timeout: float = CALL_S):
        self.commands.put((name, *args))
        return self._result(timeout, name)

    def issue(self, request_id: str, num_pages: int, first_page: int = 0, timeout: float = 30.0) -> KVTicket:
        return messages.decode(self.call("issue", request_id, num_pages, first_page, timeout), KVTicket)

    def state(self, ticket_id: int) -> tuple[str, str, int | None]:
        return self.call("poll", ticket_id)

    def _result(self, timeout: float, what: str):
        return child_answer(self.results, self.process, timeout, what, f"decode child ({self.kind})")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        for q in (self.commands, self.results):
            q.cancel_join_thread()  # never block the parent's exit on a dead child's pipe
            q.close()


@pytest.fixture(scope="module", autouse=True)
def no_leaked_shared_memory():
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    yield
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not {name for name in after - before if name.startswith("psm_")}, "leaked /dev/shm segments"


@pytest.fixture()
def spawned():
    """Processes a test starts; whatever is still alive at the end is killed."""
    processes: list = []
    yield processes
    for process in processes:
        if isinstance(process, DecodePeer):
            process.kill()
        elif process.is_alive():
            process.kill()
            process.join(timeout=10)


@pytest.fixture(scope="module", params=KINDS)
def decode(request):
    peer = DecodePeer(request.param, **LISTENER_OPTIONS)
    request.addfinalizer(peer.kill)
    return peer


@pytest.fixture()
def channel(decode):
    chan = connect(decode.address, timeout=CALL_S)
    yield chan
    chan.close()


@pytest.fixture(scope="module")
def source():
    return _source_pool()


# ------------------------------------------------------------------------- transfers


def test_pages_arrive_bit_exact_at_the_tickets_blocks(decode, channel, source):
    ticket = decode.issue("exact", num_pages=3, first_page=1)
    src_blocks = [7, 2, 11]
    # layer 0 in two chunks, layer 1 in one
    channel.send_pages(*chunk(source, ticket, 0, 0, src_blocks[:2]))
    channel.send_pages(*chunk(source, ticket, 0, 2, src_blocks[2:]))
    channel.send_pages(*chunk(source, ticket, 1, 0, src_blocks))
    assert decode.state(ticket.ticket_id)[0] == "transferring"
    channel.send_done(_done(ticket, first_token=42))
    assert decode.state(ticket.ticket_id) == ("succeeded", "", 42)
    assert decode.call("pages", ticket.ticket_id) == _expected_bytes(source, src_blocks)
    decode.call("release", ticket.ticket_id)


def test_pages_sent_from_the_pool_arrive_bit_exact(decode, channel, source):
    # send_pool_pages: the pusher's path (nixl reads the pool in place; the others pack).
    ticket = decode.issue("from-pool", num_pages=4)
    src_blocks = [3, 4, 9, 1]  # a run and two single pages
    for layer in range(source.kv.shape[0]):
        header, _ = chunk(source, ticket, layer, 0, src_blocks)
        assert header.checksum == layout.checksum_pages(source, layer, src_blocks)
        channel.send_pool_pages(header, source, src_blocks)
    channel.send_done(_done(ticket, first_token=3))
    assert decode.state(ticket.ticket_id) == ("succeeded", "", 3)
    assert decode.call("pages", ticket.ticket_id) == _expected_bytes(source, src_blocks)
    decode.call("release", ticket.ticket_id)


def test_a_pool_chunk_whose_checksum_lies_fails_the_ticket(decode, channel, source):
    ticket = decode.issue("pool-lies", num_pages=2)
    header, _ = chunk(source, ticket, 0, 0, [5, 6])
    with pytest.raises(MessageRejected, match="checksum"):
        channel.send_pool_pages(dataclasses.replace(header, checksum=header.checksum ^ 1), source, [5, 6])
    state, reason, _ = decode.state(ticket.ticket_id)
    assert state == "failed" and "checksum" in reason
    decode.call("release", ticket.ticket_id)


def test_concurrent_channels_to_one_listener(decode, source):
    plans = [(decode.issue(f"concurrent-{i}", num_pages=2), [i, 15 - i]) for i in range(3)]

    def transfer(plan):
        ticket, src_blocks = plan
        with connect(decode.address, timeout=CALL_S) as chan:
            _send_all(chan, source, ticket, src_blocks, first_token=ticket.ticket_id)

    with ThreadPoolExecutor(len(plans)) as pool:
        for future in [pool.submit(transfer, plan) for plan in plans]:
            future.result(timeout=3 * CALL_S)
    for ticket, src_blocks in plans:
        assert decode.state(ticket.ticket_id) == ("succeeded", "", ticket.ticket_id)
        assert decode.call("pages", ticket.ticket_id) == _expected_bytes(source, src_blocks)
        decode.call("release", ticket.ticket_id)


def test_corrupted_payload_is_rejected_and_fails_the_ticket(decode, channel, source):
    ticket = decode.issue("corrupt", num_pages=2)
    header, payload = chunk(source, ticket, 0, 0, [1, 2])
    corrupted = bytearray(payload)
    corrupted[37] ^= 0x10  # after the checksum was taken
    with pytest.raises(MessageRejected, match="checksum"):
        channel.send_pages(header, corrupted)
    state, reason, _ = decode.state(ticket.ticket_id)
    assert state == "failed" and "checksum" in reason
    channel.ping()  # a refusal leaves the channel usable
    decode.call("release", ticket.ticket_id)


def test_wrong_secret_is_rejected_and_the_ticket_stays_usable(decode, channel, source):
    ticket = decode.issue("secret", num_pages=2)
    with pytest.raises(MessageRejected, match="secret"):
        channel.send_pages(*chunk(source, ticket, 0, 0, [3, 4], secret=b"\0" * 16))
    assert decode.state(ticket.ticket_id)[0] == "pending"
    _send_all(channel, source, ticket, [3, 4], first_token=5)
    assert decode.state(ticket.ticket_id) == ("succeeded", "", 5)
    decode.call("release", ticket.ticket_id)


@pytest.mark.parametrize("bad, match", [
    ({"num_pages": 2, "shape": (2, 2, 4, 2, 8)}, "payload of"),  # 3 pages of bytes
    ({"page_start": 1}, "outside the ticket"),  # pages [1, 4) of a 3-page ticket
    ({"shape": (2, 3, 4, 8, 2)}, "shape"),
    ({"layer": 2}, "layer"),
    ({"dtype": "float16"}, "dtype"),
], ids=["bytes-vs-pages", "past-the-ticket", "shape", "layer", "dtype"])
def test_misshapen_chunks_are_rejected(decode, channel, source, bad, match):
    ticket = decode.issue("misshapen", num_pages=3)
    header, payload = chunk(source, ticket, 0, 0, [1, 2, 3])
    with pytest.raises(MessageRejected, match=match):
        channel.send_pages(dataclasses.replace(header, **bad), payload)
    assert decode.state(ticket.ticket_id)[0] == "failed"  # the secret was right: the transfer is broken
    decode.call("release", ticket.ticket_id)


def test_a_chunk_over_the_links_limit_is_refused_before_sending(decode, channel, source):
    ticket = decode.issue("oversized", num_pages=1)
    header, _ = chunk(source, ticket, 0, 0, [1])
    assert channel.max_chunk_bytes == LISTENER_OPTIONS["max_chunk_bytes"]
    with pytest.raises(MessageRejected, match="exceeds"):
        channel.send_pages(header, bytes(channel.max_chunk_bytes + 1))
    _send_all(channel, source, ticket, [1], first_token=1)  # neither link nor ticket harmed
    assert decode.state(ticket.ticket_id)[0] == "succeeded"
    decode.call("release", ticket.ticket_id)


def test_a_chunk_for_an_unknown_ticket_is_rejected(decode, channel, source):
    ticket = decode.issue("known", num_pages=1)
    header, payload = chunk(source, ticket, 0, 0, [1], ticket_id=ticket.ticket_id + 1000)
    with pytest.raises(MessageRejected, match="no live ticket"):
        channel.send_pages(header, payload)
    decode.call("release", ticket.ticket_id)


def test_done_before_every_page_is_rejected_and_fails_the_ticket(decode, channel, source):
    ticket = decode.issue("early-done", num_pages=2)
    channel.send_pages(*chunk(source, ticket, 0, 0, [1, 2]))  # layer 1 never sent
    with pytest.raises(MessageRejected, match="incomplete"):
        channel.send_done(_done(ticket))
    state, reason, _ = decode.state(ticket.ticket_id)
    assert state == "failed" and "incomplete" in reason
    decode.call("release", ticket.ticket_id)


def test_abort_fails_the_ticket(decode, channel):
    ticket = decode.issue("abort", num_pages=1)
    channel.send_abort(TransferAbort(ticket.request_id, ticket.ticket_id, ticket.secret, "prefill OOM"))
    state, reason, _ = decode.state(ticket.ticket_id)
    assert state == "failed" and "prefill OOM" in reason
    decode.call("release", ticket.ticket_id)


# ------------------------------------------------------------------------- failures


def _sender_main(address: str, tickets, progress) -> None:
    """A prefill worker that sends one chunk, reports it, and waits to be killed."""
    torch.set_num_threads(1)
    channel = connect(address, timeout=CALL_S)
    progress.put("connected")
    ticket = messages.decode(tickets.get(timeout=STARTUP_S), KVTicket)
    channel.send_pages(*chunk(_source_pool(), ticket, 0, 0, [5]))
    progress.put("sent")
    time.sleep(STARTUP_S)


def test_a_sender_killed_mid_transfer_fails_the_ticket_at_its_deadline(decode, source, spawned):
    tickets, progress = CTX.Queue(), CTX.Queue()
    sender = CTX.Process(target=_sender_main, args=(decode.address, tickets, progress), daemon=True)
    spawned.append(sender)
    sender.start()
    assert progress.get(timeout=STARTUP_S) == "connected"
    ticket = decode.issue("orphan", num_pages=1, timeout=2.0)
    tickets.put(messages.encode(ticket))
    assert progress.get(timeout=CALL_S) == "sent"
    os.kill(sender.pid, signal.SIGKILL)
    sender.join(timeout=10)
    for q in (tickets, progress):
        q.cancel_join_thread()
        q.close()
    assert decode.state(ticket.ticket_id)[0] == "transferring"
    while ticket.ticket_id not in decode.call("expire"):
        assert time.time() < ticket.deadline + 5.0, "expire() never failed the orphaned ticket"
        time.sleep(0.1)
    assert time.time() - ticket.deadline < 2.0  # at the first expire() past the deadline
    state, reason, _ = decode.state(ticket.ticket_id)
    assert state == "failed" and "deadline" in reason
    decode.call("release", ticket.ticket_id)
    # The listener still serves new channels.
    fresh = decode.issue("after-orphan", num_pages=1)
    with connect(decode.address, timeout=CALL_S) as chan:
        _send_all(chan, source, fresh, [9], first_token=3)
    assert decode.state(fresh.ticket_id) == ("succeeded", "", 3)
    decode.call("release", fresh.ticket_id)


@pytest.mark.parametrize("kind", KINDS)
def test_a_dead_decode_worker_is_a_transport_error_within_the_timeout(kind, source, spawned):
    peer = DecodePeer(kind, **LISTENER_OPTIONS)
    spawned.append(peer)
    chan = connect(peer.address, timeout=5.0)
    ticket = peer.issue("doomed", num_pages=1)
    chan.send_pages(*chunk(source, ticket, 0, 0, [1]))
    peer.kill()
    started = time.monotonic()
    with pytest.raises(TransportError):
        chan.send_pages(*chunk(source, ticket, 1, 0, [1]))
    assert time.monotonic() - started < chan.timeout + 1.0
    with pytest.raises(TransportError, match="unusable"):  # and it stays broken
        chan.ping()
    chan.close()


# ---------------------------------------------------------- selection and probing


def test_choose_transport():
    here_cpu, here_gpu = PeerInfo("host-a", "cpu"), PeerInfo("host-a", "cuda")
    there_cpu, there_gpu = PeerInfo("host-b", "cpu"), PeerInfo("host-b", "cuda")
    assert choose_transport(here_cpu, PeerInfo("host-a", "cpu"), None) == "shm"
    assert choose_transport(here_gpu, PeerInfo("host-a", "cuda"), None) == "shm"
    assert choose_transport(here_gpu, there_gpu, None) == "nccl"
    assert choose_transport(here_gpu, there_cpu, None) == "grpc"
    assert choose_transport(here_cpu, there_cpu, None) == "grpc"
    assert choose_transport(here_cpu, there_cpu, "gloo") == "gloo"
    assert choose_transport(here_gpu, there_gpu, "grpc") == "grpc"
    with pytest.raises(TransportError, match="different hosts"):
        choose_transport(here_cpu, there_cpu, "shm")
    with pytest.raises(TransportError, match="needs CUDA"):
        choose_transport(here_gpu, there_cpu, "nccl")
    with pytest.raises(TransportError, match="unknown KV transport"):
        choose_transport(here_cpu, there_cpu, "carrier-pigeon")
    assert PeerInfo.local("cpu") == PeerInfo.local("cpu")


def test_candidate_transports():
    here_cpu, here_gpu = PeerInfo("host-a", "cpu"), PeerInfo("host-a", "cuda")
    there_cpu, there_gpu = PeerInfo("host-b", "cpu"), PeerInfo("host-b", "cuda")
    assert candidate_transports(here_cpu, PeerInfo("host-a", "cpu")) == ["shm", "nixl"]
    assert candidate_transports(here_gpu, PeerInfo("host-a", "cuda")) == ["nccl", "shm", "nixl"]
    assert candidate_transports(here_cpu, there_cpu) == ["nixl", "tcp", "grpc"]
    assert candidate_transports(here_gpu, there_gpu) == ["nccl", "nixl", "tcp", "grpc"]
    assert candidate_transports(here_cpu, there_cpu, "tcp") == ["tcp"]
    with pytest.raises(TransportError, match="different hosts"):
        candidate_transports(here_cpu, there_cpu, "shm")


def test_the_fastest_measured_transport_wins_and_failures_are_named():
    assert fastest({"shm": 0.004, "nixl": 0.001, "tcp": RuntimeError("refused")}) == "nixl"
    with pytest.raises(TransportError, match="shm: no room.*nixl: not installed"):
        fastest({"shm": RuntimeError("no room"), "nixl": RuntimeError("not installed")})
    table = transport_table({"shm": 0.002, "nixl": RuntimeError("not installed")}, 4_000_000)
    assert "2.00 GB/s" in table and "nixl  failed: not installed" in table


@pytest.mark.parametrize("kind", KINDS)
def test_a_probe_transfer_goes_through_the_checks_into_scratch_pages_only(kind):
    pool = _pool()
    receiver = KVReceiver(pool)
    with listen(kind, receiver) as listener:
        ticket = receiver.issue_probe(PROBE_PAGES)
        assert measure(listener.address, ticket, probe_source(ticket), repeats=2, timeout=CALL_S) > 0
        assert receiver.poll(ticket.ticket_id).state is TransferState.SUCCEEDED
        receiver.release(ticket.ticket_id)
    assert receiver.num_rejected == 0
    assert not pool.kv.any(), "a probe never writes the engine's pool"
    assert receiver.bytes_received == 2 * POOL_SHAPE["num_layers"] * layout.chunk_nbytes(ticket.layout, PROBE_PAGES)


@pytest.mark.parametrize("kind", KINDS)
def test_probe_passes_against_a_live_listener(kind):
    with listen(kind, KVReceiver(_pool())) as listener:
        probe(listener.address, timeout=CALL_S)


@pytest.mark.parametrize("address, match", [
    ("grpc://127.0.0.1:1", "grpc://127.0.0.1:1"),
    ("tcp://127.0.0.1:1", "tcp://127.0.0.1:1"),
    ("gloo://127.0.0.1:1", "gloo://127.0.0.1:1"),
    ("shm://nobody-listens-here", "shm://nobody-listens-here"),
    ("gloo://127.0.0.1", "malformed"),
    ("carrier-pigeon://coop", "unknown KV transport"),
    ("127.0.0.1:5000", "malformed"),
])
def test_probe_fails_loudly(address, match):
    started = time.monotonic()
    with pytest.raises(TransportError, match=match):
        probe(address, timeout=1.0)
    assert time.monotonic() - started < 5.0


def test_a_forced_transport_that_cannot_work_here_raises():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nccl may work")
    with pytest.raises(TransportError, match="nccl"):
        listen("nccl", KVReceiver(_pool()))


def test_serve_frame_refuses_garbage_without_raising():
    receiver = KVReceiver(_pool())
    assert serve_frame(receiver, b"", b"") is None  # ping
    assert "ping" in serve_frame(receiver, b"", b"x")
    assert "malformed" in serve_frame(receiver, b"\xc1not msgpack", b"")
    assert "malformed" in serve_frame(receiver, messages.encode(receiver.layout), b"")  # not a frame kind
    for kind in ([], {}, 7, None):  # a kind that is no string, hashable or not
        assert "malformed" in serve_frame(receiver, msgpack.packb({"kind": kind}), b"")
    ticket = receiver.issue("r", [0], 0, 4)
    assert "no payload" in serve_frame(receiver, messages.encode(_done(ticket)), b"xx")
    assert "over the" in serve_frame(receiver, b"\x80" * (MAX_HEADER_BYTES + 1), b"")
    # none of these reached the ticket checks; every one is counted
    assert rejections(receiver) == {"malformed": 8, "oversized": 1}
    assert receiver.num_rejected == 9
    assert receiver.poll(ticket.ticket_id).state is TransferState.PENDING



# ------------------------------------------- limits and hostile peers (listeners in this process)


@contextlib.contextmanager
def _local(kind: str, vocab_size: int | None = None, **options):
    """A listener of `kind` in this process over a fresh pool; yields (listener, receiver)."""
    receiver = KVReceiver(_pool(), vocab_size=vocab_size)
    with listen(kind, receiver, **{**LISTENER_OPTIONS, **options}) as listener:
        yield listener, receiver



def _local_pages(receiver: KVReceiver, ticket: KVTicket) -> bytes:
    return receiver.pool.kv[:, :, list(ticket.block_ids)].contiguous().numpy().tobytes()


def _transfer_locally(channel, receiver: KVReceiver, source: KVPool, request_id: str,
                      src_blocks: list[int]) -> KVTicket:
    """A whole transfer over `channel` into the top blocks of `receiver`'s pool (tests keep
    their other tickets in the low ones); checks it succeeded with exactly the source's bytes."""
    blocks = [receiver.pool.num_blocks - 1 - i for i in range(len(src_blocks))]
    ticket = receiver.issue(request_id, blocks, 0, 4 * len(blocks))
    _send_all(channel, source, ticket, src_blocks, first_token=3)
    assert receiver.poll(ticket.ticket_id).state is TransferState.SUCCEEDED
    assert _local_pages(receiver, ticket) == _expected_bytes(source, src_blocks)
    return ticket


def _shm_regions_mapped() -> int:
    """Shared-memory segments this process maps (the shm listener's staging regions)."""
    with open("/proc/self/maps") as maps:
        return sum("/psm_" in line for line in maps)


@pytest.mark.parametrize("kind", ["tcp", "shm", "gloo"])
def test_a_link_gets_staging_memory_only_once_a_chunk_header_passes_the_ticket_checks(kind, source):
    region = 4 << 20
    with _local(kind, max_chunk_bytes=region) as (listener, receiver):
        ticket = receiver.issue("staged", [0, 1], 0, 8)
        mapped_before = _shm_regions_mapped() if kind == "shm" else 0
        tracemalloc.start()
        try:
            channels = [connect(listener.address, timeout=CALL_S) for _ in range(3)]
            for chan in channels:
                chan.ping()
                with pytest.raises(MessageRejected, match="secret"):
                    chan.send_pages(*chunk(source, ticket, 0, 0, [1, 2], secret=b"\0" * 16))
                with pytest.raises(MessageRejected, match="no live ticket"):
                    chan.send_pages(*chunk(source, ticket, 0, 0, [1, 2], ticket_id=ticket.ticket_id + 99))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Three links, six refused chunks: not one staging buffer, region or tensor.
        assert listener.staging_bytes == 0
        if kind == "tcp":
            assert peak < region  # a buffer per link on connect would be 3 regions' worth
        if kind == "shm":
            assert _shm_regions_mapped() == mapped_before
        assert rejections(receiver) == {"bad_secret": 3, "unknown_ticket": 3}
        # A chunk with the right secret earns its link staging, and the transfer completes.
        chan = channels[0]
        _send_all(chan, source, ticket, [1, 2], first_token=3)
        assert receiver.poll(ticket.ticket_id).state is TransferState.SUCCEEDED
        assert _local_pages(receiver, ticket) == _expected_bytes(source, [1, 2])
        chunk_bytes = layout.chunk_nbytes(receiver.layout, 2)
        assert listener.staging_bytes == (region if kind == "shm" else chunk_bytes)
        for chan in channels:
            chan.close()


@pytest.mark.parametrize("kind", ["tcp", "shm", "grpc", "nixl"])
def test_idle_links_are_closed_and_the_channel_reconnects_by_itself(kind, source):
    with _local(kind, idle_timeout=0.5) as (listener, receiver):
        chan = connect(listener.address, timeout=CALL_S)
        assert chan.idle_timeout == 0.5
        ticket = receiver.issue("idle", [0], 0, 4)
        chan.send_pages(*chunk(source, ticket, 0, 0, [4]))
        eventually(lambda: receiver.rejected["idle_timeout"] == 1, "the idle link's close")
        eventually(lambda: listener.num_links == 0, "the idle link's thread ending")
        # The rest of the transfer goes over a fresh link, without an error.
        chan.send_pages(*chunk(source, ticket, 1, 0, [4]))
        chan.send_done(_done(ticket, first_token=8))
        assert chan.reconnects == 1
        assert receiver.poll(ticket.ticket_id)[:3] == (TransferState.SUCCEEDED, _done(ticket, 8), "")
        assert _local_pages(receiver, ticket) == _expected_bytes(source, [4])
        assert receiver.num_rejected == 1
        chan.close()


@pytest.mark.parametrize("kind", ["tcp", "shm", "grpc", "nixl"])
def test_a_pushers_kept_channel_survives_idle_closes(kind, source):
    """The prefill side keeps one channel per decode worker across requests: a link the
    listener closed while no request needed it costs the next request nothing."""
    with _local(kind, idle_timeout=0.5) as (listener, receiver):
        pusher = KVPusher(source, lambda address: connect(address, timeout=CALL_S))
        try:
            for turn in range(2):
                ticket = receiver.issue(f"turn-{turn}", [turn], 0, 4)
                send = pusher.start(ticket, listener.address)
                for layer in range(source.kv.shape[0]):
                    pusher.push(send, layer, 0, [5 + turn])
                pusher.finish(send, _done(ticket, first_token=turn))
                eventually(lambda s=send: pusher.poll(s)[0] is not SendState.SENDING, "the send")
                assert pusher.poll(send) == (SendState.SENT, "")
                assert _local_pages(receiver, ticket) == _expected_bytes(source, [5 + turn])
                if turn == 0:
                    eventually(lambda: receiver.rejected["idle_timeout"] == 1, "the idle link's close")
        finally:
            pusher.close()


def test_a_gloo_channel_keeps_its_pair_alive_with_pings(source):
    with _local("gloo", idle_timeout=0.5) as (listener, receiver):
        chan = connect(listener.address, timeout=CALL_S)
        pinged = chan.last_used
        eventually(lambda: chan.last_used > pinged + 1.0, "keep-alive pings over two idle timeouts")
        _transfer_locally(chan, receiver, source, "kept-alive", [6])
        assert receiver.num_rejected == 0  # never idled out
        chan.close()


def _raw_connect(address: str) -> socket.socket:
    """A plain socket to a tcp, nixl or shm listener."""
    kind, _, target = address.partition("://")
    if kind in ("tcp", "nixl"):
        host, _, port = target.rpartition(":")
        return socket.create_connection((host, int(port)), timeout=CALL_S)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CALL_S)
    sock.connect(shm._socket_address(target))
    return sock


def _raw_stream_link(address: str) -> socket.socket:
    """A plain socket to a tcp, nixl or shm listener, its hello read."""
    sock = _raw_connect(address)
    assert HELLO.unpack(recv_exact(sock, HELLO.size))[0] == 0
    return sock


def _trickle(sock: socket.socket, data: bytes, interval: float) -> None:
    """Send `data` a byte at a time, `interval` apart, until it is sent or the peer hangs up."""
    try:
        for i in range(len(data)):
            sock.sendall(data[i:i + 1])
            time.sleep(interval)
    except OSError:  # hung up on
        pass


@pytest.mark.parametrize("kind", ["tcp", "shm", "nixl"])
@pytest.mark.parametrize("sent", ["half-a-frame-head", "header-but-no-payload", "frame-a-byte-at-a-time"])
def test_a_frame_that_stalls_midway_drops_its_link(kind, sent, source):
    """A frame must be whole within op_timeout of its first byte, however its bytes trickle."""
    with _local(kind, op_timeout=0.5) as (listener, receiver):
        ticket = receiver.issue("stall", [0], 0, 4)
        header, payload = chunk(source, ticket, 0, 0, [1])
        frame = FRAME.pack(len(messages.encode(header)), len(payload)) + messages.encode(header)
        sock = _raw_stream_link(listener.address)
        if sent == "frame-a-byte-at-a-time":  # each byte well within op_timeout of the last
            _trickle(sock, frame, interval=0.1)
        else:
            sock.sendall(frame[:6] if sent == "half-a-frame-head" else frame)
            if sent == "header-but-no-payload" and kind == "shm":
                sock.recv(REPLY_HEAD_BYTES)  # the region's "proceed"; the sender never confirms
        try:
            assert sock.recv(1) == b""  # the listener hung up
        except ConnectionResetError:  # ... with bytes of ours unread
            pass
        sock.close()
        assert rejections(receiver) == {"stalled_frame": 1}
        with connect(listener.address, timeout=CALL_S) as chan:
            _transfer_locally(chan, receiver, source, "after-stall", [2])


def test_a_gloo_pair_whose_payload_never_comes_is_dropped(source):
    with _local("gloo", op_timeout=0.5) as (listener, receiver):
        ticket = receiver.issue("stall", [0], 0, 4)
        header, payload = chunk(source, ticket, 0, 0, [1])
        chan = connect(listener.address, timeout=CALL_S)
        chan._stop.set()  # no keep-alive pings: this test drives the pair by hand
        encoded = messages.encode(header)
        head = torch.zeros(torch_dist.HEAD_BYTES, dtype=torch.uint8)
        fill_head(head, HEAD_LENGTHS.pack(len(encoded), payload.nbytes) + encoded)
        run_op(chan._group.send, head, 0, CALL_S, "send a head")
        reply = torch.empty(torch_dist.REPLY_BYTES, dtype=torch.uint8)
        run_op(chan._group.recv, reply, 0, CALL_S, "take the go-ahead")
        assert torch_dist.decode_reply(bytes(reply.numpy())).proceed  # ... and the payload never comes
        eventually(lambda: listener.num_links == 0, "the stalled pair's drop")
        assert rejections(receiver) == {"stalled_frame": 1}
        chan.close()
        with connect(listener.address, timeout=CALL_S) as fresh:
            _transfer_locally(fresh, receiver, source, "after-stall", [2])


@pytest.mark.parametrize("kind", KINDS)
def test_links_over_max_channels_are_refused_and_counted(kind, source):
    with _local(kind, max_channels=2) as (listener, receiver):
        first, second = (connect(listener.address, timeout=CALL_S) for _ in range(2))
        threads = threading.active_count()
        for _ in range(3):
            with pytest.raises(TransportError, match="channel limit"):
                connect(listener.address, timeout=CALL_S)
        if kind in ("tcp", "shm"):  # a flood of plain connections is refused without a thread each
            flood = [_raw_connect(listener.address) for _ in range(20)]
            for sock in flood:
                assert HELLO.unpack(recv_exact(sock, HELLO.size))[0] == 1
                sock.close()
        if kind == "grpc":  # the server's pool: 2 streams and the spare threads that refuse more
            assert sum(t.name.startswith("kv-grpc_") for t in threading.enumerate()) <= 2 + grpc_transport._SPARE_THREADS
        else:
            assert threading.active_count() <= threads
        assert receiver.rejected["over_connection_limit"] == (23 if kind in ("tcp", "shm") else 3)
        assert listener.num_links == 2
        _transfer_locally(first, receiver, source, "still-served", [3])
        second.close()
        eventually(lambda: listener.num_links == 1, "the closed link's slot freeing")
        with connect(listener.address, timeout=CALL_S) as third:
            _transfer_locally(third, receiver, source, "slot-reused", [4])
        first.close()


def test_a_pushed_pair_counter_costs_the_gloo_listener_no_threads(source):
    """Any client of the listener's TCPStore can add to the pair counter; the listener must
    not start a thread (or write a verdict) per index it claims."""
    with _local("gloo", max_channels=2) as (listener, receiver):
        host, _, port = listener.address.removeprefix("gloo://").rpartition(":")
        store = dist.TCPStore(host, int(port), None, False, timedelta(seconds=CALL_S), wait_for_workers=False)
        threads = threading.active_count()
        store.add(PAIR_COUNTER, 1_000_000)
        eventually(lambda: receiver.rejected["malformed"] == 1, "the listener noticing the jump")
        assert threading.active_count() <= threads
        assert listener.num_links == 0
        with connect(listener.address, timeout=CALL_S) as chan:
            _transfer_locally(chan, receiver, source, "after-jump", [5])


# ------------------------------------------------------------ the first token's range


@pytest.mark.parametrize("done, match", [
    ({"first_token": 50}, "outside the vocabulary"),
    ({"first_token": -1}, "outside the vocabulary"),
    ({"top_logprobs": ((7, -0.1), (50, -2.0))}, "outside the vocabulary"),
    ({"top_logprobs": tuple((i, -1.0) for i in range(21))}, "top logprobs"),
    ({"logprob": math.nan}, "not a log-probability"),
    ({"logprob": 3.0}, "not a log-probability"),
], ids=["past-vocab", "negative", "top-past-vocab", "too-many-tops", "nan", "positive"])
def test_a_done_with_an_unusable_first_token_fails_its_ticket(done, match, source):
    receiver = KVReceiver(_pool(), vocab_size=50)
    ticket = receiver.issue("token", [0], 0, 4)
    for layer in range(2):
        receiver.accept_pages(*chunk(source, ticket, layer, 0, [1]))
    with pytest.raises(MessageRejected, match=match):
        receiver.accept_done(dataclasses.replace(_done(ticket, 49), **done))
    status = receiver.poll(ticket.ticket_id)
    assert status.state is TransferState.FAILED and "unusable first token" in status.reason
    assert rejections(receiver) == {"bad_token": 1}


def test_a_done_with_the_last_token_of_the_vocabulary_succeeds(source):
    receiver = KVReceiver(_pool(), vocab_size=50)
    ticket = receiver.issue("token", [0], 0, 4)
    for layer in range(2):
        receiver.accept_pages(*chunk(source, ticket, layer, 0, [1]))
    done = dataclasses.replace(_done(ticket, 49), logprob=-math.inf, top_logprobs=((49, -0.5), (0, -math.inf)))
    receiver.accept_done(done)
    assert receiver.poll(ticket.ticket_id).state is TransferState.SUCCEEDED


def _remote_requests(receiver: KVReceiver) -> tuple[RemoteRequests, BatchScheduler]:
    info = RuntimeInfo(num_blocks=POOL_SHAPE["num_blocks"], block_size=POOL_SHAPE["block_size"], max_model_len=64,
                       eos_token_ids=frozenset(), bos_token_id=None, device=torch.device("cpu"))
    scheduler = BatchScheduler(SchedulerConfig(), info, enable_prefix_caching=False)
    return RemoteRequests(scheduler, receiver), scheduler


@pytest.mark.parametrize("logprobs, tops, starts", [
    (None, (), True), (2, ((1, -0.1), (2, -0.2)), True), (None, ((1, -0.1),), False), (1, ((1, -0.1), (2, -0.2)), False),
], ids=["none-asked-none-sent", "two-asked-two-sent", "none-asked-one-sent", "one-asked-two-sent"])
def test_decode_starts_only_from_the_logprobs_its_request_asked_for(logprobs, tops, starts, source):
    receiver = KVReceiver(_pool(), vocab_size=50)
    remote, scheduler = _remote_requests(receiver)
    request = Request("r", list(range(5)), SamplingParams(max_tokens=4, logprobs=logprobs))
    ticket = remote.add(request)
    for layer in range(2):
        receiver.accept_pages(*chunk(source, ticket, layer, 0, [1, 2]))
    receiver.accept_done(dataclasses.replace(_done(ticket, 7), top_logprobs=tops))
    started, failed = remote.poll()
    assert failed == []  # RECOMPUTE: a refused first token is prefilled here instead
    if starts:
        assert [s.request.output_ids for s in started] == [[7]]
        assert receiver.num_rejected == 0
    else:
        assert started == [] and remote.counts["failed_recomputed"] == 1
        assert "top logprobs" in remote.failure_reasons["r"]
        assert rejections(receiver) == {"bad_token": 1}
        assert scheduler.waiting[0] is request  # queued for a local prefill


# --------------------------------------------------------------------- shared memory


def test_the_shm_listener_refuses_to_start_without_room_in_dev_shm(monkeypatch):
    real = os.statvfs(shm.SHM_DIR)
    small = os.statvfs_result((real.f_bsize, 4096, 1 << 20, 256, 256, *real[5:]))  # 1 MiB free
    monkeypatch.setattr(shm.os, "statvfs", lambda path: small)
    with pytest.raises(TransportError, match=r"has 1\.0 MiB free.*needs 64\.0 MiB.*--shm-size"):
        listen("shm", KVReceiver(_pool()), max_chunk_bytes=4 << 20, max_channels=16)
    listen("shm", KVReceiver(_pool()), max_chunk_bytes=64 << 10, max_channels=16).close()  # 1 MiB fits


def test_a_replayed_transfer_is_refused_after_its_done(decode, channel, source):
    ticket = decode.issue("replayed", num_pages=2)
    rejected = decode.call("rejected")
    chunks = [chunk(source, ticket, layer, 0, [12, 13]) for layer in range(2)]
    for pages in chunks:
        channel.send_pages(*pages)
    channel.send_done(_done(ticket, first_token=11))
    replay = [chunk(_source_pool(), ticket, layer, 0, [3, 4]) for layer in range(2)]  # other bytes
    for pages in replay:
        with pytest.raises(MessageRejected, match="already succeeded"):
            channel.send_pages(*pages)
    with pytest.raises(MessageRejected, match="already succeeded"):
        channel.send_done(_done(ticket, first_token=11))
    assert decode.state(ticket.ticket_id) == ("succeeded", "", 11)
    assert decode.call("pages", ticket.ticket_id) == _expected_bytes(source, [12, 13])
    assert decode.call("rejected")["settled_ticket"] == rejected["settled_ticket"] + 3
    decode.call("release", ticket.ticket_id)
