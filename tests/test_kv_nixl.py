"""What is particular to the nixl transport (its shared behaviour is tested with every other
transport in test_kv_transports.py): the decode side pulls only from memory the sender
registered, only after the chunk's header passed the receiver's checks, and only for a
sender that introduced its agent; chunk sources are parsed strictly."""

from __future__ import annotations

import dataclasses
import os
import random

import msgpack
import pytest
import torch

from pdserve.kv_transfer import layout, messages
from pdserve.kv_transfer.messages import MalformedMessage, MessageRejected, PagesHeader
from pdserve.kv_transfer.receiver import KVReceiver, TransferState
from pdserve.kv_transfer.transports import connect, listen
from pdserve.kv_transfer.transports.base import REPLY_HEAD_BYTES, decode_reply
from pdserve.kv_transfer.transports.device_checksum import device_checksum
from pdserve.kv_transfer.transports.nixl import (
    Source,
    decode_source,
    encode_source,
    landed_checksum,
    segments,
    sent_checksum,
)
from pdserve.kv_transfer.transports.stream import FRAME, HELLO, recv_exact
from pdserve.runtime.kv_pool import KVPool

POOL = {"num_layers": 2, "num_blocks": 12, "block_size": 4, "num_kv_heads": 2, "head_dim": 8, "dtype": torch.float32}


def _header(ticket, layer: int, pages: list[int], source: KVPool) -> PagesHeader:
    return PagesHeader(ticket.request_id, ticket.ticket_id, ticket.secret, layer, 0, len(pages), "float32",
                       layout.chunk_shape(ticket.layout, len(pages)), layout.chunk_nbytes(ticket.layout, len(pages)),
                       layout.checksum_pages(source, layer, pages))


@pytest.fixture()
def link():
    receiver = KVReceiver(KVPool(**POOL))
    listener = listen("nixl", receiver)
    channel = connect(listener.address, timeout=10.0)
    yield receiver, listener, channel
    channel.close()
    listener.close()


def _forged(channel, header: PagesHeader, source: Source) -> str | None:
    """Send a chunk frame naming `source`, as a sender that lies about its memory would."""
    encoded = encode_source(source)
    with channel._lock:
        return channel._send_frame(messages.encode(header), len(encoded), inline=memoryview(encoded))


def test_a_chunk_naming_memory_the_sender_never_registered_is_refused(link):
    receiver, _, channel = link
    source = KVPool(**POOL)
    source.kv.normal_()
    ticket = receiver.issue("forged", [3, 4], 0, 8)
    channel.ping()  # the link is up and the sender's agent introduced
    stranger = torch.ones(layout.chunk_nbytes(ticket.layout, 2) // 4)  # never registered with NIXL
    header = _header(ticket, 0, [0, 1], source)
    reason = _forged(channel, header, Source("DRAM", 0, [(stranger.data_ptr(), header.nbytes)]))
    assert reason is not None and "cannot read the chunk" in reason
    assert receiver.rejected["pull_failed"] == 1
    assert receiver.poll(ticket.ticket_id).state is TransferState.FAILED
    assert not receiver.pool.kv.any(), "nothing landed"


def test_a_chunk_is_checked_before_anything_is_read(link):
    receiver, _, channel = link
    source = KVPool(**POOL)
    ticket = receiver.issue("checked", [3, 4], 0, 8)
    header = _header(ticket, 0, [0, 1], source)
    bad_secret = dataclasses.replace(header, secret=b"\0" * 16)
    with pytest.raises(MessageRejected, match="wrong secret"):
        channel.send_pool_pages(bad_secret, source, [0, 1])
    out_of_bounds = dataclasses.replace(header, page_start=1)
    with pytest.raises(MessageRejected, match="outside the ticket"):
        channel.send_pool_pages(out_of_bounds, source, [0, 1])
    assert receiver.rejected["bad_secret"] == 1 and receiver.rejected["out_of_bounds"] == 1
    assert receiver.rejected["pull_failed"] == 0


def test_pool_chunks_sent_without_waiting_land_and_a_refused_one_fails_its_done(link):
    receiver, _, channel = link
    source = KVPool(**POOL)
    source.kv.normal_()
    good = receiver.issue("good", [3, 4], 0, 8)
    for layer in range(POOL["num_layers"]):
        channel.send_pool_pages(_header(good, layer, [0, 1], source), source, [0, 1], wait=False)
    channel.send_done(messages.TransferDone(good.request_id, good.ticket_id, good.secret, 5, 0.0))
    assert receiver.poll(good.ticket_id).state is TransferState.SUCCEEDED
    assert torch.equal(receiver.pool.kv[:, :, [3, 4]], source.kv[:, :, [0, 1]])
    bad = receiver.issue("bad", [6, 7], 0, 8)
    wrong = _header(bad, 0, [0, 1], source)
    channel.send_pool_pages(dataclasses.replace(wrong, checksum=wrong.checksum ^ 1), source, [0, 1], wait=False)
    channel.send_pool_pages(_header(bad, 1, [0, 1], source), source, [0, 1], wait=False)
    with pytest.raises(MessageRejected, match="checksum"):
        channel.send_done(messages.TransferDone(bad.request_id, bad.ticket_id, bad.secret, 5, 0.0))
    assert receiver.poll(bad.ticket_id).state is TransferState.FAILED


@pytest.mark.parametrize("blocks", [[0, 1, 2], [5, 1, 8]], ids=["consecutive", "scattered"])
def test_the_checksum_kind_follows_the_senders_memory_and_both_halves_agree(blocks):
    """Host pages carry XXH3, which a host pool's landing takes itself; GPU pages carry the
    device checksum (computed here on CPU tensors: its value is the same on every
    device), which the listener recomputes over what landed, wherever that is."""
    source = KVPool(**POOL)
    source.kv.normal_()
    assert sent_checksum(source, 1, blocks) == layout.checksum_pages(source, 1, blocks)
    receiver = KVReceiver(KVPool(**POOL))
    ticket = receiver.issue("kinds", [9, 3, 4], 0, 12)
    sent = device_checksum([layout.run_view(source, 1, run) for run in layout.pool_runs(source, blocks)])
    landing = receiver.land_pages(dataclasses.replace(_header(ticket, 1, blocks, source), checksum=sent))
    receiver.pool.kv[1, :, [9, 3, 4]] = source.kv[1, :, blocks]  # what the READ would land
    assert landed_checksum(landing, Source("DRAM", 0, [(1, 1)])) is None
    assert landed_checksum(landing, Source("VRAM", 0, [(1, 1)])) == sent
    receiver.pool.kv[1, 1, 3, 0, 0, 0] += 1.0  # one value changed on the way
    assert landed_checksum(landing, Source("VRAM", 0, [(1, 1)])) != sent


def _raw_link(address: str):
    import socket

    host, _, port = address.removeprefix("nixl://").rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10.0)
    assert HELLO.unpack(recv_exact(sock, HELLO.size))[0] == 0
    return sock


