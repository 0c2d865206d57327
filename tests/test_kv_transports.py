"""KV transports (grpc, tcp, gloo, shm) between real processes.

The decode side runs in a spawned child: a small KVPool, a KVReceiver and a listener,
driven by plain-data commands over a multiprocessing Queue. The parent is the prefill side:
it reads pages from a pool of known values and sends them over a channel. Each transport
gets the same checks: bit-exact pages at the ticket's blocks, every kind of rejection, a
sender killed mid-transfer, a decode worker killed under a sender.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pdserve.kv_transfer import layout, messages
from pdserve.kv_transfer.messages import KVTicket, MessageRejected, PagesHeader, TransferAbort, TransferDone
from pdserve.kv_transfer.receiver import KVReceiver, TransferState
from pdserve.kv_transfer.transports import (
    PeerInfo,
    TransportError,
    choose_transport,
    connect,
    listen,
    probe,
)
from pdserve.kv_transfer.transports.base import serve_frame
from pdserve.runtime.kv_pool import KVPool

KINDS = ["grpc", "tcp", "gloo", "shm"]
CTX = multiprocessing.get_context("spawn")
POOL_SHAPE = {"num_layers": 2, "num_blocks": 16, "block_size": 4, "num_kv_heads": 2, "head_dim": 8,
              "dtype": torch.float32}
# Small enough that a 2 MiB payload is over the limit; every test chunk is a few KiB.
LISTENER_OPTIONS = {"max_chunk_bytes": 1 << 20}
STARTUP_S = 60.0  # a spawned child imports torch: seconds on a busy 2-core machine
CALL_S = 10.0  # every channel call and every command to the child is bounded by this


def _pool() -> KVPool:
    return KVPool(**POOL_SHAPE)


def _source_pool() -> KVPool:
    """Known values, all distinct and exact in float32."""
    pool = _pool()
    pool.kv.copy_(torch.arange(pool.kv.numel(), dtype=torch.float32).view_as(pool.kv) * 0.5 + 1.0)
    return pool


def _chunk(source: KVPool, ticket: KVTicket, layer: int, page_start: int, src_blocks: list[int],
           **overrides) -> tuple[PagesHeader, memoryview]:
    """A well-formed chunk carrying `src_blocks` of `source` to the ticket's pages from
    `page_start`; `overrides` replace header fields after the checksum is taken."""
    payload = layout.to_bytes(layout.read_pages(source, layer, src_blocks))
    header = PagesHeader(
        request_id=ticket.request_id, ticket_id=ticket.ticket_id, secret=ticket.secret, layer=layer,
        page_start=page_start, num_pages=len(src_blocks), dtype=ticket.layout.dtype,
        shape=layout.chunk_shape(ticket.layout, len(src_blocks)), nbytes=payload.nbytes,
        checksum=layout.checksum(payload))
    return dataclasses.replace(header, **overrides), payload


def _send_all(channel, source: KVPool, ticket: KVTicket, src_blocks: list[int], first_token: int) -> None:
    for layer in range(source.kv.shape[0]):
        channel.send_pages(*_chunk(source, ticket, layer, 0, src_blocks))
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
                "expire": lambda: receiver.expire()}
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
        try:
            status, value = self.results.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"decode child ({self.kind}, exit code {self.process.exitcode}) did not "
                                 f"answer {what!r} within {timeout} s") from None
        assert status == "ok", f"decode child failed on {what!r}: {value}"
        return value

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
    channel.send_pages(*_chunk(source, ticket, 0, 0, src_blocks[:2]))
    channel.send_pages(*_chunk(source, ticket, 0, 2, src_blocks[2:]))
    channel.send_pages(*_chunk(source, ticket, 1, 0, src_blocks))
    assert decode.state(ticket.ticket_id)[0] == "transferring"
    channel.send_done(_done(ticket, first_token=42))
    assert decode.state(ticket.ticket_id) == ("succeeded", "", 42)
    assert decode.call("pages", ticket.ticket_id) == _expected_bytes(source, src_blocks)
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
    header, payload = _chunk(source, ticket, 0, 0, [1, 2])
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
        channel.send_pages(*_chunk(source, ticket, 0, 0, [3, 4], secret=b"\0" * 16))
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
    header, payload = _chunk(source, ticket, 0, 0, [1, 2, 3])
    with pytest.raises(MessageRejected, match=match):
        channel.send_pages(dataclasses.replace(header, **bad), payload)
    assert decode.state(ticket.ticket_id)[0] == "failed"  # the secret was right: the transfer is broken
    decode.call("release", ticket.ticket_id)


def test_a_chunk_over_the_links_limit_is_refused_before_sending(decode, channel, source):
    ticket = decode.issue("oversized", num_pages=1)
    header, _ = _chunk(source, ticket, 0, 0, [1])
    assert channel.max_chunk_bytes == LISTENER_OPTIONS["max_chunk_bytes"]
    with pytest.raises(MessageRejected, match="exceeds"):
        channel.send_pages(header, bytes(channel.max_chunk_bytes + 1))
    _send_all(channel, source, ticket, [1], first_token=1)  # neither link nor ticket harmed
    assert decode.state(ticket.ticket_id)[0] == "succeeded"
    decode.call("release", ticket.ticket_id)


def test_a_chunk_for_an_unknown_ticket_is_rejected(decode, channel, source):
    ticket = decode.issue("known", num_pages=1)
    header, payload = _chunk(source, ticket, 0, 0, [1], ticket_id=ticket.ticket_id + 1000)
    with pytest.raises(MessageRejected, match="no live ticket"):
        channel.send_pages(header, payload)
    decode.call("release", ticket.ticket_id)


def test_done_before_every_page_is_rejected_and_fails_the_ticket(decode, channel, source):
    ticket = decode.issue("early-done", num_pages=2)
    channel.send_pages(*_chunk(source, ticket, 0, 0, [1, 2]))  # layer 1 never sent
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
    channel.send_pages(*_chunk(_source_pool(), ticket, 0, 0, [5]))
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
    chan.send_pages(*_chunk(source, ticket, 0, 0, [1]))
    peer.kill()
    started = time.monotonic()
    with pytest.raises(TransportError):
        chan.send_pages(*_chunk(source, ticket, 1, 0, [1]))
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
    ticket = receiver.issue("r", [0], 0, 4)
    assert "no payload" in serve_frame(receiver, messages.encode(_done(ticket)), b"xx")
    assert receiver.num_rejected == 0  # none of these reached the ticket checks
    assert receiver.poll(ticket.ticket_id).state is TransferState.PENDING
