"""gRPC transport: one long-lived bidirectional `Transfer` stream per channel.

Frames are `KVFrame(header=msgpack bytes, payload=raw page bytes)`; each gets one
`KVReply(ok, reason)` in order (service in proto/kv_transfer.proto). On connect the
channel calls `Info` for the listener's chunk limit (and, in the reply's initial metadata,
its idle timeout), sizes its message limits to fit, opens the stream and pings on it, so a
listener at capacity is known at once.

Limits (base.ListenerLimits). The sync gRPC server holds one worker thread per open stream:
the pool has max_channels threads for streams plus _SPARE_THREADS for the short `Info` calls
and for refusing streams over the limit (RESOURCE_EXHAUSTED, counted), and gRPC itself
refuses any RPC beyond that many. A watchdog thread cancels a stream with no frame for
idle_timeout (counted); a message that stalls half-sent is buffered by gRPC, not by us, and
ends the same way. gRPC reads a message whole before the servicer sees it, so memory for a
frame is bounded by the message limit (max_chunk_bytes plus the header) and by what the
peer actually sent, and is freed with the frame; HTTP/2 connections with no stream are
closed after idle_timeout, handshakes that stall after op_timeout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.transports.base import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    KVChannel,
    KVListener,
    ListenerLimits,
    TransportError,
    serve_frame,
)
from pdserve.proto import kv_transfer_pb2 as pb
from pdserve.proto import kv_transfer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

_FRAME_SLACK = MAX_HEADER_BYTES + 1024  # room for the header and protobuf framing
_SPARE_THREADS = 2  # beyond max_channels: Info calls, and refusing streams over the limit
_IDLE_METADATA = "pdserve-kv-idle-timeout-ms"  # Info's initial metadata: the listener's idle timeout
_COMMON_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # never route a loopback/cluster hop through $http_proxy
    ("grpc.keepalive_time_ms", 30_000),  # notice a silently vanished peer
    ("grpc.keepalive_timeout_ms", 10_000),
]


class _Stream:
    """One open Transfer stream, as the watchdog sees it."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.last_frame = time.monotonic()  # when the last frame was answered (or the stream opened)
        self.busy = False  # a frame is being served: never idle
        self.cancelled = False


class _Streams:
    """The listener's open streams: at most `limit`, each cancelled by the watchdog after
    `idle_timeout` without a frame."""

    def __init__(self, receiver: KVReceiver, limit: int, idle_timeout: float) -> None:
        self._receiver = receiver
        self._limit = limit
        self._idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._open: set[_Stream] = set()
        self._stopped = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="kv-grpc-idle", daemon=True)
        self._watchdog.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def open(self, context: grpc.ServicerContext) -> _Stream | None:
        """A slot for a new stream, or None at the limit."""
        with self._lock:
            if len(self._open) >= self._limit:
                return None
            stream = _Stream(context)
            self._open.add(stream)
            return stream

    def close(self, stream: _Stream) -> None:
        with self._lock:
            self._open.discard(stream)

    def stop(self) -> None:
        self._stopped.set()
        self._watchdog.join(timeout=5.0)

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self._idle_timeout / 4)):
            now = time.monotonic()
            with self._lock:
                idle = [s for s in self._open if not s.busy and not s.cancelled
                        and now - s.last_frame >= self._idle_timeout]
                for stream in idle:
                    stream.cancelled = True
            for stream in idle:
                self._receiver.count_rejection("idle_timeout")
                logger.info("KV stream closed after %g s without a frame", self._idle_timeout)
                stream.context.cancel()


class _Servicer(pb_grpc.KVTransferServicer):
    def __init__(self, receiver: KVReceiver, limits: ListenerLimits, streams: _Streams) -> None:
        self._receiver = receiver
        self._limits = limits
        self._streams = streams

    def Info(self, request, context):
        context.send_initial_metadata(((_IDLE_METADATA, str(int(self._limits.idle_timeout * 1000))),))
        return pb.InfoReply(max_chunk_bytes=self._limits.max_chunk_bytes)

    def Transfer(self, request_iterator, context):
        stream = self._streams.open(context)
        if stream is None:
            self._receiver.count_rejection("over_connection_limit")
            logger.warning("gRPC KV listener refused a stream: %d served already (max_channels)",
                           self._limits.max_channels)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the KV listener is at its channel limit ({self._limits.max_channels} channels)")
        try:
            # Ends when the sender half-closes, dies or idles out (the iterator raises), or
            # the server stops.
            for frame in request_iterator:
                stream.busy = True
                reason = serve_frame(self._receiver, frame.header, frame.payload, self._limits.max_chunk_bytes)
                stream.last_frame, stream.busy = time.monotonic(), False
                yield pb.KVReply(ok=reason is None, reason=reason or "")
        except grpc.RpcError:  # cancelled: by the watchdog, the peer, or the server stopping
            return
        finally:
            self._streams.close(stream)


