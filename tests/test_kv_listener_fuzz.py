"""Hostile peers against every KV listener that runs on a CPU (tcp, shm, grpc, gloo).

Each target throws one kind of abuse at a listener in this process, from seeded random
generators and Hypothesis (derandomized: every run tries the same cases): random bytes and
truncated or oversized frames below the framing, well-formed frames with wrong tickets,
secrets and bounds, hostile message contents, frames replayed after a TransferDone, and
floods of links past max_channels. Every target then checks the same three things: the
listener's threads are alive, the receiver counted the refusals (each refused frame once,
by reason, and none as an internal error), and a normal transfer through a fresh channel
still lands exactly the source's bytes in the pool.

`CASES` sizes each target; the whole file runs in about a minute on two busy cores.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import socket
import struct
import threading
import time
from datetime import timedelta

import hypothesis
import msgpack
import pytest
import torch
import torch.distributed as dist
from hypothesis import strategies as st

from pdserve.kv_transfer import layout, messages
from pdserve.kv_transfer.messages import KVTicket, MessageRejected, PagesHeader, TransferAbort, TransferDone
from pdserve.kv_transfer.receiver import REJECTION_REASONS, KVReceiver, TransferState
from pdserve.kv_transfer.transports import TransportError, connect, grpc_transport, listen, shm, torch_dist
from pdserve.kv_transfer.transports.base import MAX_HEADER_BYTES, serve_frame
from pdserve.kv_transfer.transports.stream import FRAME, HELLO, recv_exact
from pdserve.kv_transfer.transports.torch_dist_backends import run_op
from pdserve.kv_transfer.transports.torch_dist_pairs import COUNTER as PAIR_COUNTER
from pdserve.runtime.kv_pool import KVPool

KINDS = ["tcp", "shm", "grpc", "gloo", "nixl"]
STREAM_KINDS = ["tcp", "shm"]
# Transports that move a chunk's bytes straight into the ticket's blocks and verify the
# checksum there (receiver.land_pages): a corrupted chunk is written, then fails its ticket.
IN_PLACE_KINDS = {"tcp", "nixl"}
POOL_SHAPE = {"num_layers": 2, "num_blocks": 16, "block_size": 4, "num_kv_heads": 2, "head_dim": 8,
              "dtype": torch.float32}
VOCAB = 1000
MAX_CHUNK = 64 << 10  # every legitimate chunk here is 1-4 pages: 256 B a page
OPTIONS = {"max_chunk_bytes": MAX_CHUNK, "max_channels": 4, "op_timeout": 2.0}
CALL_S = 10.0
# Cases per target and listener kind. Hypothesis targets may stop early once they have
# tried every distinct case their strategy can produce.
CASES = {"raw_bytes": 200, "hostile_frames": 600, "message_contents": 300, "replays": 30, "floods": 30,
         "gloo_heads": 30, "decode_only": 2000}
TRIED: collections.Counter[str] = collections.Counter()  # cases run, by target and kind
_SETTINGS = hypothesis.settings(deadline=None, derandomize=True, database=None, print_blob=False,
                                suppress_health_check=list(hypothesis.HealthCheck))


# ------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module", autouse=True)
def cases_tried():
    """Say how many cases each target tried (shown with -s)."""
    yield
    print("\nKV listener fuzz cases tried:", ", ".join(f"{name} {n}" for name, n in sorted(TRIED.items())))


def _pool() -> KVPool:
    return KVPool(**POOL_SHAPE)


@pytest.fixture(scope="module")
def source() -> KVPool:
    """Known values, all distinct and exact in float32."""
    pool = _pool()
    pool.kv.copy_(torch.arange(pool.kv.numel(), dtype=torch.float32).view_as(pool.kv) * 0.5 + 1.0)
    return pool


class Target:
    """A listener of one kind in this process, its receiver, and the checks every fuzz
    run ends with."""

    def __init__(self, kind: str, **options) -> None:
        self.kind = kind
        self.receiver = KVReceiver(_pool(), vocab_size=VOCAB)
        self.listener = listen(kind, self.receiver, **{**OPTIONS, **options})
        self.address = self.listener.address

    def close(self) -> None:
        self.listener.close()

    def ticket(self, request_id: str, blocks: list[int]) -> KVTicket:
        return self.receiver.issue(request_id, blocks, 0, 4 * len(blocks))

    def counted(self) -> dict[str, int]:
        return dict(self.receiver.rejected)

    def assert_still_serving(self, source: KVPool) -> None:
        """The listener's threads are up, nothing hit an internal error, and a fresh
        channel carries a whole transfer bit-exact."""
        acceptor = getattr(self.listener, "_acceptor", None)  # gRPC accepts on its own threads
        assert acceptor is None or acceptor.is_alive(), f"the {self.kind} listener's accepting thread died"
        assert self.receiver.rejected["internal_error"] == 0
        blocks, src_blocks = [14, 15], [9, 3]
        ticket = self.ticket("fresh", blocks)
        with connect(self.address, timeout=CALL_S) as channel:
            for layer in range(POOL_SHAPE["num_layers"]):
                channel.send_pages(*_chunk(source, ticket, layer, 0, src_blocks))
            channel.send_done(_done(ticket, 5))
        assert self.receiver.poll(ticket.ticket_id).state is TransferState.SUCCEEDED
        assert _pages(self.receiver, ticket) == source.kv[:, :, src_blocks].contiguous().numpy().tobytes()
        self.receiver.release(ticket.ticket_id)


@pytest.fixture(params=KINDS)
def target(request):
    t = Target(request.param)
    yield t
    t.close()


@pytest.fixture(params=STREAM_KINDS)
def stream_target(request):
    t = Target(request.param)
    yield t
    t.close()


def _chunk(source: KVPool, ticket: KVTicket, layer: int, page_start: int, src_blocks: list[int],
           **overrides) -> tuple[PagesHeader, bytes]:
    payload = bytes(layout.to_bytes(layout.read_pages(source, layer, src_blocks)))
    header = PagesHeader(ticket.request_id, ticket.ticket_id, ticket.secret, layer, page_start, len(src_blocks),
                         ticket.layout.dtype, layout.chunk_shape(ticket.layout, len(src_blocks)), len(payload),
                         layout.checksum(payload))
    return dataclasses.replace(header, **overrides), payload


def _done(ticket: KVTicket, first_token: int = 0, **overrides) -> TransferDone:
    return dataclasses.replace(TransferDone(ticket.request_id, ticket.ticket_id, ticket.secret, first_token, -0.5),
                               **overrides)


def _pages(receiver: KVReceiver, ticket: KVTicket) -> bytes:
    return receiver.pool.kv[:, :, list(ticket.block_ids)].contiguous().numpy().tobytes()


def _raw_connect(address: str) -> socket.socket:
    kind, _, target = address.partition("://")
    if kind == "shm":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CALL_S)
        sock.connect(shm._socket_address(target))
        return sock
    host, _, port = target.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=CALL_S)


def _send_and_hang_up(sock: socket.socket, data: bytes) -> None:
    """Send `data`, close our side, and take whatever the listener answers until it hangs
    up too. The listener may drop the link before all of `data` is sent."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):
            pass
    except OSError:  # dropped by the listener: reset, or not connected any more
        pass
    finally:
        sock.close()


