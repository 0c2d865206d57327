"""NIXL transport: the decode worker pulls each chunk's pages straight out of the prefill
worker's KV pool into the ticket's own blocks (NIXL READ; UCX underneath: CMA between
processes on one host, RDMA or TCP between hosts). No staging copy, no pack.

Control link: TCP with stream.py's framing (as the tcp transport). Frames, sender ->
listener:

    agent   header AGENT_HEADER; payload: the sender's NIXL agent metadata (its UCX
            address and registered memory). First on every link, and again whenever the
            sender registered more memory.
    chunk   a PagesHeader; payload: where its `nbytes` lie in the sender's registered
            memory, msgpack {"mem": "DRAM" | "VRAM", "dev": int, "runs": [[address, nbytes],
            ...]} in the chunk's byte order
    done / abort / ping   as on every transport

For a chunk the listener admits the header first (ticket, secret, layer, pages, layout:
`KVReceiver.land_pages`), then READs the sender's bytes into the ticket's blocks, verifies
the sender's checksum over what landed, and replies; the reply tells the sender it may
reuse those pages (the pusher sends a few pool chunks ahead of their replies and keeps
the pages until the send settles). Pull rather than push (one-sided writes by the prefill worker) keeps
every check ahead of the bytes: the sender names only its own memory, never where in the
decode pool anything goes, and the decode worker never wonders whether a remote write is
still in flight into a block it frees. NIXL refuses a read outside what the sender
registered.

`send_pages` (bytes already packed) copies them into a registered staging buffer of the
channel first; the pusher uses `send_pool_pages`, which reads the pool where it lies.

One agent per listener (its pool registered once) and one per process for every channel
(each pool it sends from registered on first use). Pools in host memory (DRAM) or GPU
memory (VRAM) on either side; GPU pages never pass through the host. The checksum's kind
follows the sender's memory: XXH3 (`layout.checksum_pages`) over host pages, the device
checksum (`device_checksum`, torch ops where the bytes lie, 8 bytes to the host) over GPU
pages, taken by the channel when the pages are named. The listener verifies that kind
over what landed: where it landed for the device checksum (GPU or host), and on a host
copy only for host-memory bytes landed in a GPU pool. Agent metadata is NIXL's own
serialisation; NIXL's Python descriptor helpers that pickle are never used. A loopback
listener (127.0.0.1) restricts UCX to the loopback device unless UCX_NET_DEVICES says
otherwise, so nothing leaves the host.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import msgpack
import numpy as np
import torch

from pdserve.kv_transfer import layout, messages
from pdserve.kv_transfer.messages import MalformedMessage, MessageRejected, PagesHeader
from pdserve.kv_transfer.receiver import KVReceiver, Landing
from pdserve.kv_transfer.transports.base import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CHUNK_BYTES,
    ListenerLimits,
    TransportError,
    apply_frame,
    read_header,
)
from pdserve.kv_transfer.transports.device_checksum import device_checksum
from pdserve.kv_transfer.transports.stream import (
    Deadline,
    LinkDropped,
    Staging,
    StreamChannel,
    StreamListener,
    as_bytes_view,
    bind_tcp,
    open_tcp_link,
    recv_exact,
)
from pdserve.runtime.kv_pool import KVPool

logger = logging.getLogger(__name__)



def reads_pool_on(kind: str, device_type: str) -> bool:
    """See base.reads_pool: the decode worker reads host or GPU pools where they lie."""
    return device_type in ("cpu", "cuda")


AGENT_HEADER = msgpack.packb({"kind": "nixl_agent"})
MAX_METADATA_BYTES = 1 << 20  # an agent's metadata is ~0.5 KiB per registered region
MAX_SOURCE_BYTES = 64 << 10  # a chunk's source runs: ~20 bytes per run
_SPIN = 200  # polls of a read in progress before yielding the core between polls


class Source(NamedTuple):
    """Where a chunk's bytes lie in the sender's registered memory."""

    mem: str  # NIXL memory type: "DRAM" or "VRAM"
    device: int
    runs: list[tuple[int, int]]  # (address, nbytes) in the chunk's byte order

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.runs)


def encode_source(source: Source) -> bytes:
    return msgpack.packb({"mem": source.mem, "dev": source.device, "runs": source.runs})


def decode_source(data: bytes) -> Source:
    """Parse a chunk's source. MalformedMessage."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError) as exc:
        raise MalformedMessage(f"chunk source is not msgpack: {exc}") from None
    if not isinstance(body, dict) or set(body) != {"mem", "dev", "runs"}:
        raise MalformedMessage("chunk source must be a map of mem, dev, runs")
    mem, device, runs = body["mem"], body["dev"], body["runs"]
    if mem not in ("DRAM", "VRAM") or not _is_uint(device) or not isinstance(runs, list) or not runs:
        raise MalformedMessage("chunk source has a bad mem, dev or runs field")
    if not all(isinstance(r, list) and len(r) == 2 and _is_uint(r[0]) and _is_uint(r[1]) and r[1] > 0
               for r in runs):
        raise MalformedMessage("chunk source runs must be [address, nbytes] pairs of positive integers")
    return Source(mem, device, [(a, n) for a, n in runs])


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _memory_of(tensor: torch.Tensor) -> tuple[str, int]:
    """NIXL's memory type and device id of a tensor."""
    if tensor.device.type == "cuda":
        return "VRAM", tensor.device.index or 0
    if tensor.device.type == "cpu":
        return "DRAM", 0
    raise TransportError(f"the nixl transport moves CPU or CUDA memory, not {tensor.device.type}")


