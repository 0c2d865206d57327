"""Transports of the prefill -> decode KV hop behind one interface (see base.py).

    listener = listen("shm", receiver)            # decode worker
    channel = connect(listener.address)           # prefill worker
    channel.send_pages(header, payload); channel.send_done(done)

Kinds: grpc (any network), tcp (any network, plain sockets), gloo / nccl (torch.distributed
pairs), shm (one host), nixl (NIXL/UCX: the decode worker pulls pages out of the prefill
worker's pool; needs the optional `nixl` package).
"""

from pdserve.kv_transfer.messages import MessageRejected
from pdserve.kv_transfer.transports.base import (
    KINDS,
    KVChannel,
    KVListener,
    TransportError,
    connect,
    listen,
    reads_pool,
)
from pdserve.kv_transfer.transports.select import PeerInfo, choose_transport, probe

__all__ = [
    "KINDS",
    "KVChannel",
    "KVListener",
    "MessageRejected",
    "PeerInfo",
    "TransportError",
    "choose_transport",
    "connect",
    "listen",
    "probe",
    "reads_pool",
]
