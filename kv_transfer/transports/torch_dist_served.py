"""The listener's end of one torch.distributed KV pair, served by a thread of its own.

`ServedPair.run` forms the pair's group with its sender, sends the info frame and serves
frames (see torch_dist_frames) until the sender's CLOSE frame. Every wait is bounded: the
next head op_timeout past idle_timeout at most (the acceptor asks an idle pair's sender to
close it at idle_timeout, see torch_dist_pairs), each part of a frame op_timeout.

Where a chunk's pages go. A MESSAGE chunk's payload is read on the host and handed to the
receiver as bytes (`apply_frame`: XXH3 checked there). A DEVICE_CHUNK stays where the
staging tensor lies: its `device_checksum` is verified there, then its pages are written
into the ticket's blocks (`KVReceiver.land_pages`, `Landing.landed(checksum=...)`), and the
reply goes only once those writes are done, so TransferDone cannot overtake them.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.distributed as dist

from pdserve.kv_transfer import layout
from pdserve.kv_transfer.messages import MessageRejected, PagesHeader
from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.transports import torch_dist_pairs as pairs
from pdserve.kv_transfer.transports.base import (
    ListenerLimits,
    TransportError,
    admit_frame,
    apply_frame,
    encode_proceed,
    encode_reply,
    serve_frame,
)
from pdserve.kv_transfer.transports.device_checksum import device_checksum
from pdserve.kv_transfer.transports.torch_dist_backends import Backend, LinkTimeout, PairStream, run_op
from pdserve.kv_transfer.transports.torch_dist_frames import (
    HEAD_BYTES,
    MAX_HEADER,
    REPLY_BYTES,
    FrameKind,
    Head,
    chunk_pages,
    fill,
    halves,
    host_bytes,
    read_head,
)

logger = logging.getLogger(__name__)


class ServedPair:
    """One pair, from its verdict to its end. Its thread calls `run`; the listener reads
    `watch` (to ask an idle pair's close) and `staging_bytes` from its own threads."""

    def __init__(self, index: int, address: tuple[str, int], backend: Backend, receiver: KVReceiver,
                 limits: ListenerLimits, connect_timeout: float, closing: threading.Event) -> None:
        self.index, self.address, self.backend, self.receiver = index, address, backend, receiver
        self.limits, self.connect_timeout, self.closing = limits, connect_timeout, closing
        self.watch = pairs.PairWatch(index)
        self.name = f"{backend.name} KV pair {index} on {address[0]}:{address[1]}"
        self._staging: torch.Tensor | None = None  # payload memory: none until a chunk header is admitted
        self._works: list = []  # this frame's
        self._held: list = []  # the previous frame's, until this one is done (see run_op)

    @property
    def staging_bytes(self) -> int:
        staging = self._staging
        return 0 if staging is None else staging.numel()

    def run(self) -> bool:
        """Serve the pair. True if its sender closed it with a CLOSE frame (the group is
        then shut down); False if it failed, stalled, idled past the ask, or the listener
        closed (the group is then abandoned and the pair marked gone). Never raises."""
        store = group = None
        try:
            stream = self.backend.pair_stream()
            with stream:
                try:
                    store = pairs.client_store(*self.address, self.connect_timeout)
                    group = self.backend.group(pairs.pair_store(store, self.index), 0, self.connect_timeout,
                                               self.limits.idle_timeout + self.limits.op_timeout, self.address[0])
                except RuntimeError as exc:  # no sender joined in time (or the store went away)
                    raise TransportError(f"no sender joined within {self.connect_timeout} s: {exc}") from None
                self._serve(group, store, stream)
            logger.debug("%s closed by its sender", self.name)
            return True
        except TransportError as exc:
            logger.info("%s closed: %s", self.name, exc)
        except Exception:
            logger.exception("%s failed", self.name)
        finally:
            self._staging = None
            self._works, self._held = [], []
        if group is not None:
            self.watch.mark_gone(store)
            self.backend.abandon(group)
        return False

    def _serve(self, group: dist.ProcessGroup, store: dist.Store, stream: PairStream) -> None:
        """Frames until the sender's CLOSE, which is acknowledged and the group shut down.
        Raises TransportError if the pair fails, a frame stalls, or the listener closes."""
        limits, device = self.limits, self.backend.device()
        info = torch.tensor([1, limits.max_chunk_bytes, int(limits.idle_timeout * 1000)], dtype=torch.int64,
                            device=device)
        self._held = [self._op(group.send, info, "send the channel info")]
        head_tensor = torch.empty(HEAD_BYTES, dtype=torch.uint8, device=device)
        reply = torch.empty(REPLY_BYTES, dtype=torch.uint8, device=device)
        while True:
            with self.watch.waiting(store):  # the listener's close cancels this wait where it can (nccl)
                self._works.append(run_op(group.recv, head_tensor, 1, limits.idle_timeout + limits.op_timeout,
                                          "wait for the next frame", self.backend.wait, self.closing))
            head = read_head(head_tensor)
            if head.header_len > MAX_HEADER or head.payload_len > limits.max_chunk_bytes:
                self.receiver.count_rejection("oversized")
                raise TransportError(f"a frame of {head.header_len} + {head.payload_len} bytes is over the limits")
            if self.closing.is_set():
                raise TransportError("the listener is closing")
            try:
                if head.is_close:
                    self._reply(group, reply, None)
                    self.backend.shut_down(group)
                    return
                reason = self._frame(group, reply, head)
                if head.payload_len:
                    stream.synchronize()  # the frame's pages are in the pool before its reply
                self._reply(group, reply, reason)
            except LinkTimeout:
                self.receiver.count_rejection("stalled_frame")
                raise
            except TransportError:
                self.receiver.count_rejection("truncated")
                raise
            self._held, self._works = self._works, []  # drops the previous frame's works (see run_op)

    def _frame(self, group: dist.ProcessGroup, reply: torch.Tensor, head: Head) -> str | None:
        """Serve a frame other than a CLOSE, taking its payload if one follows. Returns the
        reply's reason (None: accepted)."""
        receiver, limit, payload_len = self.receiver, self.limits.max_chunk_bytes, head.payload_len
        problem = None
        if head.kind not in (FrameKind.MESSAGE, FrameKind.DEVICE_CHUNK):
            problem = "a close frame carries nothing" if head.kind == FrameKind.CLOSE else \
                f"unknown frame kind {head.kind}"
        if not payload_len:
            return self._refuse(problem) if problem else serve_frame(receiver, head.header, b"", limit)
        message = None
        first = self._staging is None
        if first:  # the pair's first chunk: its header passes the checks before its payload may come
            if problem:
                return self._refuse(problem)  # final: the sender sends no payload after a refusal
            try:
                message = admit_frame(receiver, head.header, payload_len, limit)
            except MessageRejected as exc:
                return str(exc)
            self._grant(group, reply, payload_len)
        payload = self._receive(group, payload_len)
        if problem:
            return self._refuse(problem)
        if head.kind == FrameKind.MESSAGE:
            data = host_bytes(payload)
            return apply_frame(receiver, message, data) if first else serve_frame(receiver, head.header, data, limit)
        if not first:
            try:
                message = admit_frame(receiver, head.header, payload_len, limit)
            except MessageRejected as exc:
                return str(exc)
        return self._land(message, payload)  # admitted with a payload: a PagesHeader

    def _land(self, header: PagesHeader, payload: torch.Tensor) -> str | None:
        """Write a DEVICE_CHUNK's pages from the staging into the ticket's blocks once its
        device checksum matched; they count once landed. Returns the reply's reason."""
        try:
            landing = self.receiver.land_pages(header)
        except MessageRejected as exc:
            return str(exc)
        try:
            got = device_checksum([payload])
            if got != header.checksum:  # nothing is written
                landing.abandoned("checksum mismatch: a chunk was corrupted in transit", "checksum")
            pages = chunk_pages(payload, self.receiver.layout, header.num_pages)
            layout.write_pages(landing.pool, header.layer, landing.block_ids, pages)
            landing.landed(checksum=got)
        except MessageRejected as exc:
            return str(exc)
        except Exception as exc:  # a bug here must not take the listener down, nor leave the landing open
            logger.exception("KV listener failed to land a chunk")
            reason = f"internal error in the listener: {type(exc).__name__}: {exc}"
            try:
                landing.abandoned(reason, "internal_error")
            except (MessageRejected, RuntimeError):  # abandoned now, or closed already
                pass
            return reason
        return None

    def _refuse(self, reason: str) -> str:
        self.receiver.count_rejection("malformed")
        return reason

    def _grant(self, group: dist.ProcessGroup, reply: torch.Tensor, payload_len: int) -> None:
        """Give the pair its staging and tell the sender to send the payload."""
        self._staging = torch.empty(payload_len, dtype=torch.uint8, device=self.backend.device())
        fill(reply, encode_proceed())
        self._works.append(self._op(group.send, reply, "send the go-ahead"))

    def _receive(self, group: dist.ProcessGroup, payload_len: int) -> torch.Tensor:
        if self._staging.numel() < payload_len:  # the pair has passed the ticket checks before
            self._staging = torch.empty(payload_len, dtype=torch.uint8, device=self.backend.device())
        payload = self._staging[:payload_len]
        for start, end in halves(payload_len):
            self._works.append(self._op(group.recv, payload[start:end], "receive a payload"))
        return payload

    def _reply(self, group: dist.ProcessGroup, reply: torch.Tensor, reason: str | None) -> None:
        fill(reply, encode_reply(reason, REPLY_BYTES))
        self._works.append(self._op(group.send, reply, "send a reply"))

    def _op(self, op, tensor: torch.Tensor, what: str):
        """A part of a frame (or the info frame): op_timeout at most."""
        return run_op(op, tensor, 1, self.limits.op_timeout, what, self.backend.wait)
