"""Which transport carries the KV between two workers, and a start-up check that it works.

    same host                -> "shm"    (one memcpy into shared memory, no socket copies)
    both CUDA, across hosts  -> "nccl"
    otherwise                -> "grpc"

`forced` (from the operator's config) overrides the choice, but never silently: a forced
transport that cannot work between these peers raises TransportError, and `probe` proves
at start-up that a listener's address answers.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from pdserve.kv_transfer.messages import MessageRejected
from pdserve.kv_transfer.transports.base import KINDS, TransportError, connect

logger = logging.getLogger(__name__)


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
