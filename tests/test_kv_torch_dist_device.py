"""The torch.distributed KV transport sends pages from where the pool lies and closes pairs
explicitly.

On the CPU (gloo): `send_pool_pages` from consecutive and scattered blocks lands bit-exact,
both as gloo sends it (XXH3 of the bytes, the caller's or the channel's own) and as nccl
does (DEVICE_CHUNK frames verified with `device_checksum` and written in place); a forged
or corrupted DEVICE_CHUNK is refused with reason "checksum" before anything is written;
and pairs end by CLOSE frames (the channel's close, or the listener's ask when a pair
idles) with no wait timing out. With CUDA: nccl, and nixl, between two processes land
bit-exact, and neither side copies a payload to the host (the CUDA profiler's memcpys).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import queue
import random
import tempfile
import threading

import pytest
import torch
from kv_helpers import CALL_S, child_answer, eventually, rejections

from pdserve.kv_transfer import layout, messages
from pdserve.kv_transfer.messages import KVTicket, MessageRejected, PagesHeader, TransferDone
from pdserve.kv_transfer.receiver import KVReceiver, TransferState
from pdserve.kv_transfer.transports import connect, listen, reads_pool, torch_dist
from pdserve.kv_transfer.transports.device_checksum import device_checksum, mix
from pdserve.kv_transfer.transports.torch_dist_backends import Gloo, LinkTimeout, poll_work, run_op
from pdserve.kv_transfer.transports.torch_dist_channel import TorchDistChannel
from pdserve.kv_transfer.transports.torch_dist_frames import (
    HEAD_BYTES,
    REPLY_BYTES,
    FrameKind,
    PoolPayload,
    pool_chunk,
)
from pdserve.runtime.kv_pool import KVPool

POOL_SHAPE = {"num_layers": 2, "num_blocks": 16, "block_size": 4, "num_kv_heads": 2, "head_dim": 8,
              "dtype": torch.float32}
CONSECUTIVE, SCATTERED = [4, 5, 6], [7, 2, 11]
DEST_BLOCKS = [9, 3, 12]


class GlooWithDeviceChecksums(Gloo):
    """Gloo sending pool chunks as nccl does (DEVICE_CHUNK frames): the listener's device
    path, run on the CPU."""

    checksums_on_device = True


def _source_pool() -> KVPool:
    """Known values, all distinct and exact in float32."""
    pool = KVPool(**POOL_SHAPE)
    pool.kv.copy_(torch.arange(pool.kv.numel(), dtype=torch.float32).view_as(pool.kv) * 0.5 + 1.0)
    return pool


@contextlib.contextmanager
def _listener(**options):
    """A gloo listener in this process over a fresh pool; yields (listener, receiver)."""
    receiver = KVReceiver(KVPool(**POOL_SHAPE))
    with listen("gloo", receiver, **options) as listener:
        yield listener, receiver


def _channel(listener, device_checksums: bool) -> TorchDistChannel:
    if not device_checksums:
        return connect(listener.address, timeout=CALL_S)
    host, _, port = listener.address.removeprefix("gloo://").rpartition(":")
    return TorchDistChannel(GlooWithDeviceChecksums(), host, int(port), CALL_S)


def _header(ticket: KVTicket, source: KVPool, layer: int, src_blocks: list[int], **overrides) -> PagesHeader:
    """The header of a chunk of `src_blocks` for the whole ticket, as a pusher makes it
    (its checksum XXH3 of the pages, unless overridden)."""
    return PagesHeader(
        request_id=ticket.request_id, ticket_id=ticket.ticket_id, secret=ticket.secret, layer=layer,
        page_start=0, num_pages=len(src_blocks), dtype=ticket.layout.dtype,
        shape=layout.chunk_shape(ticket.layout, len(src_blocks)),
        nbytes=layout.chunk_nbytes(ticket.layout, len(src_blocks)),
        checksum=overrides.pop("checksum", layout.checksum_pages(source, layer, src_blocks)), **overrides)


def _done(ticket: KVTicket, first_token: int = 3) -> TransferDone:
    return TransferDone(ticket.request_id, ticket.ticket_id, ticket.secret, first_token, -0.25)


def _pages(pool: KVPool, blocks) -> bytes:
    return pool.kv[:, :, list(blocks)].contiguous().cpu().numpy().tobytes()




def _count_landings(receiver: KVReceiver) -> list[int]:
    """Record the layer of every chunk the listener lands in place (the DEVICE_CHUNK path)."""
    landed, land_pages = [], receiver.land_pages

    def counting(header):
        landed.append(header.layer)
        return land_pages(header)

    receiver.land_pages = counting
    return landed


# --------------------------------------------------------------------- device checksum


def _reference_checksum(data: bytes) -> int:
    """device_checksum's definition in plain Python integers."""
    padded = data + bytes(-len(data) % 4)
    total = 0
    for i in range(0, len(padded), 4):
        total = (total + mix(int.from_bytes(padded[i:i + 4], "little") | (i // 4) << 32)) % 2**64
    return mix(total ^ len(data))


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


@pytest.mark.parametrize("nbytes", [0, 1, 3, 4, 7, 64, 1001])
def test_the_device_checksum_is_its_definition_however_the_bytes_are_split(nbytes):
    data = random.Random(nbytes).randbytes(nbytes)
    expected = _reference_checksum(data)
    assert device_checksum([_bytes_tensor(data)]) == expected
    assert device_checksum([_bytes_tensor(data)], step=5) == expected  # words hashed in several rounds
    for cut in {0, 3, nbytes // 2 // 4 * 4, nbytes}:  # on and off word boundaries
        assert device_checksum([_bytes_tensor(data[:cut]), _bytes_tensor(data[cut:])]) == expected
    misaligned = torch.empty(nbytes + 1, dtype=torch.uint8)[1:]  # a view whose words straddle the storage's
    misaligned.copy_(_bytes_tensor(data))
    assert device_checksum([misaligned]) == expected


def test_the_device_checksum_detects_every_flipped_bit_and_is_deterministic():
    data = random.Random(7).randbytes(48)
    original = device_checksum([_bytes_tensor(data)])
    assert device_checksum([_bytes_tensor(bytes(data))]) == original  # same bytes, other tensor
    as_floats = torch.frombuffer(bytearray(data), dtype=torch.float32)
    assert device_checksum([as_floats]) == original  # the bytes count, not the dtype
    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert device_checksum([_bytes_tensor(bytes(flipped))]) != original, bit
    swapped = data[4:8] + data[:4] + data[8:]  # two words trade places (this data's sums differ)
    assert swapped != data and device_checksum([_bytes_tensor(swapped)]) != original
    assert device_checksum([_bytes_tensor(data + bytes(1))]) != original  # a trailing zero byte


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the checksum on a GPU with the CPU's")
def test_the_device_checksum_is_the_same_on_a_gpu():
    data = _bytes_tensor(random.Random(11).randbytes(3 << 20))
    assert device_checksum([data.cuda()]) == device_checksum([data])


# ------------------------------------------------------------------- pair machinery


def test_a_pool_chunk_of_consecutive_blocks_is_two_views_of_the_pool():
    pool = _source_pool()
    k, v = pool_chunk(pool, 1, CONSECUTIVE)
    assert k.data_ptr() == pool.kv[1, 0, CONSECUTIVE[0]].data_ptr()  # nothing copied
    assert v.data_ptr() == pool.kv[1, 1, CONSECUTIVE[0]].data_ptr()
    k, v = pool_chunk(pool, 1, SCATTERED)
    storage = pool.kv.untyped_storage()
    assert not storage.data_ptr() <= k.data_ptr() < storage.data_ptr() + storage.nbytes()  # gathered
    packed = layout.read_pages(pool, 1, SCATTERED)
    assert torch.equal(k, packed[0]) and torch.equal(v, packed[1])
    with pytest.raises(ValueError, match="not blocks"):
        pool_chunk(pool, 1, [3, pool.num_blocks])


class _PendingWork:
    """An NCCL work as `poll_work` sees it: completes after `polls` looks (never, if None)."""

    def __init__(self, polls: int | None) -> None:
        self.polls, self.looks, self.waits = polls, 0, []

    def is_completed(self) -> bool:
        self.looks += 1
        return self.polls is not None and self.looks > self.polls

    def wait(self, *timeout) -> bool:
        self.waits.append(timeout)
        return True


def test_nccl_works_are_polled_never_waited_for_with_a_timeout():
    done = _PendingWork(polls=3)
    assert poll_work(done, timeout=CALL_S) is True
    assert done.waits == [()]  # once, after it completed: only to order the stream after it
    stuck = _PendingWork(polls=None)
    assert poll_work(stuck, timeout=0.05) is False  # the caller then aborts the communicator
    assert stuck.waits == [] and stuck.looks > 1


def test_a_cancelled_poll_ends_the_wait_as_a_link_timeout():
    cancel = threading.Event()
    cancel.set()  # the listener is closing
    stuck = _PendingWork(polls=None)
    with pytest.raises(LinkTimeout, match="cancelled"):
        run_op(lambda tensors, peer, tag: stuck, torch.empty(1), 1, CALL_S, "wait for the next frame",
               poll_work, cancel)
    assert stuck.waits == [] and stuck.looks == 1


def test_each_kind_reads_pools_in_place_on_its_own_device_only():
    assert torch_dist.reads_pool_on("gloo", "cpu") and torch_dist.reads_pool_on("nccl", "cuda")
    assert not torch_dist.reads_pool_on("gloo", "cuda") and not torch_dist.reads_pool_on("nccl", "cpu")
    assert TorchDistChannel.reads_pool
    # ... which is what the pusher asks of an address: in place, it hands the channel
    # block ids instead of a copy (nixl from host or GPU memory; tcp, shm, grpc never).
    assert reads_pool("gloo://127.0.0.1:1", "cpu") and reads_pool("nccl://127.0.0.1:1", "cuda")
    assert not reads_pool("gloo://127.0.0.1:1", "cuda") and not reads_pool("nccl://127.0.0.1:1", "cpu")
    assert reads_pool("nixl://127.0.0.1:1", "cpu") and reads_pool("nixl://127.0.0.1:1", "cuda")
    assert not reads_pool("tcp://127.0.0.1:1", "cpu") and not reads_pool("shm://x", "cuda")
    assert not reads_pool("carrier-pigeon://x", "cpu")


# ---------------------------------------------------------------- pages from the pool


@pytest.mark.parametrize("checksum", ["caller-xxh3", "channel-xxh3", "device"])
@pytest.mark.parametrize("src_blocks", [CONSECUTIVE, SCATTERED], ids=["consecutive", "scattered"])
def test_send_pool_pages_lands_bit_exact(src_blocks, checksum):
    source = _source_pool()
    with _listener() as (listener, receiver):
        landed = _count_landings(receiver)
        ticket = receiver.issue("pool", DEST_BLOCKS, 0, 12)
        with _channel(listener, device_checksums=checksum == "device") as chan:
            for layer in range(POOL_SHAPE["num_layers"]):  # the first in two steps, the second in one
                header = _header(ticket, source, layer, src_blocks)
                if checksum != "caller-xxh3":  # left to the channel, as a pusher with a GPU pool does
                    header = dataclasses.replace(header, checksum=None)
                chan.send_pool_pages(header, source, src_blocks)
            chan.send_done(_done(ticket))
        assert receiver.poll(ticket.ticket_id).state is TransferState.SUCCEEDED
        assert _pages(receiver.pool, ticket.block_ids) == _pages(source, src_blocks)
        assert landed == ([0, 1] if checksum == "device" else [])
        assert receiver.num_rejected == 0


def test_a_device_chunk_for_a_probe_lands_in_the_probe_pool_only():
    source = _source_pool()
    with _listener() as (listener, receiver):
        landed = _count_landings(receiver)
        ticket = receiver.issue_probe(len(SCATTERED))  # its blocks 0.. are scratch, not the engine's
        with _channel(listener, device_checksums=True) as chan:
            for layer in range(POOL_SHAPE["num_layers"]):
                chan.send_pool_pages(_header(ticket, source, layer, SCATTERED, checksum=None), source, SCATTERED)
            chan.send_done(_done(ticket))
        assert receiver.poll(ticket.ticket_id).state is TransferState.SUCCEEDED
        assert landed == [0, 1]
        assert not receiver.pool.kv.any()  # the engine's pool is untouched
        receiver.release(ticket.ticket_id)


def test_a_pool_chunk_over_the_links_limit_is_refused_before_sending():
    source = _source_pool()
    nbytes = layout.chunk_nbytes(layout.layout_of(source), len(SCATTERED))
    with _listener(max_chunk_bytes=nbytes - 1) as (listener, receiver):
        ticket = receiver.issue("big", DEST_BLOCKS, 0, 12)
        with _channel(listener, device_checksums=True) as chan:
            with pytest.raises(MessageRejected, match="exceeds"):
                chan.send_pool_pages(_header(ticket, source, 0, SCATTERED), source, SCATTERED)
            chan.ping()
        assert receiver.num_rejected == 0  # the listener never saw it
        assert receiver.poll(ticket.ticket_id).state is TransferState.PENDING


@pytest.mark.parametrize("wrong", ["forged-checksum", "corrupted-payload"])
def test_a_device_chunk_whose_checksum_does_not_match_is_refused_before_it_is_written(wrong):
    source = _source_pool()
    with _listener() as (listener, receiver):
        landed = _count_landings(receiver)
        ticket = receiver.issue("corrupt", DEST_BLOCKS, 0, 12)
        halves = pool_chunk(source, 0, SCATTERED)
        checksum = device_checksum(halves)
        if wrong == "forged-checksum":
            checksum ^= 1 << 40
        else:  # a bit flipped in transit, after the sender took the checksum
            halves = (halves[0], halves[1].clone())
            halves[1].reshape(-1).view(torch.uint8)[37] ^= 0x10
        header = _header(ticket, source, 0, SCATTERED, checksum=checksum)
        with _channel(listener, device_checksums=True) as chan:
            with pytest.raises(MessageRejected, match="checksum"):
                chan._request(messages.encode(header), PoolPayload(FrameKind.DEVICE_CHUNK, halves))
            chan.ping()  # the pair is still good
        assert landed == [0]  # it went the device path
        assert receiver.poll(ticket.ticket_id).state is TransferState.FAILED
        assert _pages(receiver.pool, ticket.block_ids) == bytes(len(_pages(source, SCATTERED)))  # nothing written
        assert rejections(receiver) == {"checksum": 1}


# ---------------------------------------------------------------------- closing pairs


def test_closing_a_channel_closes_its_pair_on_both_ends():
    with _listener() as (listener, receiver):
        chan = connect(listener.address, timeout=CALL_S)
        chan.ping()
        assert listener.num_links == 1
        chan.close()
        eventually(lambda: listener.num_links == 0, "the pair's end on the listener")
        assert listener.explicit_closes == 1
        assert receiver.num_rejected == 0


@pytest.mark.parametrize("device_checksums", [False, True], ids=["xxh3", "device-checksum"])
def test_an_idle_pair_is_closed_explicitly_and_the_channel_reconnects_by_itself(device_checksums):
    source = _source_pool()
    with _listener(idle_timeout=0.5) as (listener, receiver):
        chan = _channel(listener, device_checksums)
        assert chan.idle_timeout == 0.5
        chan._stop.set()  # no keep-alive pings: the pair idles
        ticket = receiver.issue("idle", DEST_BLOCKS, 0, 12)
        chan.send_pool_pages(_header(ticket, source, 0, SCATTERED), source, SCATTERED)
        eventually(lambda: receiver.rejected["idle_timeout"] == 1, "the listener's ask to close the idle pair")
        assert listener.explicit_closes == 0 and listener.num_links == 1  # asked, not dropped
        # The next frame closes the asked-for pair with a CLOSE frame and goes over a fresh one.
        chan.send_pool_pages(_header(ticket, source, 1, SCATTERED), source, SCATTERED)
        chan.send_done(_done(ticket))
        assert chan.reconnects == 1
        # The old pair ended by the CLOSE frame, not by a wait timing out.
        eventually(lambda: listener.explicit_closes == 1, "the old pair's end by its CLOSE")
        assert rejections(receiver) == {"idle_timeout": 1}  # no stalled_frame, no truncated
        assert receiver.poll(ticket.ticket_id).state is TransferState.SUCCEEDED
        assert _pages(receiver.pool, ticket.block_ids) == _pages(source, SCATTERED)
        eventually(lambda: listener.num_links == 1, "the old pair's thread ending")
        chan.close()


def test_a_pair_the_listener_dropped_is_replaced_without_a_close_frame():
    """A sender that answers no ask within op_timeout: the listener drops the pair (marked
    gone), and the channel's next call opens a fresh one."""
    source = _source_pool()
    with _listener(idle_timeout=0.3, op_timeout=0.3) as (listener, receiver):
        chan = connect(listener.address, timeout=CALL_S)
        chan._stop.set()
        ticket = receiver.issue("dropped", [9], 0, 4)
        chan.send_pool_pages(_header(ticket, source, 0, [1]), source, [1])
        eventually(lambda: listener.num_links == 0, "the unanswered pair's drop")
        chan.send_pool_pages(_header(ticket, source, 1, [1]), source, [1])
        chan.send_done(_done(ticket))
        assert chan.reconnects == 1
        assert listener.explicit_closes == 0
        assert rejections(receiver) == {"idle_timeout": 1}
        assert _pages(receiver.pool, ticket.block_ids) == _pages(source, [1])
        chan.close()
        eventually(lambda: listener.explicit_closes == 1, "the fresh pair's close")


# ------------------------------------------------------------------------- nccl (CUDA)

CTX = multiprocessing.get_context("spawn")
GPU_POOL = {"num_layers": 2, "num_blocks": 64, "block_size": 16, "num_kv_heads": 4, "head_dim": 64,
            "dtype": torch.float16}
GPU_CONSECUTIVE, GPU_SCATTERED = list(range(8, 16)), [40, 3, 17, 60, 22, 9, 31, 5]
STARTUP_S = 120.0  # a spawned child imports torch, initialises CUDA and NCCL


def _gpu_env(role: str) -> tuple[int, dict[str, str]]:
    """The device of a child, and its environment: on one GPU both ends share it, which
    NCCL allows between different hosts only; so each child claims its own host id and
    NCCL goes over loopback sockets."""
    if torch.cuda.device_count() >= 2:
        return (0 if role == "decode" else 1), {}
    return 0, {"NCCL_HOSTID": f"pdserve-test-{role}", "NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1",
               "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_NVLS_ENABLE": "0"}


def _device_to_host_copies(trace: str) -> tuple[list[int], int]:
    """From a profiler's chrome trace: the bytes of each device-to-host memcpy, and the
    number of kernels (proof that CUDA activity was recorded at all)."""
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    copies = [event.get("args", {}).get("bytes", -1) for event in events if "Memcpy DtoH" in event.get("name", "")]
    kernels = sum(event.get("cat") == "kernel" for event in events)
    return copies, kernels


def _gpu_child(role: str, kind: str, commands, results) -> None:
    """A decode or prefill worker on a GPU, linked by `kind`: answers (name, *args) commands."""
    index, env = _gpu_env(role)
    os.environ.update(env)
    torch.cuda.set_device(index)
    pool = KVPool(**GPU_POOL, device=f"cuda:{index}")
    profiler = None

    def profile_start():
        nonlocal profiler
        torch.cuda.synchronize()
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
        profiler.start()

    def profile_stop():
        torch.cuda.synchronize()
        profiler.stop()
        with tempfile.TemporaryDirectory() as tmp:
            trace = os.path.join(tmp, "trace.json")
            profiler.export_chrome_trace(trace)
            return _device_to_host_copies(trace)

    handlers = {"profile_start": profile_start, "profile_stop": profile_stop,
                "pages": lambda blocks: _pages(pool, blocks)}
    channel = None
    if role == "decode":
        receiver = KVReceiver(pool, default_timeout=60.0)
        listener = listen(kind, receiver)
        handlers["issue"] = lambda name, blocks: messages.encode(receiver.issue(name, blocks, 0, 16 * len(blocks)))
        handlers["state"] = lambda ticket_id: (receiver.poll(ticket_id).state.value, dict(receiver.rejected))
        results.put(("ok", listener.address))
    else:
        pool.kv.copy_((torch.arange(pool.kv.numel(), device=pool.kv.device) % 2039 * 0.5).view_as(pool.kv))

        def send(address, encoded_ticket, src_blocks):
            nonlocal channel
            channel = channel or connect(address, timeout=60.0)
            ticket = messages.decode(encoded_ticket, KVTicket)
            for layer in range(GPU_POOL["num_layers"]):
                header = PagesHeader(
                    request_id=ticket.request_id, ticket_id=ticket.ticket_id, secret=ticket.secret, layer=layer,
                    page_start=0, num_pages=len(src_blocks), dtype=ticket.layout.dtype,
                    shape=layout.chunk_shape(ticket.layout, len(src_blocks)),
                    nbytes=layout.chunk_nbytes(ticket.layout, len(src_blocks)), checksum=None)  # the channel's
                channel.send_pool_pages(header, pool, src_blocks)
            channel.send_done(_done(ticket))
            return channel.max_chunk_bytes

        handlers["send"] = send
        results.put(("ok", None))
    while True:
        try:
            name, *args = commands.get(timeout=300)
        except queue.Empty:
            break
        if name == "stop":
            break
        try:
            results.put(("ok", handlers[name](*args)))
        except Exception as exc:  # noqa: BLE001 (the parent fails the test with it)
            results.put(("error", f"{type(exc).__name__}: {exc}"))
    if channel is not None:
        channel.close()


class GpuPeer:
    def __init__(self, role: str, kind: str) -> None:
        self.role = role
        self.commands, self.results = CTX.Queue(), CTX.Queue()
        self.process = CTX.Process(target=_gpu_child, args=(role, kind, self.commands, self.results), daemon=True)
        self.process.start()
        self.address = self._result(STARTUP_S, "start")

    def call(self, name: str, *args, timeout: float = STARTUP_S):
        self.commands.put((name, *args))
        return self._result(timeout, name)

    def _result(self, timeout: float, what: str):
        return child_answer(self.results, self.process, timeout, what, f"{self.role} child")

    def stop(self) -> None:
        if self.process.is_alive():
            self.commands.put(("stop",))
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU pages over nccl and nixl need a CUDA GPU; none here")


@pytest.fixture(scope="module", params=["nccl", "nixl"])
def gpu_peers(request):
    if request.param == "nixl":
        pytest.importorskip("nixl", reason="the nixl extra is not installed")
    decode = GpuPeer("decode", request.param)
    prefill = None
    try:
        prefill = GpuPeer("prefill", request.param)
        yield decode, prefill
    finally:
        for peer in (prefill, decode):
            if peer is not None:
                peer.stop()


def _gpu_transfer(decode: GpuPeer, prefill: GpuPeer, name: str, src_blocks: list[int]) -> list[int]:
    dest_blocks = [50, 2, 33, 61, 14, 27, 45, 6][:len(src_blocks)]
    encoded = decode.call("issue", name, dest_blocks)
    prefill.call("send", decode.address, encoded, src_blocks)
    state, rejected = decode.call("state", messages.decode(encoded, KVTicket).ticket_id)
    assert state == "succeeded", rejected
    return dest_blocks


@needs_cuda
@pytest.mark.parametrize("src_blocks", [GPU_CONSECUTIVE, GPU_SCATTERED], ids=["consecutive", "scattered"])
def test_gpu_pool_pages_land_bit_exact(gpu_peers, src_blocks):
    decode, prefill = gpu_peers
    dest_blocks = _gpu_transfer(decode, prefill, f"gpu-{src_blocks[0]}", src_blocks)
    assert decode.call("pages", dest_blocks) == prefill.call("pages", src_blocks)


@needs_cuda
def test_no_payload_is_copied_to_the_host_on_either_side(gpu_peers):
    decode, prefill = gpu_peers
    _gpu_transfer(decode, prefill, "warm-up", GPU_SCATTERED)  # the pair and the pack kernel are ready
    for peer in (decode, prefill):
        peer.call("profile_start")
    _gpu_transfer(decode, prefill, "profiled", GPU_SCATTERED)
    chunk = layout.chunk_nbytes(layout.layout_of(KVPool(**{**GPU_POOL, "num_blocks": 1})), len(GPU_SCATTERED))
    assert chunk >= 32 * HEAD_BYTES
    for peer in (decode, prefill):
        copies, kernels = peer.call("profile_stop")
        assert kernels > 0, f"the {peer.role} profile recorded no CUDA activity"
        # Frame heads and replies are read on the host (HEAD_BYTES each), checksum sums (8
        # bytes) too; a payload never is.
        assert copies and max(copies) <= max(HEAD_BYTES, REPLY_BYTES), (peer.role, copies)
