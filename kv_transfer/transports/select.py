"""Which transport carries the KV between two workers: measured at start-up.

For each (prefill, decode) pair the controller measures every transport that can work
between them (`candidate_transports`):

    same host                -> shm, nixl        (+ nccl when both KV pools are on CUDA)
    across hosts             -> nixl, tcp, grpc  (+ nccl when both KV pools are on CUDA)

with a short real transfer each (`measure`: PROBE_PAGES pages at every layer into a probe
ticket, from a scratch pool, through the same checks as any transfer), logs the table
(`transport_table`), and takes the fastest that passed (`fastest`). `forced` (from the
operator's config) skips the race, but never silently: a forced transport that cannot
work between these peers raises TransportError, and so does its failed measurement.
`choose_transport` is the choice without measuring (the first candidate), and `probe` a
bare ping. Two workers whose pools differ in layout (a KV cache dtype, a block size) never
link: `measure` raises LayoutMismatch saying what differs, before any byte moves.
"""

from __future__ import annotations

import logging
import socket
import statistics
import time
from dataclasses import dataclass

import torch

from pdserve.kv_transfer import layout
from pdserve.kv_transfer.messages import KVLayout, KVTicket, MessageRejected, TransferDone
from pdserve.kv_transfer.transports.base import KINDS, TransportError, connect
from pdserve.runtime.kv_pool import KVPool

logger = logging.getLogger(__name__)

PROBE_PAGES = 16  # pages per layer of a probe transfer: a 256-token prompt at 16-token pages
PROBE_REPEATS = 3  # transfers per measurement; the median counts


@dataclass(frozen=True)
class PeerInfo:
    host_id: str  # equal iff both workers share a kernel (and so /dev/shm and AF_UNIX sockets)
    device_type: str  # torch device type of the KV pool: "cuda", "cpu", ...

    @classmethod
    def local(cls, device_type: str) -> PeerInfo:
        return cls(local_host_id(), device_type)