def segments(local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Pair two run lists over the same bytes (each (address, nbytes), in order) into
    descriptors of equal lengths: rows (address, nbytes, 0) for each side, split where
    either side's runs break."""
    pairs = []
    li = ri = 0
    l_addr, l_left = local[0]
    r_addr, r_left = remote[0]
    while True:
        size = min(l_left, r_left)
        pairs.append((l_addr, r_addr, size))
        l_addr, l_left, r_addr, r_left = l_addr + size, l_left - size, r_addr + size, r_left - size
        if l_left == 0:
            li += 1
            if li == len(local):
                break
            l_addr, l_left = local[li]
        if r_left == 0:
            ri += 1
            r_addr, r_left = remote[ri]
    if r_left or ri != len(remote) - 1:
        raise ValueError("the two run lists cover different byte counts")
    table = np.asarray(pairs, dtype=np.uint64)
    zeros = np.zeros(len(pairs), dtype=np.uint64)
    return (np.stack([table[:, 0], table[:, 2], zeros], axis=1),
            np.stack([table[:, 1], table[:, 2], zeros], axis=1))


# ------------------------------------------------------------------------ agents


def _nixl():
    try:
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
    except ImportError as exc:
        raise TransportError(f"the nixl KV transport needs the nixl package (pip install 'pdserve[nixl]'): "
                             f"{exc}") from None
    return nixl_agent, nixl_agent_config, nixl_thread_sync_t


def _confine_ucx_to_loopback(host: str) -> None:
    """A link to or on a loopback address keeps UCX on the loopback device (its default
    would also open TCP on every interface), unless the operator chose devices."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        os.environ.setdefault("UCX_NET_DEVICES", "lo")


# The agent's progress thread answers its peers (UCX wire-up, and reads of its memory
# where the transport needs the target's help). NIXL's Python wrapper starts it with no
# pause between idle polls, which spins a core for good (measured on the 2-core VM: 2.0
# CPU seconds per 2 s idle); a 10 ms pause keeps two idle agents at 0.03 (`_PausedProgress`).
# Same-host reads (CMA) and RDMA reads need no help from the target once linked.
PROGRESS_PAUSE_US = 10_000
_construct_lock = threading.Lock()


class _PausedProgress:
    """Stands in for NIXL's binding module while the wrapper constructs an agent, to give
    its progress thread a pause; every other name is the binding's own."""

    def __init__(self, binding) -> None:
        self._binding = binding

    def __getattr__(self, name: str):
        return getattr(self._binding, name)

    def nixlAgent(self, name, config):  # the binding's name
        config.pthrDelay = PROGRESS_PAUSE_US
        return self._binding.nixlAgent(name, config)


class Agent:
    """A NIXL agent with the UCX backend, and the memory it registered. Thread-safe."""

    def __init__(self, role: str) -> None:
        nixl_agent, nixl_agent_config, sync = _nixl()
        self.name = f"pdserve-{role}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        wrapper = sys.modules[nixl_agent.__module__]
        with _construct_lock:
            binding, wrapper.nixlBind = wrapper.nixlBind, _PausedProgress(wrapper.nixlBind)
            try:
                self.nixl = nixl_agent(self.name, nixl_agent_config(
                    enable_prog_thread=True, backends=["UCX"], sync_mode=sync.NIXL_THREAD_SYNC_STRICT))
            except Exception as exc:  # noqa: BLE001 - NIXL raises its own error types
                raise TransportError(f"cannot start a NIXL agent: {type(exc).__name__}: {exc}") from None
            finally:
                wrapper.nixlBind = binding
        if "UCX" not in self.nixl.backends:
            raise TransportError("NIXL has no UCX backend here: the nixl KV transport cannot work")
        self._lock = threading.Lock()
        self._regions: dict[tuple[int, int], object] = {}  # (address, nbytes) -> NIXL registration
        self.version = 0  # bumped by every registration: metadata sent before it is stale

    def register(self, tensor: torch.Tensor) -> None:
        """Register a contiguous tensor's memory once (later calls are free)."""
        key = (tensor.data_ptr(), tensor.numel() * tensor.element_size())
        with self._lock:
            if key in self._regions:
                return
            try:
                self._regions[key] = self.nixl.register_memory([tensor])
            except Exception as exc:  # noqa: BLE001
                raise TransportError(f"NIXL cannot register {key[1]} bytes of {tensor.device} memory: "
                                     f"{type(exc).__name__}: {exc}") from None
            self.version += 1

    def forget(self, tensor: torch.Tensor) -> None:
        key = (tensor.data_ptr(), tensor.numel() * tensor.element_size())
        with self._lock:
            registration = self._regions.pop(key, None)
            if registration is not None:
                self.nixl.deregister_memory(registration)
                self.version += 1

    def metadata(self) -> tuple[int, bytes]:
        with self._lock:
            return self.version, self.nixl.get_agent_metadata()


_sender: Agent | None = None
_sender_lock = threading.Lock()


def sender_agent() -> Agent:
    """This process's agent for every channel (created on first use)."""
    global _sender
    with _sender_lock:
        if _sender is None:
            _sender = Agent("send")
        return _sender


# -------------------------------------------------------------------- decode side


class _PullStaging(Staging):
    """A link's state on the listener: the sender's agent, once introduced. Holds no
    memory of its own: chunks land in the pool."""

    allocated = 0

    def __init__(self, listener: NixlListener) -> None:
        self._listener = listener
        self._receiver = listener.receiver
        self.remote: str | None = None  # the sender's agent name, loaded in the listener's agent

    def serve(self, conn: socket.socket, header: bytes, payload_len: int, deadline: Deadline) -> str | None:
        if header == AGENT_HEADER:
            if payload_len > MAX_METADATA_BYTES:
                self._receiver.count_rejection("oversized")
                raise LinkDropped(f"agent metadata of {payload_len} bytes is over the {MAX_METADATA_BYTES}-byte limit")
            return self._introduce(recv_exact(conn, payload_len, deadline))
        if payload_len > MAX_SOURCE_BYTES:
            self._receiver.count_rejection("oversized")
            raise LinkDropped(f"a chunk source of {payload_len} bytes is over the {MAX_SOURCE_BYTES}-byte limit")
        payload = recv_exact(conn, payload_len, deadline) if payload_len else b""
        try:
            message = read_header(self._receiver, header, payload_len, MAX_SOURCE_BYTES)
        except MessageRejected as exc:
            return str(exc)
        if not isinstance(message, PagesHeader):
            return apply_frame(self._receiver, message, b"")
        return self._pull_chunk(message, payload, deadline)

    def _introduce(self, metadata: bytes) -> str | None:
        try:
            name = self._listener.load_agent(metadata, previous=self.remote)
        except TransportError as exc:
            self._receiver.count_rejection("malformed")
            return str(exc)
        self.remote = name
        return None

    def _pull_chunk(self, header: PagesHeader, payload: bytes, deadline: Deadline) -> str | None:
        if self.remote is None:
            self._receiver.count_rejection("malformed")
            return "a chunk before the sender's agent metadata on this link"
        try:
            landing = self._receiver.land_pages(header)  # ticket, secret, layer, pages, layout
        except MessageRejected as exc:
            return str(exc)
        try:
            source = decode_source(payload)
            if source.nbytes != header.nbytes:
                error, reason_class = (f"the chunk's source holds {source.nbytes} bytes; its header says "
                                       f"{header.nbytes}"), "bad_layout"
            else:
                error, reason_class = self._listener.read(landing, source, self.remote, deadline), "pull_failed"
        except MalformedMessage as exc:
            error, reason_class = f"malformed chunk: {exc}", "malformed"
        try:
            if error is not None:
                landing.abandoned(error, reason_class)
            else:
                landing.landed(landed_checksum(landing, source))
        except MessageRejected as exc:
            return str(exc)
        return None

    def close(self) -> None:
        if self.remote is not None:
            self._listener.unload_agent(self.remote)
            self.remote = None


class NixlListener(StreamListener):
    def __init__(self, receiver: KVReceiver, host: str = "127.0.0.1", port: int = 0,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, max_channels: int = 16,
                 op_timeout: float = 30.0, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        limits = ListenerLimits(max_chunk_bytes, max_channels, idle_timeout, op_timeout)
        _memory_of(receiver.pool.kv)  # CPU or CUDA, else TransportError
        _confine_ucx_to_loopback(host)
        self.receiver = receiver
        self.agent = Agent("recv")
        self._memory = _memory_of(receiver.pool.kv)
        _register_pool(self.agent, receiver.pool)
        self._agents_lock = threading.Lock()
        self._agent_links: dict[str, int] = {}  # loaded sender agents -> links using them
        sock, address = bind_tcp("nixl", host, port)
        super().__init__(receiver, sock, address, limits)
        logger.info("nixl KV listener at %s (agent %s, chunks up to %d bytes, %d channels)",
                    self.address, self.agent.name, max_chunk_bytes, max_channels)

    def _open(self, conn: socket.socket) -> Staging:
        open_tcp_link(conn, self._hello(0))
        return _PullStaging(self)

    def load_agent(self, metadata: bytes, previous: str | None) -> str:
        """Load (or refresh) a sender's agent from its metadata; returns its name."""
        with self._agents_lock:
            try:
                name = self.agent.nixl.add_remote_agent(metadata)
            except Exception as exc:  # noqa: BLE001 - NIXL raises its own error types
                raise TransportError(f"unusable NIXL agent metadata: {type(exc).__name__}: {exc}") from None
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name != previous:
                self._agent_links[name] = self._agent_links.get(name, 0) + 1
                if previous is not None:
                    self._drop_agent(previous)
            return name

    def unload_agent(self, name: str) -> None:
        with self._agents_lock:
            self._drop_agent(name)

    def _drop_agent(self, name: str) -> None:
        self._agent_links[name] -= 1
        if self._agent_links[name] == 0:
            del self._agent_links[name]
            try:
                self.agent.nixl.remove_remote_agent(name)
            except Exception as exc:  # noqa: BLE001
                logger.debug("removing NIXL agent %s failed: %s", name, exc)

    def read(self, landing: Landing, source: Source, remote: str, deadline: Deadline) -> str | None:
        """READ the chunk's bytes from `remote` into the landing's runs, by `deadline`.
        None when they are there, else why not."""
        scratch = landing.pool is not self.receiver.pool  # a probe ticket's pool: registered for this read only
        if scratch:
            _register_pool(self.agent, landing.pool)
        try:
            return self._read(landing, source, remote, deadline)
        finally:
            if scratch:
                _forget_pool(self.agent, landing.pool)

    def _read(self, landing: Landing, source: Source, remote: str, deadline: Deadline) -> str | None:
        local_rows, remote_rows = segments(landing.addresses(), source.runs)
        remote_rows[:, 2] = source.device
        local_rows[:, 2] = self._memory[1]
        nixl = self.agent.nixl
        try:
            handle = nixl.initialize_xfer("READ", nixl.get_xfer_descs(local_rows, self._memory[0]),
                                          nixl.get_xfer_descs(remote_rows, source.mem), remote)
        except Exception as exc:  # noqa: BLE001 - e.g. NIXL_ERR_NOT_FOUND: not the sender's registered memory
            return f"cannot read the chunk from the prefill worker's memory: {type(exc).__name__}: {exc}"
        try:
            state = nixl.transfer(handle)
            polls = 0
            while state == "PROC":
                if time.monotonic() > deadline.at:
                    return f"reading the chunk took more than {deadline.seconds} s"
                polls += 1
                if polls > _SPIN:
                    time.sleep(0.0001)
                state = nixl.check_xfer_state(handle)
            return None if state == "DONE" else "reading the chunk from the prefill worker failed (NIXL error)"
        finally:
            try:
                nixl.release_xfer_handle(handle)
            except Exception as exc:  # noqa: BLE001 - a read that cannot be cancelled: say so loudly
                logger.error("a NIXL read could not be released (%s); its destination blocks may still be "
                             "written", exc)

    def _after_close(self) -> None:
        _forget_pool(self.agent, self.receiver.pool)


# -------------------------------------------------------------------- prefill side


class _Staged(NamedTuple):
    data: memoryview  # packed chunk bytes: copied into the channel's registered staging buffer


class _InPool(NamedTuple):
    pool: KVPool
    layer: int
    block_ids: Sequence[int]


class NixlChannel(StreamChannel):
    reads_pool: ClassVar[bool] = True

    def __init__(self, target: str, timeout: float) -> None:
        super().__init__(f"nixl://{target}", timeout)
        self._target = target
        host = target.rpartition(":")[0]
        _confine_ucx_to_loopback(host.strip("[]"))
        self._agent = sender_agent()
        self._staging: torch.Tensor | None = None  # registered; for send_pages only
        self._sent_version = -1  # the agent metadata version the listener has on this link
        self._open()

    # The listener reads a chunk out of the sender's memory while it serves the frame.
    # Packed bytes go through the channel's one staging buffer, so `send_pages` always
    # waits. Pool pages sent with `wait=False` stay in flight (stream.StreamChannel) while
    # the next are named: their pages must stay put until the send settles, which the
    # pusher's `holds_pages` contract already asks of the engine.

    def send_pages(self, header: PagesHeader, payload: memoryview | bytes, wait: bool = True) -> None:
        self._check_chunk_size(memoryview(payload).nbytes)
        self._request(messages.encode(header), _Staged(as_bytes_view(payload)), ticket_id=header.ticket_id)

    def send_pool_pages(self, header: PagesHeader, pool: KVPool, block_ids: Sequence[int],
                        wait: bool = True) -> None:
        """`header.checksum`: `sent_checksum` of the pages, or None for the channel to
        take it; a CUDA pool's chunk carries its device checksum, whatever the header said
        (taken after what the calling thread's current stream had queued)."""
        self._check_chunk_size(header.nbytes)
        if header.checksum is None or pool.kv.device.type == "cuda":
            header = dataclasses.replace(header, checksum=sent_checksum(pool, header.layer, block_ids))
        _register_pool(self._agent, pool)
        self._request(messages.encode(header), _InPool(pool, header.layer, block_ids), ticket_id=header.ticket_id,
                      wait=wait)

    def _open(self) -> None:
        self._sock = self._connect_tcp(self._target, "nixl")
        self._sent_version = -1
        self._introduce()

    def _introduce(self) -> None:
        """Send this process's agent metadata if the listener's copy on this link is stale."""
        version, metadata = self._agent.metadata()
        if version == self._sent_version:
            return
        reason = self._send_frame(AGENT_HEADER, len(metadata), inline=memoryview(metadata))
        if reason is not None:
            raise TransportError(f"the nixl KV listener {self.address} refused this agent: {reason}")
        self._sent_version = version

    def _exchange(self, header: bytes, payload) -> str | None:
        if isinstance(payload, (bytes, bytearray, memoryview)) and len(payload):
            payload = _Staged(as_bytes_view(payload))  # packed bytes sent as they are
        if isinstance(payload, _Staged):
            self._stage(payload.data)
            source = _source_of([self._staging[:payload.data.nbytes]])
        elif isinstance(payload, _InPool):
            source = _pool_source(payload)
        else:  # done, abort, ping: no payload
            return self._send_frame(header, 0, inline=None)
        self._introduce()
        encoded = encode_source(source)
        return self._send_frame(header, len(encoded), inline=memoryview(encoded))

    def _post(self, header: bytes, payload: _InPool, ticket_id: int) -> str | None:
        self._introduce()
        encoded = encode_source(_pool_source(payload))
        return self._send_frame(header, len(encoded), inline=memoryview(encoded), ticket_id=ticket_id, wait=False)

    def _stage(self, data: memoryview) -> None:
        """Copy packed bytes into the channel's registered staging buffer (grown as needed)."""
        if self._staging is None or self._staging.numel() < data.nbytes:
            if self._staging is not None:
                self._agent.forget(self._staging)
            self._staging = torch.empty(max(data.nbytes, 1 << 20), dtype=torch.uint8)
            self._agent.register(self._staging)
        self._staging[:data.nbytes].numpy()[:] = np.frombuffer(data, dtype=np.uint8)

    def _teardown(self) -> None:
        super()._teardown()
        if self._staging is not None:
            self._agent.forget(self._staging)
            self._staging = None


def _register_pool(agent, pool: KVPool) -> None:
    """Register a pool's memory: its values and, quantized, its scales (a chunk's runs
    address both)."""
    agent.register(pool.kv)
    if pool.scales is not None:
        agent.register(pool.scales)


def _forget_pool(agent, pool: KVPool) -> None:
    agent.forget(pool.kv)
    if pool.scales is not None:
        agent.forget(pool.scales)


def _pool_source(payload: _InPool) -> Source:
    """The source of a chunk read from the sender's pool where its pages lie."""
    mem, device = _memory_of(payload.pool.kv)
    runs = layout.pool_runs(payload.pool, payload.block_ids)
    return Source(mem, device, layout.run_addresses(payload.pool, payload.layer, runs))


def sent_checksum(pool: KVPool, layer: int, block_ids: Sequence[int]) -> int:
    """The checksum a chunk of `pool`'s pages carries, of the kind its memory implies (see
    the module docstring). A CUDA pool's is taken on the calling thread's current stream."""
    if pool.kv.device.type == "cuda":
        return device_checksum([layout.run_view(pool, layer, run) for run in layout.pool_runs(pool, block_ids)])
    return layout.checksum_pages(pool, layer, block_ids)


def landed_checksum(landing: Landing, source: Source) -> int | None:
    """The checksum of a landed chunk, of the kind its source's memory implies, for
    `Landing.landed`; None: XXH3 over a host pool, which the landing takes itself."""
    if source.mem == "VRAM":
        return device_checksum(landing.views())
    if landing.pool.kv.device.type != "cpu":  # host bytes landed in a GPU pool: hash a host copy
        return layout.checksum(torch.cat([view.reshape(-1).view(torch.uint8) for view in landing.views()]).cpu()
                               .numpy())
    return None


def _source_of(views: list[torch.Tensor]) -> Source:
    """The source of a chunk held by contiguous `views` (in its byte order)."""
    mem, device = _memory_of(views[0])
    return Source(mem, device, [(v.data_ptr(), v.numel() * v.element_size()) for v in views])


def listen(kind: str, receiver: KVReceiver, **options) -> NixlListener:
    return NixlListener(receiver, **options)


def connect(kind: str, target: str, timeout: float) -> NixlChannel:
    return NixlChannel(target, timeout)