# ------------------------------------------------------ below the framing: raw bytes


def _raw_cases(rng: random.Random, valid_frame: bytes, n: int) -> list[tuple[str, bytes]]:
    """(what, bytes) for one link each; the link is closed after sending."""
    cases = []
    for i in range(n):
        what = ("random", "truncated", "oversized_header", "oversized_payload")[i % 4]
        if what == "random":
            data = rng.randbytes(rng.randint(1, 3000))
        elif what == "truncated":
            data = valid_frame[:rng.randint(1, len(valid_frame) - 1)]
        elif what == "oversized_header":
            data = FRAME.pack(rng.randint(MAX_HEADER_BYTES + 1, 2**32 - 1), 0) + rng.randbytes(rng.randint(0, 64))
        else:
            data = FRAME.pack(2, rng.randint(MAX_CHUNK + 1, 2**64 - 1)) + b"\x80\x80"
        cases.append((what, data))
    return cases


def test_fuzz_raw_bytes_below_the_framing(stream_target, source):
    """Random bytes, frames cut short and lengths over the limits, one link each: every link
    ends in at least one counted refusal and never stops the listener."""
    t = stream_target
    ticket = t.ticket("raw", [0])
    header, payload = _chunk(source, ticket, 0, 0, [1])
    encoded = messages.encode(header)
    valid_frame = FRAME.pack(len(encoded), len(payload)) + encoded + (payload if t.kind == "tcp" else b"")
    cases = _raw_cases(random.Random(1), valid_frame, CASES["raw_bytes"])
    for what, data in cases:
        TRIED[f"raw_bytes[{t.kind}]"] += 1
        before = t.receiver.num_rejected
        sock = _raw_connect(t.address)
        assert HELLO.unpack(recv_exact(sock, HELLO.size))[0] == 0
        _send_and_hang_up(sock, data)
        deadline = time.monotonic() + CALL_S
        while t.receiver.num_rejected == before:  # the listener counts as it drops the link
            assert time.monotonic() < deadline, f"{what} case ({len(data)} bytes) was not refused"
            time.sleep(0.005)
    counted = t.counted()
    assert counted["oversized"] >= CASES["raw_bytes"] // 2  # both oversized families
    assert counted["truncated"] >= CASES["raw_bytes"] // 4
    assert receiver_state(t, ticket) == "pending"  # nothing reached the ticket with its secret
    t.assert_still_serving(source)


