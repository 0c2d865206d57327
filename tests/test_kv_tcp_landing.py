"""The tcp KV listener receiving chunks straight into a CPU pool (`tcp._PoolLanding`).

Listeners run in this process over a pool whose pages are big enough to land in (8 KiB);
senders are real channels, or plain sockets where a test needs a frame cut short. Each
test checks the pool's bytes, the ticket's state, the receiver's refusal counts and the
link's staging memory exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
import tracemalloc

import pytest
import torch
from kv_helpers import CALL_S, chunk, eventually, rejections

from pdserve.kv_transfer import layout, messages
from pdserve.kv_transfer.messages import KVTicket, MessageRejected, PagesHeader, TransferDone
from pdserve.kv_transfer.receiver import KVReceiver, Landing, TransferState
from pdserve.kv_transfer.transports import TransportError, connect, listen, tcp
from pdserve.kv_transfer.transports.stream import FRAME, HELLO, Deadline, recv_exact
from pdserve.runtime.kv_pool import KVPool

# Pages of 16 x 2 x 64 float32 = 8 KiB: the listener lands them (checked in `_local`).
POOL_SHAPE = {"num_layers": 2, "num_blocks": 72, "block_size": 16, "num_kv_heads": 2, "head_dim": 64,
              "dtype": torch.float32}
SMALL_PAGES = {**POOL_SHAPE, "block_size": 4, "head_dim": 8}  # 256 B pages: through a buffer
LISTENER_OPTIONS = {"max_chunk_bytes": 1 << 20}


def _source_pool(shape: dict = POOL_SHAPE) -> KVPool:
    """Known values, all distinct and exact in float32."""
    pool = KVPool(**shape)
    pool.kv.copy_(torch.arange(pool.kv.numel(), dtype=torch.float32).view_as(pool.kv) * 0.5 + 1.0)
    return pool


@pytest.fixture(scope="module")
def source() -> KVPool:
    return _source_pool()


@contextlib.contextmanager
def _local(shape: dict = POOL_SHAPE, **options):
    """A tcp listener in this process over a fresh zeroed pool; yields (listener, receiver)."""
    receiver = KVReceiver(KVPool(**shape))
    with listen("tcp", receiver, **{**LISTENER_OPTIONS, **options}) as listener:
        yield listener, receiver



def _done(ticket: KVTicket, first_token: int = 0) -> TransferDone:
    return TransferDone(ticket.request_id, ticket.ticket_id, ticket.secret, first_token, -0.25)


def _send_all(channel, source: KVPool, ticket: KVTicket, src_blocks: list[int], first_token: int) -> None:
    for layer in range(source.kv.shape[0]):
        channel.send_pages(*chunk(source, ticket, layer, 0, src_blocks))
    channel.send_done(_done(ticket, first_token))


def _pages(pool: KVPool, blocks) -> bytes:
    return pool.kv[:, :, list(blocks)].contiguous().view(torch.uint8).numpy().tobytes()




def _transfer_succeeds(channel, receiver: KVReceiver, source: KVPool, request_id: str) -> None:
    """A whole transfer over `channel` into the pool's top blocks lands the source's bytes."""
    blocks = [receiver.pool.num_blocks - 1, receiver.pool.num_blocks - 3]
    ticket = receiver.issue(request_id, blocks, 0, 32)
    _send_all(channel, source, ticket, [3, 8], first_token=7)
    assert receiver.poll(ticket.ticket_id)[:3] == (TransferState.SUCCEEDED, _done(ticket, 7), "")
    assert _pages(receiver.pool, blocks) == _pages(source, [3, 8])
    receiver.release(ticket.ticket_id)


def _released_promptly(receiver: KVReceiver, ticket_id: int) -> bool:
    """release() returns (it waits for chunks still being written into the ticket's blocks)."""
    releaser = threading.Thread(target=receiver.release, args=(ticket_id,), daemon=True)
    releaser.start()
    releaser.join(CALL_S)
    return not releaser.is_alive()


def _raw_link(listener) -> socket.socket:
    """A plain socket to the listener, its hello read."""
    host, _, port = listener.address.removeprefix("tcp://").rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=CALL_S)
    assert HELLO.unpack(recv_exact(sock, HELLO.size))[0] == 0
    return sock


def _frame(header: PagesHeader, payload: memoryview | bytes) -> bytes:
    encoded = messages.encode(header)
    return FRAME.pack(len(encoded), len(payload)) + encoded + bytes(payload)


# ----------------------------------------------------------------- which listeners land


