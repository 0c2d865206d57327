"""KV transfer of a quantized (int8 / fp8) KV cache: pages move as stored, values and
scales, bit-exact, at about a quarter of float32's bytes; the receiver refuses chunks
whose dtype, scales or values are not its pool's; workers whose KV cache dtypes differ
refuse to link, saying why.

Listeners run in this process (each transport's own listener and channel, the prefill
side's real `KVPusher`); pools are big enough that tcp lands pages in the pool in place
(4 KiB pages) and nixl/gloo read the pool where it lies.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import time

import pytest
import torch
from kv_helpers import CALL_S, chunk, eventually, rejections

from pdserve.kv_transfer import layout
from pdserve.kv_transfer.messages import MessageRejected, TransferDone
from pdserve.kv_transfer.pusher import KVPusher, SendState
from pdserve.kv_transfer.receiver import KVReceiver, TransferState
from pdserve.kv_transfer.transports import connect, listen
from pdserve.kv_transfer.transports.select import LayoutMismatch, measure, probe_source
from pdserve.kv_transfer.transports.tcp import lands_in_pool
from pdserve.runtime.kv_pool import KVPool

# int8 pages of 16 x 4 x 64 = 4 KiB (+ 128 B of float16 scales): tcp lands them in place.
SHAPE = {"num_layers": 3, "num_blocks": 24, "block_size": 16, "num_kv_heads": 4, "head_dim": 64}
KINDS = ["tcp", "shm", "grpc", "gloo"] + (["nixl"] if importlib.util.find_spec("nixl") else [])


def _pool(dtype: torch.dtype, seed: int | None = None) -> KVPool:
    pool = KVPool(**SHAPE, dtype=dtype)
    if seed is not None:
        torch.manual_seed(seed)
        pool.fill_random()
    return pool


def _stored(pool: KVPool, blocks: list[int]) -> tuple[bytes, bytes]:
    """The blocks' values and scales, as bytes, every layer."""
    values = pool.kv[:, :, blocks].contiguous().view(torch.uint8).numpy().tobytes()
    return values, pool.scales[:, :, blocks].contiguous().view(torch.uint8).numpy().tobytes()


def _done(ticket) -> TransferDone:
    return TransferDone(ticket.request_id, ticket.ticket_id, ticket.secret, 5, -0.5)


@contextlib.contextmanager
def _listener(kind: str, receiver: KVReceiver):
    with listen(kind, receiver, max_chunk_bytes=1 << 20) as listener:
        yield listener


def _push(pusher: KVPusher, ticket, address: str, src_blocks: list[int], num_layers: int) -> tuple[SendState, str]:
    send_id = pusher.start(ticket, address)
    for layer in range(num_layers):
        pusher.push(send_id, layer, 0, src_blocks)
    pusher.finish(send_id, _done(ticket))
    deadline = time.monotonic() + CALL_S
    while pusher.poll(send_id)[0] is SendState.SENDING:
        assert time.monotonic() < deadline, "the send did not settle"
        time.sleep(0.01)
    return pusher.poll(send_id)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_pages_and_scales_land_bit_exact_at_a_quarter_of_float32_bytes(kind, dtype):
    source, receiver = _pool(dtype, seed=1), KVReceiver(_pool(dtype))
    assert lands_in_pool(receiver.pool)  # tcp: the landing path, scale runs after value runs
    src_blocks, dst_blocks = [3, 4, 9], [20, 2, 3]  # runs of 2 and 1 on both sides
    with _listener(kind, receiver) as listener:
        pusher = KVPusher(source, lambda address: connect(address, timeout=CALL_S))
        ticket = receiver.issue("r1", dst_blocks, 0, 40)
        assert ticket.layout.dtype == layout.dtype_name(dtype) and ticket.layout.scale_dtype == "float16"
        assert _push(pusher, ticket, listener.address, src_blocks, SHAPE["num_layers"]) == (SendState.SENT, "")
        assert receiver.poll(ticket.ticket_id).state is TransferState.SUCCEEDED
        assert _stored(receiver.pool, dst_blocks) == _stored(source, src_blocks)
        # Per (token, kv-head): 64 one-byte values and one 2-byte scale, against 64 float32.
        float32_bytes = 3 * 2 * len(src_blocks) * 16 * 4 * 64 * 4
        assert pusher.bytes_sent == float32_bytes * 66 // 256
        receiver.release(ticket.ticket_id)
    assert rejections(receiver) == {}