def receiver_state(t: Target, ticket: KVTicket) -> str:
    return t.receiver.poll(ticket.ticket_id).state.value


def test_fuzz_raw_bytes_into_the_grpc_port(source):
    """gRPC's own framing (HTTP/2) refuses garbage before pdserve sees a frame; the
    listener must simply go on serving."""
    t = Target("grpc")
    try:
        rng = random.Random(2)
        for _ in range(CASES["raw_bytes"] // 4):
            TRIED["raw_bytes[grpc]"] += 1
            _send_and_hang_up(_raw_connect(t.address), rng.randbytes(rng.randint(1, 3000)))
        t.assert_still_serving(source)
    finally:
        t.close()


# ---------------------------------------------- well-formed frames, hostile contents


def _hostile_frames(rng: random.Random, t: Target, source: KVPool, n: int):
    """(what, expected reason class, header bytes, payload, ticket) with one thing wrong
    each; `ticket` is a fresh live one the case may fail (right secret, wrong frame)."""
    layers, pages = POOL_SHAPE["num_layers"], 3
    for i in range(n):
        ticket = t.ticket(f"hostile-{i}", [0, 1, 2])
        header, payload = _chunk(source, ticket, rng.randrange(layers), 0, [4, 5, 6])
        what = rng.choice(["ticket_id", "secret", "request_id", "layer", "pages", "dtype", "shape", "nbytes",
                           "payload_len", "checksum", "junk_header", "kind", "done_secret", "done_token",
                           "done_early", "abort_secret", "payload_on_done", "ping_payload", "huge_payload"])
        mutated = {
            "ticket_id": {"ticket_id": ticket.ticket_id + rng.randint(1, 2**62)},
            "secret": {"secret": rng.randbytes(16)},
            "request_id": {"request_id": f"not-{ticket.request_id}"},
            "layer": {"layer": rng.choice([-1, layers, rng.randint(layers, 2**62)])},
            "pages": rng.choice([{"page_start": 1}, {"page_start": -1}, {"page_start": 2**40},
                                 {"num_pages": 0}, {"num_pages": -3}]),
            "dtype": {"dtype": rng.choice(["float16", "int8", "", "x" * 300])},
            "shape": {"shape": rng.choice([(2, pages, 4, 2, 9), (2, pages, 8, 2, 4), (pages, 2, 4, 2, 8),
                                            (2, pages, 4, 2), ()])},
            "nbytes": {"nbytes": header.nbytes + rng.choice([-4, 4, 2**40])},
            "checksum": {"checksum": header.checksum ^ (1 << rng.randrange(64))},
        }.get(what)
        if mutated is not None:
            expected = {"ticket_id": "unknown_ticket", "secret": "bad_secret", "request_id": "bad_secret",
                        "layer": "out_of_bounds", "pages": "out_of_bounds", "checksum": "checksum"}.get(what, "bad_layout")
            yield what, expected, messages.encode(dataclasses.replace(header, **mutated)), payload, ticket
        elif what == "payload_len":
            cut = payload[:rng.randrange(len(payload))] if rng.random() < 0.5 else payload + rng.randbytes(8)
            yield what, "bad_layout", messages.encode(header), cut, ticket
        elif what == "junk_header":
            junk = msgpack.packb(rng.choice([[1, 2, 3], "chunk", {"kind": "chunk"}, {"kind": "done", "x": 1},
                                             {"kind": ["chunk"]}, 2**63, None]))
            yield what, "malformed", junk + (rng.randbytes(rng.randint(0, 3)) if rng.random() < 0.5 else b""), b"", ticket
        elif what == "kind":
            plain = msgpack.unpackb(messages.encode(header))
            plain["kind"] = rng.choice(["done", "abort", "ticket", "CHUNK", ""])
            yield what, "malformed", msgpack.packb(plain), payload, ticket
        elif what == "done_secret":
            yield what, "bad_secret", messages.encode(_done(ticket, secret=rng.randbytes(16))), b"", ticket
        elif what == "done_token":
            bad = rng.choice([{"first_token": VOCAB}, {"first_token": -1}, {"first_token": 2**63},
                              {"logprob": float("nan")}, {"logprob": 7.5},
                              {"top_logprobs": ((VOCAB + 5, -1.0),)}])
            yield what, "bad_token", messages.encode(_done(ticket, **bad)), b"", ticket
        elif what == "done_early":
            yield what, "incomplete", messages.encode(_done(ticket)), b"", ticket
        elif what == "abort_secret":
            abort = TransferAbort(ticket.request_id, ticket.ticket_id, rng.randbytes(16), "x")
            yield what, "bad_secret", messages.encode(abort), b"", ticket
        elif what == "payload_on_done":
            yield what, "malformed", messages.encode(_done(ticket)), rng.randbytes(rng.randint(1, 64)), ticket
        elif what == "ping_payload":
            yield what, "malformed", b"", rng.randbytes(rng.randint(1, 64)), ticket
        else:  # a payload over the listener's chunk limit, under a valid header
            yield what, "oversized", messages.encode(header), bytes(MAX_CHUNK + rng.randint(1, 4096)), ticket


def test_fuzz_hostile_frames_through_a_channel(target, source):
    """Frames a channel carries faithfully but that are wrong in one respect each: every
    one is refused with MessageRejected (the link stays usable), counted exactly once
    under its reason, and writes nothing."""
    t = target
    rng = random.Random(3)
    before = t.counted()
    expected = dict.fromkeys(REJECTION_REASONS, 0)
    with connect(t.address, timeout=CALL_S) as channel:
        for what, reason, header, payload, ticket in _hostile_frames(rng, t, source, CASES["hostile_frames"]):
            if t.kind == "gloo" and len(header) > torch_dist.HEAD_BYTES - 16:
                continue  # refused by the channel itself, before the link
            if t.kind != "grpc" and what == "huge_payload":
                continue  # these links cannot carry it in a frame: see the raw-bytes and gloo-head targets
            TRIED[f"hostile_frames[{t.kind}]"] += 1
            with pytest.raises(MessageRejected):
                channel._request(header, payload)  # the channel's own checks would refuse some first
            expected[reason] += 1
            state = receiver_state(t, ticket)
            if what == "checksum" and t.kind in IN_PLACE_KINDS:
                assert state == "failed"  # its bytes landed in the ticket's own blocks: it can never succeed
                t.receiver.pool.kv[:, :, list(ticket.block_ids)] = 0  # as the blocks' next owner overwrites them
            else:
                assert _pages(t.receiver, ticket) == bytes(len(_pages(t.receiver, ticket)))  # nothing written
                assert state in ("pending", "failed"), (what, state)
            t.receiver.release(ticket.ticket_id)
        channel.ping()  # and the link is still good
    counted = {reason: t.counted()[reason] - before[reason] for reason in REJECTION_REASONS}
    assert counted == expected
    t.assert_still_serving(source)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=12),
                    st.binary(max_size=24), st.lists(st.integers(-2**63, 2**63 - 1), max_size=6),
                    st.lists(st.lists(st.one_of(st.integers(-5, 2**40), st.floats()), max_size=3), max_size=4),
                    st.dictionaries(st.text(max_size=6), st.integers(-2**63, 2**63 - 1), max_size=3))


