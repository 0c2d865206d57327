"""Per-request records, access log lines, `x-pdserve-*` headers and OpenTelemetry traces.

The cluster backend over fake workers writes each path's record (remote, local, a
fallback, a migration); the tracer turns records into span trees, checked with an
in-memory exporter; the HTTP and gRPC APIs over an in-process engine answer with the
headers / trailing metadata, honour the client's `traceparent` and log one line per request.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_control_plane import BLOCK, _controller, _DecodeThatDies, _DecodeThatServes, _Method, _Stream

from pdserve.cluster.control.cluster_backend import ClusterBackend
from pdserve.cluster.control.controller import WorkerHandle
from pdserve.cluster.control.router import RoundRobin, Router
from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.cluster.gateway.request_record import ACCESS_LOGGER, RequestRecord
from pdserve.cluster.gateway.tracing import RequestTracer
from pdserve.cluster.workers.actors import WorkerInfo
from pdserve.kv_transfer.messages import KVLayout, KVTicket, PrefillResult
from pdserve.kv_transfer.transports.select import PeerInfo
from pdserve.runtime.request import TokenDelta
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE_ID}-00f067aa0ba902b7-01"


# ------------------------------------------------------------------ fake workers


class _RemoteDecode:
    """A decode worker asked to take a remotely prefilled request: its ticket first (or
    None: no room, it prefills the prompt itself), then two tokens."""

    def __init__(self, ticket: bool = True) -> None:
        self.ticket = ticket
        self.generate = _Stream(self._generate)
        self.abort = _Method(self._noop)
        self.fail_remote = _Method(self._noop)
        self.failed: list[str] = []

    async def _generate(self, request_id, prompt_ids, params, remote, resume_at=None):
        if remote:
            yield (KVTicket(request_id, 1, b"s", (5, 6), 1, len(prompt_ids), KVLayout(2, BLOCK, 1, 8, "float32"),
                            1e18) if self.ticket else None)
            await asyncio.sleep(0.01)
        yield TokenDelta(request_id, (7,), (0.0,), None, None, len(prompt_ids), BLOCK)
        yield TokenDelta(request_id, (8, 9), (0.0, 0.0), None, FinishReason.LENGTH, len(prompt_ids), BLOCK)

    async def _noop(self, *args):
        self.failed.append(args[-1])


class _Prefill:
    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.jobs: list = []
        self.prefill = _Method(self._prefill)
        self.abort = _Method(self._prefill)

    async def _prefill(self, job):
        self.jobs.append(job)
        reason = "" if self.ok else "the decode worker refused chunk 0: bad checksum"
        return PrefillResult(job.ticket.request_id, self.ok, reason, 0.002, 0.004, 0.001, kv_bytes=4096)


class _Links:
    def has_up(self, prefill_id):
        return True

    def address(self, prefill_id, decode_id):
        return "tcp://127.0.0.1:9"


def _cluster(decode, prefill=None) -> ClusterBackend:
    controller = _controller(0, 1)
    info = WorkerInfo("decode-0", "decode", PeerInfo.local("cpu"), BLOCK, 1, (0,), 1)
    controller.workers["decode-0"] = WorkerHandle("decode-0", "decode", decode, info, None, ready=True)
    if prefill is not None:
        pinfo = WorkerInfo("prefill-0", "prefill", PeerInfo.local("cpu"), BLOCK, 1, (0,), 1)
        controller.workers["prefill-0"] = WorkerHandle("prefill-0", "prefill", prefill, pinfo, None, ready=True)
    controller.links = _Links()
    controller.worker_died = lambda handle, why, *reason: controller.workers.pop(handle.worker_id, None)
    return ClusterBackend(controller, Router(RoundRobin(), BLOCK, local_prefill_tokens=4), GatewayMetrics())


def _serve(backend: ClusterBackend, prompt: list[int], record: RequestRecord | None = None) -> RequestRecord:
    """Stream the request through `backend` as OutputStream would, writing the stream's
    part of `record`; it finishes 10 ms after its first token."""
    record = record or RequestRecord("req", len(prompt))

    async def run():
        async for delta in backend.generate("req", prompt, SamplingParams(max_tokens=3), record):
            if delta.token_ids and record.first_token_at is None:
                record.first_token_at = asyncio.get_running_loop().time()
            record.num_output_tokens += len(delta.token_ids)
            record.decode_steps += bool(delta.token_ids)
            if delta.finish_reason is not None:
                record.finish_reason = delta.finish_reason.value
        await asyncio.sleep(0.02)  # the prefill report lands

    asyncio.run(run())
    record.finished_at = record.first_token_at + 0.01
    return record


LONG_PROMPT = list(range(10, 30))  # 20 uncached tokens: over the local threshold of 4


# ------------------------------------------------------------------ what the backend records


def test_a_remote_request_records_its_route_and_the_prefill_workers_report():
    prefill = _Prefill()
    record = _serve(_cluster(_RemoteDecode(), prefill), LONG_PROMPT)
    assert (record.route, record.decode_worker, record.prefill_worker) == ("remote", "decode-0", "prefill-0")
    report = record.prefill
    assert report.ok and report.worker == "prefill-0" and report.transport == "tcp" and report.kv_bytes == 4096
    assert report.kv_pages == -(-len(LONG_PROMPT) // BLOCK) - 1  # the ticket starts at page 1: one page cached
    assert record.num_cached_tokens == 0 and record.fallbacks == []  # (the stream sets the cached count)
    assert prefill.jobs[0].traceparent == record.traceparent


def test_a_decode_worker_without_room_is_a_recorded_fallback():
    record = _serve(_cluster(_RemoteDecode(ticket=False), _Prefill()), LONG_PROMPT)
    assert record.route == "remote" and record.prefill is None
    assert len(record.fallbacks) == 1 and "no room" in record.fallbacks[0].reason


def test_a_failed_prefill_is_reported_and_recorded_as_a_fallback():
    decode = _RemoteDecode()
    record = _serve(_cluster(decode, _Prefill(ok=False)), LONG_PROMPT)
    assert record.prefill is not None and not record.prefill.ok and "bad checksum" in record.prefill.reason
    assert "bad checksum" in record.fallbacks[0].reason and decode.failed == [record.prefill.reason]


def test_a_short_prompt_is_local_and_a_lost_decode_worker_is_a_recorded_migration():
    seen: list[str] = []
    controller_backend = _cluster(_DecodeThatDies(seen, tokens_before_death=1))
    info = WorkerInfo("decode-1", "decode", PeerInfo.local("cpu"), BLOCK, 1, (0,), 1)
    controller_backend.controller.workers["decode-1"] = WorkerHandle("decode-1", "decode", _DecodeThatServes(seen),
                                                                     info, None, ready=True)
    record = _serve(controller_backend, [1, 2, 3])
    assert record.route == "local" and record.decode_worker == "decode-1"
    [migration] = record.migrations
    assert migration.from_worker == "decode-0" and migration.tokens_sent == 1
    assert migration.rerouted_at is not None and migration.rerouted_at >= migration.at


# ------------------------------------------------------------------ span trees


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return RequestTracer(provider), exporter


def _traced(tracer: RequestTracer, backend: ClusterBackend, prompt: list[int], traceparent: str | None = None):
    record = RequestRecord("req", len(prompt))
    tracer.open(record, traceparent)
    _serve(backend, prompt, record)
    tracer.close(record)
    return record


def _tree(exporter: InMemorySpanExporter) -> tuple[object, dict[str, object]]:
    finished = exporter.get_finished_spans()
    [root] = [s for s in finished if s.name == "pdserve.request"]
    children = {s.name: s for s in finished if s is not root}
    assert all(s.parent.span_id == root.context.span_id for s in children.values())
    assert all(s.context.trace_id == root.context.trace_id for s in children.values())
    return root, children


def test_a_disaggregated_request_has_the_full_span_tree_under_the_clients_traceparent(spans):
    tracer, exporter = spans
    record = _traced(tracer, _cluster(_RemoteDecode(), _Prefill()), LONG_PROMPT, CLIENT_TRACEPARENT)
    root, children = _tree(exporter)
    assert format(root.context.trace_id, "032x") == CLIENT_TRACE_ID  # the client's trace
    assert root.parent.span_id == int("00f067aa0ba902b7", 16)
    assert record.traceparent.split("-")[1] == CLIENT_TRACE_ID
    assert set(children) == {"pdserve.route", "pdserve.prefill.queue", "pdserve.prefill.compute",
                             "pdserve.kv.transfer", "pdserve.decode.first_step", "pdserve.decode"}
    transfer = children["pdserve.kv.transfer"].attributes
    assert transfer["pdserve.kv.transport"] == "tcp" and transfer["pdserve.kv.bytes"] == 4096
    assert transfer["pdserve.kv.outcome"] == "ok" and transfer["pdserve.kv.pages"] == record.prefill.kv_pages
    queue, compute = children["pdserve.prefill.queue"], children["pdserve.prefill.compute"]
    assert compute.end_time - compute.start_time == pytest.approx(4e6, abs=2e5)  # 4 ms measured on P
    assert queue.end_time == compute.start_time and queue.attributes["pdserve.worker"] == "prefill-0"
    decode = children["pdserve.decode"].attributes
    assert decode["pdserve.tokens"] == 3 and decode["pdserve.decode.steps"] == 2
    assert root.attributes["pdserve.route"] == "remote" and root.attributes["gen_ai.usage.output_tokens"] == 3
    assert root.start_time <= min(s.start_time for s in children.values())


def test_a_local_request_has_its_own_shape(spans):
    tracer, exporter = spans
    _traced(tracer, _cluster(_RemoteDecode(), _Prefill()), [1, 2, 3])
    root, children = _tree(exporter)
    assert set(children) == {"pdserve.route", "pdserve.prefill.local", "pdserve.decode"}
    assert root.parent is None  # no client context: a new trace
    assert children["pdserve.prefill.local"].attributes["pdserve.worker"] == "decode-0"


def test_a_fallback_request_shows_its_failed_transfer_and_the_fallback(spans):
    tracer, exporter = spans
    _traced(tracer, _cluster(_RemoteDecode(), _Prefill(ok=False)), LONG_PROMPT)
    root, children = _tree(exporter)
    assert {"pdserve.kv.transfer", "pdserve.fallback", "pdserve.decode"} <= set(children)
    assert "pdserve.decode.first_step" not in children  # the transfer failed: D recomputed
    transfer = children["pdserve.kv.transfer"]
    assert transfer.attributes["pdserve.kv.outcome"] == "failed" and not transfer.status.is_ok
    assert "bad checksum" in children["pdserve.fallback"].attributes["pdserve.reason"]
    assert root.attributes["pdserve.fallbacks"] == 1


def test_a_migrated_request_shows_the_migration(spans):
    tracer, exporter = spans
    seen: list[str] = []
    backend = _cluster(_DecodeThatDies(seen, tokens_before_death=1))
    info = WorkerInfo("decode-1", "decode", PeerInfo.local("cpu"), BLOCK, 1, (0,), 1)
    backend.controller.workers["decode-1"] = WorkerHandle("decode-1", "decode", _DecodeThatServes(seen), info,
                                                          None, ready=True)
    _traced(tracer, backend, [1, 2, 3])
    root, children = _tree(exporter)
    assert children["pdserve.migration"].attributes["pdserve.from_worker"] == "decode-0"
    assert root.attributes["pdserve.migrations"] == 1


def test_without_a_provider_nothing_is_traced_but_a_valid_client_trace_id_is_kept():
    tracer = RequestTracer()
    record = RequestRecord("r", 3)
    tracer.open(record, CLIENT_TRACEPARENT)
    tracer.close(record)
    assert record.traceparent == CLIENT_TRACEPARENT and record.summary()["trace_id"] == CLIENT_TRACE_ID
    garbage = RequestRecord("g", 3)
    tracer.open(garbage, "not-a-traceparent")
    assert garbage.traceparent == ""


# ------------------------------------------------------------------ the record's outputs


def test_headers_and_log_lines_say_what_happened():
    record = _serve(_cluster(_RemoteDecode(), _Prefill()), LONG_PROMPT)
    record.num_cached_tokens = BLOCK
    headers = record.headers()
    assert headers["x-pdserve-route"] == "remote" and headers["x-pdserve-prefill-worker"] == "prefill-0"
    assert headers["x-pdserve-kv-bytes"] == "4096" and headers["x-pdserve-kv-transport"] == "tcp"
    assert headers["x-pdserve-cached-tokens"] == str(BLOCK) and headers["x-pdserve-finish-reason"] == "length"
    stages = dict(part.split("=") for part in headers["x-pdserve-ttft-split-ms"].split(";"))
    assert set(stages) == {"routing", "prefill_queue", "prefill_compute", "kv_transfer", "first_decode_step"}
    assert float(stages["prefill_compute"]) == pytest.approx(4.0)
    assert all(value.isprintable() and "\n" not in value for value in headers.values())
    line = json.loads(record.log_line("json"))
    assert line["route"] == "remote" and line["kv_bytes"] == 4096 and line["migrations"] == 0
    assert line["tpot_ms"] == pytest.approx(10.0 / 2, rel=0.01)  # 3 tokens, 10 ms after the first
    plain = record.log_line("plain")
    assert "request_id=req" in plain and "route=remote" in plain and "kv_transport=tcp" in plain


@pytest.fixture(scope="module")
def traced_gateway(tiny_llama_dir):
    from gateway_fixtures import GrpcServers, LocalGateway, serve_asgi

    from pdserve.cluster.gateway.openai.api import create_app

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gateway = LocalGateway.start(tiny_llama_dir)
    gateway.frontend.tracer = RequestTracer(provider)
    gateway.frontend.log_format = "json"
    servers = GrpcServers()
    try:
        with serve_asgi(create_app(gateway.frontend)) as base_url:
            yield base_url, servers.serve(gateway.frontend), exporter
    finally:
        servers.close()
        gateway.close()


def _access_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]


@pytest.mark.parametrize("stream", [False, True])
def test_http_answers_carry_the_record_and_the_trace_and_log_one_line(traced_gateway, caplog, stream):
    import httpx

    base_url, _, exporter = traced_gateway
    exporter.clear()
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0, "stream": stream}
    with httpx.Client(timeout=60) as client:
        response = client.post(f"{base_url}/v1/completions", json=body, headers={"traceparent": CLIENT_TRACEPARENT})
        text = response.text
    assert response.status_code == 200, text
    headers = response.headers
    request_id = headers["x-pdserve-request-id"]
    assert headers["x-pdserve-route"] == "local" and headers["x-pdserve-prompt-tokens"] == "4"
    assert headers["traceparent"].split("-")[1] == CLIENT_TRACE_ID
    assert float(headers["x-pdserve-ttft-ms"]) > 0
    if not stream:  # the whole record: known when the answer is
        assert headers["x-pdserve-output-tokens"] == "4" and headers["x-pdserve-finish-reason"] == "length"
        assert json.loads(text)["id"] == request_id
    [line] = [entry for entry in _access_lines(caplog) if entry["request_id"] == request_id]
    assert line["api"] == "completions" and line["output_tokens"] == 4 and line["finish_reason"] == "length"
    assert line["trace_id"] == CLIENT_TRACE_ID and line["route"] == "local"
    root = next(s for s in exporter.get_finished_spans() if s.name == "pdserve.request")
    assert root.attributes["pdserve.request_id"] == request_id and root.parent.span_id == int("00f067aa0ba902b7", 16)


def test_grpc_answers_carry_the_record_as_trailing_metadata(traced_gateway, caplog):
    import grpc

    from pdserve.proto import serving_pb2, serving_pb2_grpc

    _, address, _ = traced_gateway
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    with grpc.insecure_channel(address) as channel:
        stub = serving_pb2_grpc.GenerationStub(channel)
        call = stub.Generate(serving_pb2.GenerateRequest(token_ids=serving_pb2.TokenIds(ids=[5, 6, 7]), max_tokens=3,
                                                         temperature=0),
                             metadata=(("traceparent", CLIENT_TRACEPARENT),), timeout=60)
        responses = list(call)
        trailing = dict(call.trailing_metadata())
    assert responses[-1].finish_reason == "length"
    assert trailing["x-pdserve-route"] == "local" and trailing["x-pdserve-output-tokens"] == "3"
    assert trailing["traceparent"].split("-")[1] == CLIENT_TRACE_ID
    [line] = [e for e in _access_lines(caplog) if e["request_id"] == trailing["x-pdserve-request-id"]]
    assert line["api"] == "grpc" and line["trace_id"] == CLIENT_TRACE_ID


def test_a_refused_request_is_logged_with_its_error(traced_gateway, caplog):
    """A request that fails after admission (here: its timeout) still gets its line."""
    import httpx

    base_url, _, _ = traced_gateway
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 200, "temperature": 0, "timeout": 0.001,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        response = client.post(f"{base_url}/v1/completions", json=body)
    assert response.status_code == 408, response.text  # 1 ms: before any token
    line = _access_lines(caplog)[-1]
    assert line["finish_reason"] == "timeout" and "timeout" in line["error"] and line["prompt_tokens"] == 3