def _reply(sock):
    head = recv_exact(sock, REPLY_HEAD_BYTES)
    return decode_reply(head + recv_exact(sock, int.from_bytes(head[1:5], "little")))


def test_a_chunk_before_the_senders_agent_is_refused(link):
    receiver, listener, _ = link
    ticket = receiver.issue("early", [1], 0, 4)
    header = _header(ticket, 0, [0], KVPool(**POOL))
    encoded = encode_source(Source("DRAM", 0, [(4096, header.nbytes)]))
    body = messages.encode(header)
    with _raw_link(listener.address) as sock:
        sock.sendall(FRAME.pack(len(body), len(encoded)) + body + encoded)
        assert "before the sender's agent" in _reply(sock).reason
    assert receiver.rejected["malformed"] == 1
    assert receiver.poll(ticket.ticket_id).state is TransferState.PENDING  # nothing read, ticket intact


def test_garbage_agent_metadata_is_refused_and_counted(link):
    receiver, listener, _ = link
    from pdserve.kv_transfer.transports.nixl import AGENT_HEADER

    with _raw_link(listener.address) as sock:
        junk = os.urandom(64)
        sock.sendall(FRAME.pack(len(AGENT_HEADER), len(junk)) + AGENT_HEADER + junk)
        assert "unusable NIXL agent metadata" in _reply(sock).reason
    assert receiver.rejected["malformed"] == 1


@pytest.mark.parametrize("body, match", [
    (b"\xc1", "not msgpack"),
    (msgpack.packb([1, 2]), "map of mem, dev, runs"),
    (msgpack.packb({"mem": "HBM", "dev": 0, "runs": [[1, 8]]}), "bad mem"),
    (msgpack.packb({"mem": "DRAM", "dev": 0, "runs": []}), "bad mem, dev or runs"),
    (msgpack.packb({"mem": "DRAM", "dev": 0, "runs": [[1, 0], [2, 8]]}), "positive integers"),
    (msgpack.packb({"mem": "DRAM", "dev": 0, "runs": [[-1, 8]]}), "positive integers"),
])
def test_chunk_sources_are_parsed_strictly(body, match):
    with pytest.raises(MalformedMessage, match=match):
        decode_source(body)
    source = decode_source(encode_source(Source("VRAM", 1, [(64, 3), (128, 5)])))
    assert source == Source("VRAM", 1, [(64, 3), (128, 5)]) and source.nbytes == 8


def test_segments_pair_two_run_lists_over_the_same_bytes():
    rng = random.Random(7)
    for _ in range(200):
        total = rng.randrange(1, 400)
        local, remote = _random_runs(rng, total, 1000), _random_runs(rng, total, 50_000)
        left, right = segments(local, remote)
        assert left[:, 1].tolist() == right[:, 1].tolist() and int(left[:, 1].sum()) == total
        assert _bytes_of(left) == _bytes_of_runs(local) and _bytes_of(right) == _bytes_of_runs(remote)


def _random_runs(rng: random.Random, total: int, base: int) -> list[tuple[int, int]]:
    runs, address = [], base
    while total:
        size = rng.randrange(1, total + 1)
        runs.append((address, size))
        address += size + rng.randrange(0, 3) * 100  # sometimes adjacent, sometimes not
        total -= size
    return runs


def _bytes_of(rows) -> list[int]:
    return [a + i for a, n, _ in rows.tolist() for i in range(n)]


def _bytes_of_runs(runs) -> list[int]:
    return [a + i for a, n in runs for i in range(n)]


def test_a_loopback_link_keeps_ucx_on_the_loopback_device():
    # The listener fixture and this process's channel ran with 127.0.0.1 addresses.
    receiver = KVReceiver(KVPool(**POOL))
    with listen("nixl", receiver):
        assert os.environ.get("UCX_NET_DEVICES") == "lo"