@st.composite
def _hostile_messages(draw, ticket: KVTicket, source: KVPool):
    """A valid chunk, done or abort of `ticket` with fields replaced, dropped or added."""
    header, payload = _chunk(source, ticket, 0, 0, [7])
    plain = msgpack.unpackb(messages.encode(draw(st.sampled_from([
        header, _done(ticket, 1), TransferAbort(ticket.request_id, ticket.ticket_id, ticket.secret, "r")]))))
    for name in draw(st.lists(st.sampled_from(sorted(plain)), max_size=3, unique=True)):
        plain[name] = draw(_VALUES)
    if draw(st.booleans()):
        plain.pop(draw(st.sampled_from(sorted(plain))))
    if draw(st.booleans()):
        plain[draw(st.text(max_size=8))] = draw(_VALUES)
    return msgpack.packb(plain), payload if plain.get("kind") == "chunk" else b""


def test_fuzz_message_contents_through_a_channel(target, source):
    """Hypothesis mutates the fields of valid messages: whatever comes, the frame is
    accepted or refused with a reason (counted once), never an internal error."""
    t = target
    ticket = t.ticket("contents", [0])
    refused = 0

    @hypothesis.settings(_SETTINGS, max_examples=CASES["message_contents"])
    @hypothesis.given(frame=_hostile_messages(ticket, _source_for_strategies()))
    def send(frame):
        nonlocal refused
        header, payload = frame
        if t.kind == "gloo" and len(header) > torch_dist.HEAD_BYTES - 16:
            return
        TRIED[f"message_contents[{t.kind}]"] += 1
        try:
            channel._request(header, payload)
        except MessageRejected:
            refused += 1

    before = t.receiver.num_rejected
    with connect(t.address, timeout=CALL_S) as channel:
        send()
        channel.ping()
    assert t.receiver.num_rejected - before == refused
    t.assert_still_serving(source)