def test_receiver_refuses_wrong_dtype_scales_and_values_and_writes_nothing():
    source, receiver = _pool(torch.int8, seed=2), KVReceiver(_pool(torch.int8))
    float_source = _pool(torch.float32, seed=3)
    cases = []
    ticket = receiver.issue("dtype", [1, 2], 0, 32)
    cases.append((ticket, *chunk(float_source, ticket, 0, 0, [5, 6]), "dtype float32 != pool dtype int8"))
    ticket = receiver.issue("scale-dtype", [1, 2], 0, 32)
    header, payload = chunk(source, ticket, 0, 0, [5, 6], scale_dtype="float32")
    cases.append((ticket, header, payload, "scale dtype float32 != the pool's float16"))
    ticket = receiver.issue("scale-shape", [1, 2], 0, 32)
    header, payload = chunk(source, ticket, 0, 0, [5, 6], scale_shape=(2, 2, 16, 3))
    cases.append((ticket, header, payload, "scale shape (2, 2, 16, 3) != (2, 2, 16, 4)"))
    ticket = receiver.issue("no-scales", [1, 2], 0, 32)
    header, payload = chunk(source, ticket, 0, 0, [5, 6], scale_dtype="", scale_shape=())
    cases.append((ticket, header, payload, "scale dtype none != the pool's float16"))
    ticket = receiver.issue("bad-scale", [1, 2], 0, 32)
    packed = layout.read_pages(source, 0, [5, 6])
    layout.split_chunk(ticket.layout, 2, packed)[1][1, 0, 3, 2] = float("nan")
    bad = layout.to_bytes(packed)
    header, _ = chunk(source, ticket, 0, 0, [5, 6], checksum=layout.checksum(bad))
    cases.append((ticket, header, bad, "a KV scale is negative, infinite or NaN"))
    ticket = receiver.issue("bad-value", [1, 2], 0, 32)
    packed = layout.read_pages(source, 0, [5, 6])
    layout.split_chunk(ticket.layout, 2, packed)[0][0, 1, 2, 0, 7] = -128
    bad = layout.to_bytes(packed)
    header, _ = chunk(source, ticket, 0, 0, [5, 6], checksum=layout.checksum(bad))
    cases.append((ticket, header, bad, "an int8 KV value is -128"))
    for ticket, header, payload, reason in cases:
        with pytest.raises(MessageRejected, match=reason.replace("(", r"\(").replace(")", r"\)")):
            receiver.accept_pages(header, payload)
        status = receiver.poll(ticket.ticket_id)
        assert status.state is TransferState.FAILED and reason in status.reason
    assert rejections(receiver) == {"bad_layout": len(cases)}
    assert not receiver.pool.kv.any() and not receiver.pool.scales.any()  # nothing written


def test_tcp_landing_refuses_bad_scales_after_landing():
    # Landed in place, the scales are checked where they lie; the ticket fails, so no one
    # reads those blocks.
    source, receiver = _pool(torch.int8, seed=4), KVReceiver(_pool(torch.int8))
    source.scales[0, 1, 6, 0, 0] = -1.0
    with _listener("tcp", receiver) as listener, connect(listener.address, CALL_S) as channel:
        ticket = receiver.issue("landing", [1, 2], 0, 32)
        with pytest.raises(MessageRejected, match="a KV scale is negative"):
            channel.send_pages(*chunk(source, ticket, 0, 0, [5, 6]))
        assert receiver.poll(ticket.ticket_id).state is TransferState.FAILED
    assert rejections(receiver) == {"bad_layout": 1}


@pytest.mark.parametrize("prefill_dtype,decode_dtype", [(torch.float32, torch.int8), (torch.int8, torch.float8_e4m3fn)])
def test_workers_with_different_kv_cache_dtypes_refuse_to_link(prefill_dtype, decode_dtype):
    receiver = KVReceiver(_pool(decode_dtype))
    with _listener("tcp", receiver) as listener:
        ticket = receiver.issue_probe(4)
        source = probe_source(ticket, "cpu", layout.layout_of(_pool(prefill_dtype)))
        with pytest.raises(LayoutMismatch, match="the KV cache dtypes differ.*same --kv-cache-dtype"):
            measure(listener.address, ticket, source)
        receiver.release(ticket.ticket_id)
        # The same probe from a pool like the decode worker's links.
        ticket = receiver.issue_probe(4)
        assert measure(listener.address, ticket, probe_source(ticket, "cpu"), repeats=1) > 0
        receiver.release(ticket.ticket_id)
    assert receiver.bytes_received == SHAPE["num_layers"] * layout.chunk_nbytes(ticket.layout, 4)


