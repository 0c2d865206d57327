"""gRPC transport: one long-lived bidirectional `Transfer` stream per channel.

Frames are `KVFrame(header=msgpack bytes, payload=raw page bytes)`; each gets one
`KVReply(ok, reason)` in order (service in proto/kv_transfer.proto). On connect the
channel calls `Info` for the listener's chunk limit and sizes its message limits to fit.
The sync gRPC server holds one worker thread per open stream, so `max_channels` bounds
both; a listener at capacity answers RESOURCE_EXHAUSTED rather than queueing a sender.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.transports.base import (
    DEFAULT_MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    KVChannel,
    KVListener,
    TransportError,
    serve_frame,
)
from pdserve.proto import kv_transfer_pb2 as pb
from pdserve.proto import kv_transfer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

_FRAME_SLACK = MAX_HEADER_BYTES + 1024  # room for the header and protobuf framing
_COMMON_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # never route a loopback/cluster hop through $http_proxy
    ("grpc.keepalive_time_ms", 30_000),  # notice a silently vanished peer
    ("grpc.keepalive_timeout_ms", 10_000),
]


class _Servicer(pb_grpc.KVTransferServicer):
    def __init__(self, receiver: KVReceiver, max_chunk_bytes: int) -> None:
        self._receiver = receiver
        self._max_chunk_bytes = max_chunk_bytes

    def Info(self, request, context):
        return pb.InfoReply(max_chunk_bytes=self._max_chunk_bytes)

    def Transfer(self, request_iterator, context):
        # Ends when the sender half-closes, dies (the iterator raises), or the server stops.
        for frame in request_iterator:
            reason = serve_frame(self._receiver, frame.header, frame.payload)
            yield pb.KVReply(ok=reason is None, reason=reason or "")


class GrpcListener(KVListener):
    def __init__(self, receiver: KVReceiver, host: str = "127.0.0.1", port: int = 0,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, max_channels: int = 16) -> None:
        options = [*_COMMON_OPTIONS,
                   ("grpc.max_receive_message_length", max_chunk_bytes + _FRAME_SLACK),
                   ("grpc.so_reuseport", 0),  # a second listener must not share our port
                   ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                   ("grpc.keepalive_permit_without_calls", 1)]
        # Every accepted RPC has a thread: no sender ever waits in a queue for one.
        self._server = grpc.server(ThreadPoolExecutor(max_channels, thread_name_prefix="kv-grpc"),
                                   options=options, maximum_concurrent_rpcs=max_channels)
        pb_grpc.add_KVTransferServicer_to_server(_Servicer(receiver, max_chunk_bytes), self._server)
        try:
            bound = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            raise TransportError(f"cannot bind the gRPC KV listener to {host}:{port}: {exc}") from exc
        if bound == 0:
            raise TransportError(f"cannot bind the gRPC KV listener to {host}:{port}")
        self._server.start()
        self.address = f"grpc://{host}:{bound}"
        self._closed = False
        logger.info("gRPC KV listener at %s (chunks up to %d bytes, %d channels)",
                    self.address, max_chunk_bytes, max_channels)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._server.stop(grace=0.5).wait(timeout=5.0)


_END = object()  # ends the request stream (half-close)


class GrpcChannel(KVChannel):
    def __init__(self, target: str, timeout: float) -> None:
        super().__init__(f"grpc://{target}", timeout)
        self._channel = grpc.insecure_channel(target, options=_COMMON_OPTIONS)
        stub = pb_grpc.KVTransferStub(self._channel)
        try:
            info = stub.Info(pb.InfoRequest(), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            self._channel.close()
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise TransportError(f"the KV listener at {self.address} is at its channel limit") from None
            raise TransportError(f"the gRPC KV listener at {self.address} did not accept a channel within "
                                 f"{timeout} s: {_describe(exc)}") from None
        self.max_chunk_bytes = info.max_chunk_bytes
        # Limits are per channel; a fresh one sized for the listener's chunks carries the stream.
        self._channel.close()
        self._channel = grpc.insecure_channel(target, options=[
            *_COMMON_OPTIONS, ("grpc.max_send_message_length", self.max_chunk_bytes + _FRAME_SLACK)])
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._call = pb_grpc.KVTransferStub(self._channel).Transfer(iter(self._requests.get, _END))
        self._reader = threading.Thread(target=self._read_replies, name="kv-grpc-replies", daemon=True)
        self._reader.start()

    def _read_replies(self) -> None:
        # gRPC's blocking iterator has no timeout: read here, wait on the queue with one.
        try:
            for reply in self._call:
                self._replies.put(reply)
            self._replies.put(TransportError(f"the listener at {self.address} ended the stream"))
        except grpc.RpcError as exc:
            self._replies.put(TransportError(f"the gRPC link to {self.address} failed: {_describe(exc)}"))

    def _exchange(self, header: bytes, payload: memoryview | bytes) -> str | None:
        self._requests.put(pb.KVFrame(header=bytes(header), payload=bytes(payload)))
        try:
            reply = self._replies.get(timeout=self.timeout)
        except queue.Empty:
            raise TransportError(f"no reply from {self.address} within {self.timeout} s") from None
        if isinstance(reply, TransportError):
            raise reply
        return None if reply.ok else reply.reason

    def _teardown(self) -> None:
        self._requests.put(_END)  # lets gRPC's request-consuming thread finish
        self._call.cancel()
        self._channel.close()


def _describe(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'UNKNOWN'}: {details}"


def listen(kind: str, receiver: KVReceiver, **options) -> GrpcListener:
    return GrpcListener(receiver, **options)


def connect(kind: str, target: str, timeout: float) -> GrpcChannel:
    return GrpcChannel(target, timeout)