def test_cpu_pools_with_pages_of_4_kib_or_more_are_landed_in():
    assert layout.page_nbytes(KVPool(**POOL_SHAPE)) == 8192
    assert tcp.lands_in_pool(KVPool(**POOL_SHAPE))
    assert not tcp.lands_in_pool(KVPool(**SMALL_PAGES))  # the scatter read does not pay: see LAND_PAGES_FROM
    # recv_into cannot write device memory (a CUDA pool); the meta device stands in for it here
    assert not tcp.lands_in_pool(KVPool(**POOL_SHAPE, device="meta"))


def test_small_pages_still_go_through_the_links_buffer():
    small = _source_pool(SMALL_PAGES)
    with _local(SMALL_PAGES) as (listener, receiver), connect(listener.address, timeout=CALL_S) as chan:
        ticket = receiver.issue("small", [5, 9], 0, 8)
        _send_all(chan, small, ticket, [1, 2], first_token=1)
        assert receiver.poll(ticket.ticket_id).state is TransferState.SUCCEEDED
        assert _pages(receiver.pool, [5, 9]) == _pages(small, [1, 2])
        assert listener.staging_bytes == layout.chunk_nbytes(receiver.layout, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_pool_takes_chunks_through_the_links_buffer(source):
    shape = {**POOL_SHAPE, "device": "cuda"}
    with _local(shape) as (listener, receiver), connect(listener.address, timeout=CALL_S) as chan:
        ticket = receiver.issue("cuda", [4, 11], 0, 32)
        _send_all(chan, source, ticket, [6, 2], first_token=2)
        assert receiver.poll(ticket.ticket_id).state is TransferState.SUCCEEDED
        assert receiver.pool.kv[:, :, [4, 11]].cpu().contiguous().numpy().tobytes() == _pages(source, [6, 2])
        assert listener.staging_bytes == layout.chunk_nbytes(receiver.layout, 2)


# ------------------------------------------------------------------------- landing


@pytest.mark.parametrize("blocks, buffers_per_read", [
    ([4, 5, 6, 7], None),  # one run of k pages and one of v
    ([9, 2, 14, 5], None),  # a run per page
    ([9, 2, 14, 5], 3),  # ... over more reads than one takes buffers
    ([10, 11, 3, 20, 21], None),  # runs of 2, 1 and 2 pages
], ids=["contiguous", "scattered", "scattered-3-per-read", "mixed"])
def test_pages_land_bit_exact_in_the_tickets_blocks(blocks, buffers_per_read, source, monkeypatch):
    if buffers_per_read is not None:
        monkeypatch.setattr(tcp, "_BUFFERS_PER_CALL", buffers_per_read)
    src_blocks = [1, 17, 8, 3, 12][:len(blocks)]
    with _local() as (listener, receiver), connect(listener.address, timeout=CALL_S) as chan:
        ticket = receiver.issue("exact", blocks, 1, 16 * len(blocks) + 19)
        # layer 0 in two chunks, layer 1 in one
        chan.send_pages(*chunk(source, ticket, 0, 0, src_blocks[:2]))
        chan.send_pages(*chunk(source, ticket, 0, 2, src_blocks[2:]))
        chan.send_pages(*chunk(source, ticket, 1, 0, src_blocks))
        assert receiver.poll(ticket.ticket_id).state is TransferState.TRANSFERRING
        chan.send_done(_done(ticket, first_token=42))
        assert receiver.poll(ticket.ticket_id)[:3] == (TransferState.SUCCEEDED, _done(ticket, 42), "")
        assert _pages(receiver.pool, blocks) == _pages(source, src_blocks)
        others = [b for b in range(receiver.pool.num_blocks) if b not in blocks]
        assert not receiver.pool.kv[:, :, others].any()  # nothing outside the ticket's blocks
        assert receiver.num_rejected == 0
        assert listener.staging_bytes == 0


def test_a_bfloat16_pool_lands_bit_exact():
    shape = {**POOL_SHAPE, "dtype": torch.bfloat16}  # 4 KiB pages
    source = _source_pool(shape)
    with _local(shape) as (listener, receiver), connect(listener.address, timeout=CALL_S) as chan:
        assert tcp.lands_in_pool(receiver.pool)
        ticket = receiver.issue("bf16", [30, 3, 31], 0, 48)
        _send_all(chan, source, ticket, [2, 40, 9], first_token=4)
        assert receiver.poll(ticket.ticket_id).state is TransferState.SUCCEEDED
        assert _pages(receiver.pool, [30, 3, 31]) == _pages(source, [2, 40, 9])
        assert listener.staging_bytes == 0


def test_a_cpu_pool_costs_a_link_no_staging_memory(source):
    """Refused chunks are drained in small pieces and admitted ones land in the pool: no
    link ever holds a buffer of a chunk's size."""
    src_blocks = list(range(64))
    chunk_bytes = layout.chunk_nbytes(layout.layout_of(source), len(src_blocks))  # 1 MiB
    with _local(max_chunk_bytes=2 * chunk_bytes) as (listener, receiver):
        ticket = receiver.issue("unstaged", list(range(4, 68)), 0, 1024)
        chunks = [chunk(source, ticket, layer, 0, src_blocks) for layer in range(2)]  # made before tracing
        channels = [connect(listener.address, timeout=CALL_S) for _ in range(3)]
        tracemalloc.start()
        try:
            for chan in channels:
                with pytest.raises(MessageRejected, match="secret"):
                    chan.send_pages(dataclasses.replace(chunks[0][0], secret=b"\0" * 16), chunks[0][1])
            for header, payload in chunks:
                channels[0].send_pages(header, payload)
            channels[0].send_done(_done(ticket, 3))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert receiver.poll(ticket.ticket_id).state is TransferState.SUCCEEDED
        assert _pages(receiver.pool, range(4, 68)) == _pages(source, src_blocks)
        assert rejections(receiver) == {"bad_secret": 3}
        assert listener.staging_bytes == 0
        # A buffer for the chunk would be all of it; what is traced is msgpack's (256 KiB
        # per encode), the refused payloads' drain (64 KiB) and small change.
        assert peak < chunk_bytes // 2
        for chan in channels:
            chan.close()


def test_a_corrupted_payload_fails_the_ticket_and_the_link_stays_usable(source):
    with _local() as (listener, receiver), connect(listener.address, timeout=CALL_S) as chan:
        ticket = receiver.issue("corrupt", [2, 3], 0, 32)
        header, payload = chunk(source, ticket, 0, 0, [1, 2])
        corrupted = bytearray(payload)
        corrupted[5000] ^= 0x10  # after the checksum was taken
        with pytest.raises(MessageRejected, match="checksum"):
            chan.send_pages(header, corrupted)
        status = receiver.poll(ticket.ticket_id)
        assert status.state is TransferState.FAILED and "checksum" in status.reason
        assert rejections(receiver) == {"checksum": 1}
        with pytest.raises(MessageRejected, match="already failed"):  # the rest of it is refused
            chan.send_pages(*chunk(source, ticket, 1, 0, [1, 2]))
        assert _released_promptly(receiver, ticket.ticket_id)
        chan.ping()
        _transfer_succeeds(chan, receiver, source, "after-corruption")
        assert rejections(receiver) == {"checksum": 1, "settled_ticket": 1}


def _corrupted(source: KVPool, ticket: KVTicket, layer: int) -> tuple[PagesHeader, bytearray]:
    header, payload = chunk(source, ticket, layer, 0, [1, 2])
    corrupted = bytearray(payload)
    corrupted[5000] ^= 0x10  # after the checksum was taken
    return header, corrupted


def test_chunks_sent_without_waiting_land_and_their_done_settles_them(source):
    deep_shape = {**POOL_SHAPE, "num_layers": 9}
    with _local(deep_shape) as (listener, receiver), connect(listener.address, timeout=CALL_S) as chan:
        deep = _source_pool(deep_shape)
        blocks = [5, 9]
        ticket = receiver.issue("in-flight", blocks, 0, 32)
        for layer in range(9):  # more chunks than the channel keeps in flight
            chan.send_pages(*chunk(deep, ticket, layer, 0, [3, 8]), wait=False)
        chan.send_done(_done(ticket, 4))
        assert not chan._in_flight
        assert receiver.poll(ticket.ticket_id)[:3] == (TransferState.SUCCEEDED, _done(ticket, 4), "")
        assert _pages(receiver.pool, blocks) == _pages(deep, [3, 8])


def test_a_chunk_refused_in_flight_fails_its_tickets_done_with_the_first_reason(source):
    with _local() as (listener, receiver), connect(listener.address, timeout=CALL_S) as chan:
        ticket = receiver.issue("corrupt-in-flight", [2, 3], 0, 32)
        chan.send_pages(*_corrupted(source, ticket, 0), wait=False)  # returns before the verdict
        chan.send_pages(*chunk(source, ticket, 1, 0, [1, 2]), wait=False)
        with pytest.raises(MessageRejected, match="checksum"):  # not the later "already failed"
            chan.send_done(_done(ticket))
        assert rejections(receiver) == {"checksum": 1, "settled_ticket": 2}
        _transfer_succeeds(chan, receiver, source, "after-corruption")


def test_a_verdict_read_during_another_tickets_call_is_kept_for_its_own(source):
    with _local() as (listener, receiver), connect(listener.address, timeout=CALL_S) as chan:
        bad = receiver.issue("bad", [2, 3], 0, 32)
        good = receiver.issue("good", [10, 11], 0, 32)
        chan.send_pages(*_corrupted(source, bad, 0), wait=False)
        for _ in range(chan.IN_FLIGHT_CHUNKS + 1):  # reads the bad chunk's verdict; raises nothing
            chan.send_pages(*chunk(source, good, 0, 0, [4, 5]), wait=False)
        chan.send_pages(*chunk(source, good, 1, 0, [4, 5]), wait=False)
        chan.send_done(_done(good, 3))
        assert receiver.poll(good.ticket_id).state is TransferState.SUCCEEDED
        with pytest.raises(MessageRejected, match="checksum"):
            chan.send_pages(*chunk(source, bad, 1, 0, [1, 2]), wait=False)
        assert chan._refused == {}


def test_an_idle_link_with_chunks_in_flight_keeps_their_verdicts(source):
    """The idle check reads the verdicts still on the link first: they would look like the
    listener's hang-up and be lost with a needless reconnect."""
    with _local() as (listener, receiver), connect(listener.address, timeout=CALL_S) as chan:
        ticket = receiver.issue("idle", [2, 3], 0, 32)
        chan.send_pages(*_corrupted(source, ticket, 0), wait=False)
        time.sleep(0.2)  # the verdict is on the link
        chan.last_used -= chan.idle_timeout  # idle long enough for the channel to prove the link
        with pytest.raises(MessageRejected, match="checksum"):
            chan.send_done(_done(ticket))
        assert chan.reconnects == 0


@pytest.mark.parametrize("extra", [8, -8], ids=["longer", "shorter"])
def test_a_payload_of_other_than_the_headers_bytes_is_refused_and_the_link_stays_in_step(extra, source):
    with _local() as (listener, receiver), connect(listener.address, timeout=CALL_S) as chan:
        ticket = receiver.issue("misfit", [2, 3], 0, 32)
        header, payload = chunk(source, ticket, 0, 0, [1, 2])
        misfit = bytes(payload) + bytes(extra) if extra > 0 else bytes(payload)[:extra]
        with pytest.raises(MessageRejected, match="payload of"):
            chan._request(messages.encode(header), misfit)  # the channel's own checks would refuse it
        assert receiver.poll(ticket.ticket_id).state is TransferState.FAILED  # right secret, broken chunk
        assert rejections(receiver) == {"bad_layout": 1}
        assert not receiver.pool.kv.any()
        receiver.release(ticket.ticket_id)
        _transfer_succeeds(chan, receiver, source, "after-misfit")


def test_a_refused_chunks_payload_is_skipped_and_the_ticket_stays_usable(source):
    with _local() as (listener, receiver), connect(listener.address, timeout=CALL_S) as chan:
        ticket = receiver.issue("refused", [6, 1], 0, 32)
        with pytest.raises(MessageRejected, match="secret"):
            chan.send_pages(*chunk(source, ticket, 0, 0, [4, 5], secret=b"\0" * 16))
        with pytest.raises(MessageRejected, match="no live ticket"):
            chan.send_pages(*chunk(source, ticket, 0, 0, [4, 5], ticket_id=ticket.ticket_id + 7))
        assert receiver.poll(ticket.ticket_id).state is TransferState.PENDING
        assert not receiver.pool.kv.any()
        _send_all(chan, source, ticket, [4, 5], first_token=9)
        assert receiver.poll(ticket.ticket_id).state is TransferState.SUCCEEDED
        assert _pages(receiver.pool, [6, 1]) == _pages(source, [4, 5])
        assert rejections(receiver) == {"bad_secret": 1, "unknown_ticket": 1}


@pytest.mark.parametrize("blocks", [[4, 5], [9, 2]], ids=["contiguous", "scattered"])
def test_a_sender_that_hangs_up_mid_payload_fails_the_ticket_and_is_counted(blocks, source):
    with _local() as (listener, receiver):
        ticket = receiver.issue("cut", blocks, 0, 32)
        header, payload = chunk(source, ticket, 0, 0, [1, 2])
        sock = _raw_link(listener)
        sock.sendall(_frame(header, payload)[:-(len(payload) // 2 + 100)])  # into the second page's k
        sock.close()
        eventually(lambda: receiver.poll(ticket.ticket_id).state is TransferState.FAILED, "the ticket failing")
        assert "middle of a chunk" in receiver.poll(ticket.ticket_id).reason
        eventually(lambda: listener.num_links == 0, "the link's thread ending")
        assert rejections(receiver) == {"truncated": 1}  # counted once, by the landing
        assert _released_promptly(receiver, ticket.ticket_id)
        with connect(listener.address, timeout=CALL_S) as chan:
            _transfer_succeeds(chan, receiver, source, "after-hang-up")
        assert receiver.num_rejected == 1


def test_a_payload_that_stalls_midway_fails_the_ticket_and_drops_the_link(source):
    with _local(op_timeout=0.5) as (listener, receiver):
        ticket = receiver.issue("stall", [7, 3], 0, 32)
        header, payload = chunk(source, ticket, 1, 0, [1, 2])
        sock = _raw_link(listener)
        sock.sendall(_frame(header, payload)[:-100])  # ... and the last 100 bytes never come
        try:
            assert sock.recv(1) == b""  # the listener hung up
        except ConnectionResetError:
            pass
        sock.close()
        status = receiver.poll(ticket.ticket_id)
        assert status.state is TransferState.FAILED and "middle of a chunk" in status.reason
        assert rejections(receiver) == {"stalled_frame": 1}
        assert _released_promptly(receiver, ticket.ticket_id)
        with connect(listener.address, timeout=CALL_S) as chan:
            _transfer_succeeds(chan, receiver, source, "after-stall")


def test_a_landing_that_fails_inside_the_listener_fails_its_ticket_and_frees_it(source, monkeypatch):
    def broken_views(landing):
        raise RuntimeError("no views today")

    monkeypatch.setattr(Landing, "views", broken_views)
    with _local() as (listener, receiver):
        ticket = receiver.issue("bug", [5, 6], 0, 32)
        with connect(listener.address, timeout=CALL_S) as chan, pytest.raises(TransportError):
            chan.send_pages(*chunk(source, ticket, 0, 0, [1, 2]))  # its payload unread: the link is dropped
        status = receiver.poll(ticket.ticket_id)
        assert status.state is TransferState.FAILED and "no views today" in status.reason
        assert rejections(receiver) == {"internal_error": 1}
        assert _released_promptly(receiver, ticket.ticket_id)
        monkeypatch.undo()
        with connect(listener.address, timeout=CALL_S) as chan:
            _transfer_succeeds(chan, receiver, source, "after-bug")


# ------------------------------------------------------------------ the scatter read


class _Trickle:
    """A socket stand-in whose recvmsg_into hands out at most `step` bytes a call."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.sent = data, step, 0
        self.buffers_per_call: list[int] = []

    def settimeout(self, seconds: float) -> None:
        pass

    def recvmsg_into(self, buffers):
        self.buffers_per_call.append(len(buffers))
        given = 0
        for buffer in buffers:
            take = min(len(buffer), self.step - given, len(self.data) - self.sent)
            buffer[:take] = self.data[self.sent:self.sent + take]
            self.sent += take
            given += take
        return given, [], 0, None


@pytest.mark.parametrize("step", [1, 5, 13, 64, 1000])
def test_the_scatter_read_fills_every_buffer_in_order(step, monkeypatch):
    monkeypatch.setattr(tcp, "_BUFFERS_PER_CALL", 3)
    sizes = [7, 0, 1, 16, 3, 0, 25, 9, 2]
    data = bytes(range(sum(sizes)))
    targets = [bytearray(size) for size in sizes]
    sock = _Trickle(data, step)
    tcp.recv_into_buffers(sock, [memoryview(target) for target in targets], Deadline(CALL_S))
    assert b"".join(targets) == data
    assert sock.sent == len(data)
    assert max(sock.buffers_per_call) <= 3


def test_the_scatter_read_raises_on_end_of_stream():
    targets = [bytearray(4), bytearray(4)]
    with pytest.raises(ConnectionError, match="closed"):
        tcp.recv_into_buffers(_Trickle(b"abcdef", 4), [memoryview(t) for t in targets], Deadline(CALL_S))
    assert targets == [bytearray(b"abcd"), bytearray(b"ef\0\0")]