class GrpcListener(KVListener):
    def __init__(self, receiver: KVReceiver, host: str = "127.0.0.1", port: int = 0,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, max_channels: int = 16,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT, op_timeout: float = 30.0) -> None:
        self._limits = limits = ListenerLimits(max_chunk_bytes, max_channels, idle_timeout, op_timeout)
        threads = max_channels + _SPARE_THREADS
        options = [*_COMMON_OPTIONS,
                   ("grpc.max_receive_message_length", max_chunk_bytes + _FRAME_SLACK),
                   ("grpc.so_reuseport", 0),  # a second listener must not share our port
                   ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.max_connection_idle_ms", int(idle_timeout * 1000)),
                   ("grpc.server_handshake_timeout_ms", int(op_timeout * 1000))]
        self._streams = _Streams(receiver, max_channels, idle_timeout)
        # Every accepted RPC has a thread: no sender ever waits in a queue for one.
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="kv-grpc")
        self._server = grpc.server(self._executor, options=options, maximum_concurrent_rpcs=threads)
        pb_grpc.add_KVTransferServicer_to_server(_Servicer(receiver, limits, self._streams), self._server)
        try:
            bound = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            self._stop_threads()
            raise TransportError(f"cannot bind the gRPC KV listener to {host}:{port}: {exc}") from exc
        if bound == 0:
            self._stop_threads()
            raise TransportError(f"cannot bind the gRPC KV listener to {host}:{port}")
        self._server.start()
        self.address = f"grpc://{host}:{bound}"
        self._closed = False
        logger.info("gRPC KV listener at %s (chunks up to %d bytes, %d channels, idle streams closed after %g s)",
                    self.address, max_chunk_bytes, max_channels, idle_timeout)

    @property
    def num_links(self) -> int:
        """Transfer streams served right now."""
        return len(self._streams)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._server.stop(grace=0.5).wait(timeout=5.0)
            self._stop_threads()

    def _stop_threads(self) -> None:
        self._streams.stop()
        self._executor.shutdown(wait=True)  # the server has cancelled every stream: they end now


_END = object()  # ends the request stream (half-close)


class GrpcChannel(KVChannel):
    def __init__(self, target: str, timeout: float) -> None:
        super().__init__(f"grpc://{target}", timeout)
        self._target = target
        self._channel: grpc.Channel | None = None
        self._call = None
        self._requests: queue.SimpleQueue | None = None  # this stream's frames
        self._replies: queue.SimpleQueue | None = None  # this stream's replies, or the error that ended it
        self._open()

    def _open(self) -> None:
        channel = grpc.insecure_channel(self._target, options=_COMMON_OPTIONS)
        try:
            info, call = pb_grpc.KVTransferStub(channel).Info.with_call(
                pb.InfoRequest(), timeout=self.timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise TransportError(f"the KV listener at {self.address} is at its channel limit") from None
            raise TransportError(f"the gRPC KV listener at {self.address} did not accept a channel within "
                                 f"{self.timeout} s: {_describe(exc)}") from None
        finally:
            # Limits are per channel; a fresh one sized for the listener's chunks carries the stream.
            channel.close()
        self.max_chunk_bytes = info.max_chunk_bytes
        idle_ms = dict(call.initial_metadata() or ()).get(_IDLE_METADATA, "")
        self.idle_timeout = int(idle_ms) / 1000 if idle_ms.isdigit() and int(idle_ms) else None
        self._channel = grpc.insecure_channel(self._target, options=[
            *_COMMON_OPTIONS, ("grpc.max_send_message_length", self.max_chunk_bytes + _FRAME_SLACK)])
        self._requests, self._replies = queue.SimpleQueue(), queue.SimpleQueue()
        self._call = pb_grpc.KVTransferStub(self._channel).Transfer(iter(self._requests.get, _END))
        threading.Thread(target=self._read_replies, args=(self._call, self._replies),
                         name="kv-grpc-replies", daemon=True).start()
        try:  # the listener admits a stream only with a slot free: know now, not at the first chunk
            self._exchange(b"", b"")
        except TransportError as exc:
            self._teardown()
            if "RESOURCE_EXHAUSTED" in str(exc):
                raise TransportError(f"the KV listener at {self.address} is at its channel limit") from None
            raise

    def _read_replies(self, call, replies: queue.SimpleQueue) -> None:
        # gRPC's blocking iterator has no timeout: read here, wait on the queue with one.
        try:
            for reply in call:
                replies.put(reply)
            replies.put(TransportError(f"the listener at {self.address} ended the stream"))
        except grpc.RpcError as exc:
            replies.put(TransportError(f"the gRPC link to {self.address} failed: {_describe(exc)}"))

    def _exchange(self, header: bytes, payload: memoryview | bytes) -> str | None:
        self._requests.put(pb.KVFrame(header=bytes(header), payload=bytes(payload)))
        try:
            reply = self._replies.get(timeout=self.timeout)
        except queue.Empty:
            raise TransportError(f"no reply from {self.address} within {self.timeout} s") from None
        if isinstance(reply, TransportError):
            raise reply
        return None if reply.ok else reply.reason

    def _closed_by_listener(self) -> bool:
        # Between frames nothing is due: anything queued is the error that ended the stream.
        return self._replies is None or not self._replies.empty()

    def _teardown(self) -> None:
        if self._call is not None:
            self._requests.put(_END)  # lets gRPC's request-consuming thread finish
            self._call.cancel()
            self._call = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._replies = None


def _describe(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'UNKNOWN'}: {details}"


def listen(kind: str, receiver: KVReceiver, **options) -> GrpcListener:
    return GrpcListener(receiver, **options)


def connect(kind: str, target: str, timeout: float) -> GrpcChannel:
    return GrpcChannel(target, timeout)