_STRATEGY_SOURCE: list[KVPool] = []


def _source_for_strategies() -> KVPool:
    """A source pool for strategies built outside fixtures (same values as `source`)."""
    if not _STRATEGY_SOURCE:
        pool = _pool()
        pool.kv.copy_(torch.arange(pool.kv.numel(), dtype=torch.float32).view_as(pool.kv) * 0.5 + 1.0)
        _STRATEGY_SOURCE.append(pool)
    return _STRATEGY_SOURCE[0]


@hypothesis.settings(_SETTINGS, max_examples=CASES["decode_only"])
@hypothesis.given(header=st.one_of(st.binary(max_size=300), st.builds(msgpack.packb, st.recursive(
    _VALUES, lambda children: st.one_of(st.lists(children, max_size=4),
                                        st.dictionaries(st.text(max_size=6), children, max_size=4)), max_leaves=12))),
    payload=st.binary(max_size=40))
def test_fuzz_frame_decoding_never_raises(header, payload):
    """Arbitrary header bytes and msgpack values straight into serve_frame: a refusal
    with a reason, counted, and never an exception."""
    TRIED["frame_decoding"] += 1
    receiver = KVReceiver(_pool(), vocab_size=VOCAB)
    reason = serve_frame(receiver, header, payload, MAX_CHUNK)
    assert (reason is None) == (len(header) == 0 and len(payload) == 0)  # only a ping passes
    assert receiver.num_rejected == (0 if reason is None else 1)
    assert receiver.rejected["internal_error"] == 0


