"""The prefill side of a torch.distributed KV pair: `TorchDistChannel`.

A channel takes a pair from the listener's store (torch_dist_pairs), forms the pair's
group as rank 1, learns the listener's limits from its info frame, and sends frames
(torch_dist_frames) under the channel's lock, one at a time, on a stream of its own
(CUDA). A background thread pings every idle_timeout / 4 so the listener never idles the
pair out; a pair the listener asked to close anyway is closed with a CLOSE frame and
replaced before the next frame (`KVChannel._revive_if_idle`).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.distributed as dist

from pdserve.kv_transfer import layout, messages
from pdserve.kv_transfer.messages import MessageRejected, PagesHeader
from pdserve.kv_transfer.transports import torch_dist_pairs as pairs
from pdserve.kv_transfer.transports.base import KVChannel, Reply, TransportError, decode_reply
from pdserve.kv_transfer.transports.device_checksum import device_checksum
from pdserve.kv_transfer.transports.torch_dist_backends import Backend, run_op
from pdserve.kv_transfer.transports.torch_dist_frames import (
    HEAD_BYTES,
    MAX_HEADER,
    REPLY_BYTES,
    FrameKind,
    PoolPayload,
    fill,
    halves,
    head_bytes,
    host_bytes,
    pool_chunk,
)
from pdserve.runtime.kv_pool import KVPool

logger = logging.getLogger(__name__)

_MIN_KEEPALIVE_S = 0.05  # a channel pings no more often than this, whatever the listener says

# Channels still open, closed at interpreter exit (see torch_dist._close_all).
OPEN_CHANNELS: weakref.WeakSet = weakref.WeakSet()


class TorchDistChannel(KVChannel):
    # send_pool_pages sends the pages of a pool on the backend's device from the pool
    # itself, during the call.
    reads_pool: ClassVar[bool] = True

    def __init__(self, backend: Backend, host: str, port: int, timeout: float) -> None:
        super().__init__(f"{backend.name}://{host}:{port}", timeout)
        self._backend = backend
        self._host, self._port = host, port
        self._device = backend.device()
        self._stream = backend.pair_stream()
        self._stop = threading.Event()  # ends the keep-alive thread
        self._held: list = []  # the last frame's works (see run_op)
        self._group: dist.ProcessGroup | None = None
        self._store: dist.Store | None = None
        self._index = -1  # the pair's, in the listener's store
        self._clean = False  # the pair is between frames: it can be closed with a CLOSE frame
        self._head = torch.empty(HEAD_BYTES, dtype=torch.uint8, device=self._device)
        self._reply = torch.empty(REPLY_BYTES, dtype=torch.uint8, device=self._device)
        self._open()
        self._keeper = threading.Thread(target=self._keep_alive, args=(self._keepalive_interval,), daemon=True,
                                        name=f"kv-{backend.name}-keepalive")
        self._keeper.start()
        OPEN_CHANNELS.add(self)

    def send_pool_pages(self, header: PagesHeader, pool: KVPool, block_ids: Sequence[int],
                        wait: bool = True) -> None:
        """Send layer `header.layer` of the pool's `block_ids`. From a pool on the backend's
        device the pages go from the pool itself, read during the call only, after what
        the calling thread's current stream had queued (CUDA); from a pool elsewhere, from
        a host copy. `header.checksum`: XXH3 of the pages (`layout.checksum_pages`), or
        None for the channel to take it; an nccl chunk from the pool carries its
        `device_checksum` instead, whatever the header said. Always waits for the verdict.
        A quantized pool's pages (values and scales, two tensors) go as a packed copy."""
        if pool.kv.device != self._device or pool.quantized:
            payload = layout.to_bytes(layout.read_pages(pool, header.layer, block_ids))
            if header.checksum is None:
                header = dataclasses.replace(header, checksum=layout.checksum(payload))
            self.send_pages(header, payload)
            return
        self._check_chunk_size(layout.chunk_nbytes(layout.layout_of(pool), len(block_ids)))
        self._stream.follow_caller()
        with self._stream:
            chunk = pool_chunk(pool, header.layer, block_ids)
            if self._backend.checksums_on_device:
                header, kind = dataclasses.replace(header, checksum=device_checksum(chunk)), FrameKind.DEVICE_CHUNK
            else:  # host memory (gloo)
                if header.checksum is None:
                    header = dataclasses.replace(header, checksum=layout.checksum_pages(pool, header.layer, block_ids))
                kind = FrameKind.MESSAGE
            self._request(messages.encode(header), PoolPayload(kind, chunk), ticket_id=header.ticket_id)

    def close(self) -> None:
        super().close()
        keeper = getattr(self, "_keeper", None)
        if keeper is not None and keeper is not threading.current_thread():
            keeper.join(timeout=self.timeout)

    def _open(self) -> None:
        timeout = self.timeout
        try:
            store = pairs.client_store(self._host, self._port, timeout)
            index = pairs.take_pair(store, timeout, self.address)
        except TransportError:  # refused: the listener is at its channel limit (a RuntimeError too)
            raise
        except (RuntimeError, OSError, ValueError) as exc:  # store errors, the verdict's timeout
            raise TransportError(f"no {self._backend.name} KV listener accepted a channel at {self.address} "
                                 f"within {timeout} s: {exc}") from None
        group = None
        try:
            with self._stream:
                group = self._backend.group(pairs.pair_store(store, index), 1, timeout, timeout,
                                            _local_address_towards(self._host, self._port))
                info = torch.empty(3, dtype=torch.int64, device=self._device)
                held = [self._op(group.recv, info, "receive the channel info")]
                status, max_chunk_bytes, idle_ms = info.tolist()
        except (RuntimeError, OSError, ValueError) as exc:  # rendezvous and link errors (TransportError too)
            if group is not None:
                self._backend.abandon(group)
            raise TransportError(f"no {self._backend.name} KV listener accepted a channel at {self.address} "
                                 f"within {timeout} s: {exc}") from None
        if status != 1:
            self._backend.abandon(group)
            raise TransportError(f"the KV listener at {self.address} refused the channel (status {status})")
        self._group, self._store, self._index, self._held, self._clean = group, store, index, held, True
        self.max_chunk_bytes = max_chunk_bytes
        self.idle_timeout = idle_ms / 1000  # an idle link reads the listener's word before its next frame
        self._admitted = False  # the listener has no staging for this pair until a chunk is admitted
        # The keep-alive thread keeps the pair busy: the listener never asks to close it.
        self._keepalive_interval = max(_MIN_KEEPALIVE_S, idle_ms / 1000 / 4)

    def _exchange(self, header: bytes, payload: memoryview | bytes | PoolPayload) -> str | None:
        if len(header) > MAX_HEADER:
            return f"header of {len(header)} bytes does not fit the {HEAD_BYTES}-byte frame head"
        with self._stream:
            self._clean = False  # until the frame's reply: a failure leaves the pair's state unknown
            kind, parts = self._outgoing(payload)
            fill(self._head, head_bytes(kind, header, sum(part.numel() for part in parts)))
            works = [self._op(self._group.send, self._head, f"send a frame to {self.address}")]
            if parts and not self._admitted:
                interim = self._reply_to(works)
                if interim.reason is not None:  # refused before the payload: the pair is between frames
                    self._held, self._clean = works, True
                    return interim.reason
                if not interim.proceed:
                    raise TransportError(f"the KV listener at {self.address} accepted a chunk before its payload")
                self._admitted = True
            for part in parts:
                works.append(self._op(self._group.send, part, f"send a payload to {self.address}"))
            del parts
            reply = self._reply_to(works)
            self._held = works  # drops the previous frame's works (see run_op)
            if reply.proceed:
                raise TransportError(f"the KV listener at {self.address} asked for a payload out of turn")
            self._clean = True
            return reply.reason

    def _outgoing(self, payload: memoryview | bytes | PoolPayload) -> tuple[FrameKind, list[torch.Tensor]]:
        """The frame's kind and its payload as the byte halves sent (none if empty)."""
        if isinstance(payload, PoolPayload):
            return payload.kind, [half.reshape(-1).view(torch.uint8) for half in payload.halves]
        source = memoryview(payload)
        if not source.nbytes:
            return FrameKind.MESSAGE, []
        data = source.cast("B") if source.format != "B" or source.ndim != 1 else source
        if data.readonly:  # torch.frombuffer wants a writable buffer
            data = memoryview(bytearray(data))
        tensor = torch.frombuffer(data, dtype=torch.uint8).to(self._device)
        return FrameKind.MESSAGE, [tensor[start:end] for start, end in halves(tensor.numel())]

    def _reply_to(self, works: list, group: dist.ProcessGroup | None = None) -> Reply:
        works.append(self._op((group or self._group).recv, self._reply, f"wait for a reply from {self.address}"))
        return decode_reply(bytes(host_bytes(self._reply)))

    def _op(self, op, tensor: torch.Tensor, what: str):
        return run_op(op, tensor, 0, self.timeout, what, self._backend.wait)

    def _closed_by_listener(self) -> bool:
        """The listener asked for the pair's close, or dropped it (read from its store)."""
        return self._group is None or pairs.close_request(self._store, self._index) is not None

    def _teardown(self) -> None:
        """Close the pair with a CLOSE frame when it is between frames and the listener has
        not dropped it; else abandon it."""
        if self._broken is not None:
            self._stop.set()  # closed or broken for good: no more pings
        group, store, index, clean = self._group, self._store, self._index, self._clean
        self._group = self._store = None
        self._held, self._clean = [], False
        if group is None:
            return
        if clean and pairs.close_request(store, index) != pairs.GONE:
            try:
                self._say_close(group)
                return
            except TransportError as exc:
                logger.debug("closing the KV pair to %s failed (%s); dropping it", self.address, exc)
        self._backend.abandon(group)

    def _say_close(self, group: dist.ProcessGroup) -> None:
        with self._stream:
            fill(self._head, head_bytes(FrameKind.CLOSE, b"", 0))
            works = [self._op(group.send, self._head, f"send the close frame to {self.address}")]
            reply = self._reply_to(works, group)
            if reply.reason is not None or reply.proceed:
                raise TransportError(f"the KV listener at {self.address} answered the close frame with {reply}")
            self._backend.shut_down(group)

    def _keep_alive(self, interval: float) -> None:
        while not self._stop.wait(interval / 2):
            if time.monotonic() - self.last_used >= interval:
                try:
                    self.ping()
                except (TransportError, MessageRejected):
                    return


def _local_address_towards(host: str, port: int) -> str:
    """The local address that routes to host:port (no packet is sent): the listener can
    reach us there, and on loopback it stays 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return probe.getsockname()[0]