def local_host_id() -> str:
    """Hostname plus the kernel's boot id: two containers that share a hostname on
    different machines differ, and `probe` catches the rest."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}" if boot else socket.gethostname()


def choose_transport(local: PeerInfo, remote: PeerInfo, forced: str | None = None) -> str:
    """The transport kind for the KV hop from `local` to `remote` (or back). Logs the
    choice and its reason. Raises TransportError if `forced` is unknown or cannot work
    between these two peers."""
    same_host = local.host_id == remote.host_id
    both_cuda = local.device_type == "cuda" and remote.device_type == "cuda"
    if forced is not None:
        if forced not in KINDS:
            raise TransportError(f"unknown KV transport {forced!r}; expected one of {', '.join(KINDS)}")
        if forced == "shm" and not same_host:
            raise TransportError(f"KV transport forced to shm, but the peers are on different hosts "
                                 f"({local.host_id} and {remote.host_id}); use grpc or nccl")
        if forced == "nccl" and not both_cuda:
            raise TransportError(f"KV transport forced to nccl, but the KV pools are on "
                                 f"{local.device_type} and {remote.device_type}; nccl needs CUDA on both")
        kind, why = forced, "forced by configuration"
    elif same_host:
        kind, why = "shm", f"both workers on host {local.host_id}"
    elif both_cuda:
        kind, why = "nccl", "both KV pools on CUDA, on different hosts"
    else:
        kind, why = "grpc", f"different hosts, KV pools on {local.device_type} and {remote.device_type}"
    logger.info("KV transport %s: %s", kind, why)
    return kind


def probe(address: str, timeout: float = 5.0) -> None:
    """Connect to the listener at `address` and round-trip a no-op ping, within about
    `timeout` seconds. Raises TransportError saying what failed and where."""
    try:
        channel = connect(address, timeout)
    except TransportError as exc:
        raise TransportError(f"KV transport check failed: {exc}. Is the decode worker running, and is "
                             f"{address} reachable from this host ({socket.gethostname()})?") from exc
    try:
        channel.ping()
    except (TransportError, MessageRejected) as exc:
        raise TransportError(f"KV transport check failed: {address} accepted a channel but did not "
                             f"answer a ping: {exc}") from exc
    finally:
        channel.close()
    logger.info("KV transport check passed: %s answers", address)


def candidate_transports(local: PeerInfo, remote: PeerInfo, forced: str | None = None) -> list[str]:
    """The transports to measure between `local` and `remote`, best guess first; just
    [forced] when the operator chose one (TransportError if it cannot work between them)."""
    if forced is not None:
        return [choose_transport(local, remote, forced)]
    kinds = ["shm", "nixl"] if local.host_id == remote.host_id else ["nixl", "tcp", "grpc"]
    if local.device_type == "cuda" and remote.device_type == "cuda":
        kinds.insert(0, "nccl")
    return kinds


class LayoutMismatch(TransportError):
    """The two workers' KV pools differ in layout (e.g. KV cache dtype): no transport can
    link them; the message says what differs and what to do."""


def probe_source(ticket: KVTicket, device: str = "cpu", own: KVLayout | None = None) -> KVPool:
    """A scratch pool (random pages) to send a probe ticket's pages from: never the
    engine's pool, which its forward passes may be writing. `own`: the sending worker's
    pool layout (default: the ticket's), so that `measure` sends what that worker would."""
    lay = own or ticket.layout
    pool = KVPool(lay.num_layers, len(ticket.block_ids), lay.block_size, lay.num_kv_heads, lay.head_dim,
                  getattr(torch, lay.dtype), device)
    pool.fill_random()
    return pool


def measure(address: str, ticket: KVTicket, source: KVPool, repeats: int = PROBE_REPEATS,
            timeout: float = 10.0) -> float:
    """Median seconds to send a probe ticket's pages at every layer (from `source`'s
    blocks 0..), as a prefill worker pushes a prompt's KV, then settle it with its done.
    Raises LayoutMismatch when `source`'s layout is not the ticket's (the decode pool's):
    those two workers cannot link. Raises TransportError or MessageRejected saying what
    failed."""
    own = layout.layout_of(source)
    mismatch = layout.layout_mismatch(own, ticket.layout)
    if mismatch is not None:
        raise LayoutMismatch(mismatch)
    blocks = list(range(len(ticket.block_ids)))
    with connect(address, timeout) as channel:
        channel.ping()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            for layer in range(ticket.layout.num_layers):
                # A GPU pool's pages are hashed by the channel, where they lie.
                checksum = layout.checksum_pages(source, layer, blocks) if source.kv.device.type == "cpu" else None
                header = layout.pages_header(ticket, own, layer, 0, len(blocks), checksum)
                channel.send_pool_pages(header, source, blocks, wait=False)
            times.append(time.perf_counter() - started)
        channel.send_done(TransferDone(ticket.request_id, ticket.ticket_id, ticket.secret, 0, 0.0))
    return statistics.median(times)


def fastest(results: dict[str, float | BaseException]) -> str:
    """The kind that measured fastest; TransportError naming every failure if none worked."""
    timed = {kind: seconds for kind, seconds in results.items() if not isinstance(seconds, BaseException)}
    if not timed:
        failures = "; ".join(f"{kind}: {error}" for kind, error in results.items())
        raise TransportError(f"no KV transport works between these workers ({failures})")
    return min(timed, key=timed.get)


def transport_table(results: dict[str, float | BaseException], nbytes: int) -> str:
    """One line per measured transport: its time and rate for `nbytes`, or why it failed."""
    lines = []
    for kind, seconds in results.items():
        if isinstance(seconds, BaseException):
            lines.append(f"  {kind:5s} failed: {seconds}")
        else:
            lines.append(f"  {kind:5s} {1000 * seconds:8.2f} ms  {nbytes / seconds / 1e9:6.2f} GB/s")
    return "\n".join(lines)