# ----------------------------------------------------------------- replays after done


def test_fuzz_replays_after_done(target, source):
    """Transfers that completed, then some of their frames sent again (with other bytes):
    refused as settled while the ticket is held, as unknown once released, and the pages
    keep what the transfer wrote."""
    t = target
    rng = random.Random(4)
    replays = 0
    before = t.counted()
    with connect(t.address, timeout=CALL_S) as channel:
        for i in range(CASES["replays"]):
            TRIED[f"replays[{t.kind}]"] += 1
            blocks = rng.sample(range(12), rng.randint(1, 3))
            src_blocks = rng.sample(range(16), len(blocks))
            ticket = t.ticket(f"replay-{i}", blocks)
            frames = [_chunk(source, ticket, layer, 0, src_blocks) for layer in range(POOL_SHAPE["num_layers"])]
            for frame in frames:
                channel.send_pages(*frame)
            channel.send_done(_done(ticket, 2))
            written = _pages(t.receiver, ticket)
            assert written == source.kv[:, :, src_blocks].contiguous().numpy().tobytes()
            other = rng.sample(range(16), len(blocks))
            replay = [_chunk(source, ticket, layer, 0, other) for layer in range(POOL_SHAPE["num_layers"])]
            for round_ in ("held", "released"):
                for header, payload in rng.sample(replay, rng.randint(1, len(replay))):
                    with pytest.raises(MessageRejected, match="already succeeded" if round_ == "held" else "no live"):
                        channel.send_pages(header, payload)
                    replays += 1
                with pytest.raises(MessageRejected):
                    channel.send_done(_done(ticket, 2))
                replays += 1
                assert _pages(t.receiver, ticket) == written
                if round_ == "held":
                    assert receiver_state(t, ticket) == "succeeded"
                    t.receiver.release(ticket.ticket_id)
    after = t.counted()
    settled = after["settled_ticket"] - before["settled_ticket"]
    unknown = after["unknown_ticket"] - before["unknown_ticket"]
    assert settled + unknown == replays and settled > 0 and unknown > 0
    t.assert_still_serving(source)


# ----------------------------------------------------------------------------- floods


def _open_link(t: Target):
    """A link counted against max_channels (a plain socket for tcp/shm), or None if refused."""
    if t.kind in STREAM_KINDS:
        sock = _raw_connect(t.address)
        if HELLO.unpack(recv_exact(sock, HELLO.size))[0] == 0:
            return sock
        sock.close()
        return None
    try:
        return connect(t.address, timeout=CALL_S)
    except TransportError as exc:
        assert "channel limit" in str(exc)
        return None


_LISTENER_THREAD_PREFIX = {"tcp": "kv-stream-conn", "shm": "kv-stream-conn", "nixl": "kv-stream-conn", "grpc": "kv-grpc_", "gloo": "kv-gloo-pair"}