def test_a_pusher_of_another_dtype_is_refused_with_the_reason():
    # Were a link made anyway, the receiver still checks every chunk.
    receiver = KVReceiver(_pool(torch.int8))
    with _listener("tcp", receiver) as listener:
        pusher = KVPusher(_pool(torch.float32, seed=5), lambda address: connect(address, timeout=CALL_S))
        ticket = receiver.issue("mixed", [1, 2], 0, 32)
        state, reason = _push(pusher, ticket, listener.address, [3, 4], SHAPE["num_layers"])
    assert state is SendState.FAILED and "dtype float32 != pool dtype int8" in reason
    eventually(lambda: receiver.poll(ticket.ticket_id).state is TransferState.FAILED, "the ticket failing")


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [0.0, 1e-30, 3.0e38, -0.0, -1e-3, float("inf"), float("-inf"), float("nan")])
def test_a_scale_passes_only_when_finite_and_not_negative(scale_dtype, scale):
    # The check reads the scales' bits: every float dtype a scale may have, at its edges
    # (as stored: 3e38 is float16's infinity, 1e-30 its +0).
    values = torch.zeros(2, 3, 16, 4, 64, dtype=torch.int8)
    scales = torch.full((2, 3, 16, 4), 0.5, dtype=scale_dtype)
    scales[1, 2, 15, 3] = scale
    stored = float(scales[1, 2, 15, 3])
    passes = math.isfinite(stored) and math.copysign(1.0, stored) > 0
    problem = layout.stored_values_problem(values, scales)
    assert problem == (None if passes else "a KV scale is negative, infinite or NaN")


@pytest.mark.parametrize("dtype,code,problem", [
    (torch.int8, -128, "an int8 KV value is -128"), (torch.int8, 127, None), (torch.int8, -127, None),
    (torch.float8_e4m3fn, 0x7F, "a float8 KV value is NaN"), (torch.float8_e4m3fn, 0xFF, "a float8 KV value is NaN"),
    (torch.float8_e4m3fn, 0x7E, None), (torch.float8_e4m3fn, 0xFE, None)])
def test_a_value_the_quantizer_never_writes_is_found_anywhere(dtype, code, problem):
    scales = torch.ones(2, 3, 16, 4, dtype=torch.float16)
    for where in [(0, 0, 0, 0, 0), (1, 2, 15, 3, 63), (1, 0, 7, 2, 31)]:
        values = torch.zeros(2, 3, 16, 4, 64, dtype=torch.int8)
        values[where] = code if code < 128 else code - 256
        found = layout.stored_values_problem(values.view(dtype), scales)
        assert (found is None) if problem is None else found.startswith(problem)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.float8_e4m3fn])
def test_pages_written_on_the_host_and_by_index_copy_agree(dtype):
    # The CPU pool's write (numpy, page by page) and the device path's (ATen index_copy_
    # of page words), run here on CPU tensors: scattered, unordered blocks, bit-exact.
    source = _pool(dtype, seed=5)
    blocks = [17, 3, 9, 10, 11, 0, 23]
    pages = layout.read_pages(source, 1, [2, 4, 6, 8, 12, 14, 16])
    host, device = _pool(dtype), _pool(dtype)
    layout.write_pages(host, 1, blocks, pages)
    parts = layout.split_chunk(layout.layout_of(device), len(blocks), pages) if device.quantized else (pages,)
    layout._index_copy_pages(device, 1, blocks, parts)
    assert _layer_bytes(host) == _layer_bytes(device)
    assert _layer_bytes(host, 1, blocks) == _layer_bytes(source, 1, [2, 4, 6, 8, 12, 14, 16])
    assert not host.kv[0].view(torch.uint8).any() and not host.kv[2].view(torch.uint8).any()  # other layers untouched


def _layer_bytes(pool: KVPool, layer: int | None = None, blocks: list[int] | None = None) -> list[bytes]:
    """The bytes of the pool's values (and scales): all, or one layer's blocks."""
    parts = [pool.kv] + ([pool.scales] if pool.quantized else [])
    if layer is not None:
        parts = [part[layer][:, blocks] for part in parts]
    return [part.contiguous().view(torch.uint8).numpy().tobytes() for part in parts]