def _listener_threads(kind: str) -> int:
    return sum(t.name.startswith(_LISTENER_THREAD_PREFIX[kind]) for t in threading.enumerate())


def test_fuzz_connection_floods(target, source):
    """Random opens and closes, in bursts past max_channels: never more links served than
    the limit, every refusal counted, the threads bounded, and the served links keep
    working."""
    t = target
    rng = random.Random(5)
    limit = OPTIONS["max_channels"]
    links, refused = [], 0
    before = t.receiver.rejected["over_connection_limit"]
    for _ in range(CASES["floods"]):
        for _ in range(rng.randint(1, 2 * limit)):
            TRIED[f"floods[{t.kind}]"] += 1
            link = _open_link(t)
            if link is None:
                refused += 1
            else:
                links.append(link)
            assert len(links) <= limit
        # Every link is served or refused, never queued: the listener serves exactly the open ones.
        assert t.listener.num_links == len(links)
        # The listener's threads: one per served link (plus gRPC's spares), none per refusal.
        assert _listener_threads(t.kind) <= limit + (grpc_transport._SPARE_THREADS if t.kind == "grpc" else 0)
        for link in rng.sample(links, rng.randint(0, len(links))):
            links.remove(link)
            link.close()
        deadline = time.monotonic() + CALL_S
        while t.listener.num_links != len(links):
            assert time.monotonic() < deadline, "closed links were not let go"
            time.sleep(0.01)
    assert refused > 0
    assert t.receiver.rejected["over_connection_limit"] - before == refused
    for link in links:
        if not isinstance(link, socket.socket):
            link.ping()
        link.close()
    t.assert_still_serving(source)


# --------------------------------------------------------- torch.distributed specifics


def test_fuzz_gloo_frame_heads(source):
    """Random frame heads (lengths and header bytes) on gloo pairs: heads over the limits
    drop the pair (counted), the rest are refused as malformed; the listener stays."""
    t = Target("gloo")
    rng = random.Random(6)
    try:
        for i in range(CASES["gloo_heads"]):
            TRIED["gloo_heads"] += 1
            before = t.receiver.num_rejected
            channel = connect(t.address, timeout=CALL_S)
            channel._stop.set()  # no keep-alive pings on this pair: the test owns it
            head = torch.tensor(list(rng.randbytes(torch_dist.HEAD_BYTES)), dtype=torch.uint8)
            if i % 2:  # within the limits: a header of random bytes, no payload
                head[:16] = torch.tensor(list(struct.pack("<QQ", rng.randint(1, 200), 0)), dtype=torch.uint8)
            run_op(channel._group.send, head, 0, CALL_S, "send a head")
            try:
                reply = torch.empty(torch_dist.REPLY_BYTES, dtype=torch.uint8)
                run_op(channel._group.recv, reply, 0, CALL_S, "read the reply")
                assert i % 2 and t.receiver.rejected["malformed"] > 0
            except TransportError:  # the listener dropped the pair
                assert not i % 2
            channel.close()
            assert t.receiver.num_rejected == before + 1
        counter_store = dist.TCPStore(*_host_port(t.address), None, False, timedelta(seconds=CALL_S),
                                      wait_for_workers=False)
        malformed = t.receiver.rejected["malformed"]
        counter_store.add(PAIR_COUNTER, rng.randint(10**4, 10**9))  # a pushed pair counter
        deadline = time.monotonic() + CALL_S
        while t.receiver.rejected["malformed"] == malformed:  # skipped whole, once seen
            assert time.monotonic() < deadline, "the listener did not notice the pushed counter"
            time.sleep(0.01)
        assert t.listener.num_links == 0  # the pushed counter started no pair
        t.assert_still_serving(source)
    finally:
        t.close()


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.partition("://")[2].rpartition(":")
    return host, int(port)
