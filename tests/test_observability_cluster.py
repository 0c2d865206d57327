"""Start-up lines, traces and access log lines of a real `pdserve serve` (1 prefill + 1 decode worker on local
Ray), exported over OTLP/gRPC to a collector this test runs: a disaggregated request's
trace holds the prefill, transfer and decode spans with what the transfer moved, under the
client's traceparent; a short prompt's trace has the local shape; every request has one
JSON access line, and the HTTP answer says the same in its x-pdserve-* headers."""

from __future__ import annotations

import json
import threading
from concurrent import futures

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from serve_process import API_KEY, ServeProcess, wait_for

CLIENT_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT_SPAN = "b7ad6b7169203331"


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list:
        with self._lock:
            return [s for s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def traced_cluster(tiny_llama_dir):
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    cluster = ServeProcess(str(tiny_llama_dir), "--prefill-workers", "1", "--decode-workers", "1",
                           "--otlp-endpoint", f"127.0.0.1:{port}", "--log-format", "json")
    try:
        yield cluster, collector
    finally:
        cluster.stop_and_check()
        server.stop(0)


def _post(cluster: ServeProcess, prompt: list[int], traceparent: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if traceparent:
        headers["traceparent"] = traceparent
    body = {"model": cluster.model_name, "prompt": prompt, "max_tokens": 5, "temperature": 0}
    response = httpx.post(f"{cluster.http_url}/v1/completions", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response


def _access_line(cluster: ServeProcess, request_id: str) -> dict:
    def find():
        for line in list(cluster.lines):
            if line.startswith("{") and f'"request_id":"{request_id}"' in line:
                return json.loads(line)
        return None

    return wait_for(find, 30, f"the access log line of {request_id}")


def _spans_by_name(collector: _Collector, trace_id: str, expected: set[str]) -> dict:
    def complete():
        spans = {s.name: s for s in collector.trace(trace_id)}
        return spans if expected <= set(spans) else None

    return wait_for(complete, 30, f"spans {sorted(expected)} of trace {trace_id}",
                    state=lambda: sorted(s.name for s in collector.trace(trace_id)))


def _attributes(span) -> dict:
    values = {}
    for kv in span.attributes:
        value = kv.value
        values[kv.key] = getattr(value, value.WhichOneof("value"))
    return values


def test_a_disaggregated_request_is_traced_across_the_hop_under_the_clients_trace(traced_cluster):
    cluster, collector = traced_cluster
    prompt = [(7 * i) % 300 + 3 for i in range(80)]  # 80 uncached tokens: over the local threshold
    response = _post(cluster, prompt, f"00-{CLIENT_TRACE_ID}-{CLIENT_PARENT_SPAN}-01")
    headers = response.headers
    assert headers["x-pdserve-route"] == "remote"
    assert headers["x-pdserve-prefill-worker"].startswith("prefill") and int(headers["x-pdserve-kv-bytes"]) > 0
    spans = _spans_by_name(collector, CLIENT_TRACE_ID, {
        "pdserve.request", "pdserve.route", "pdserve.prefill.queue", "pdserve.prefill.compute",
        "pdserve.kv.transfer", "pdserve.decode.first_step", "pdserve.decode"})
    root = spans["pdserve.request"]
    assert root.parent_span_id.hex() == CLIENT_PARENT_SPAN
    assert all(s.parent_span_id == root.span_id for name, s in spans.items() if name != "pdserve.request")
    transfer = _attributes(spans["pdserve.kv.transfer"])
    assert transfer["pdserve.kv.bytes"] == int(headers["x-pdserve-kv-bytes"])
    assert transfer["pdserve.kv.outcome"] == "ok" and transfer["pdserve.kv.pages"] == 80 // 4
    assert transfer["pdserve.kv.transport"] == headers["x-pdserve-kv-transport"]
    line = _access_line(cluster, headers["x-pdserve-request-id"])
    assert line["route"] == "remote" and line["trace_id"] == CLIENT_TRACE_ID and line["output_tokens"] == 5
    assert set(line["ttft_split_ms"]) == {"routing", "prefill_queue", "prefill_compute", "kv_transfer",
                                          "first_decode_step"}


def test_a_short_prompt_is_traced_as_prefilled_on_its_decode_worker(traced_cluster):
    cluster, collector = traced_cluster
    response = _post(cluster, [5, 6, 7])
    trace_id = response.headers["traceparent"].split("-")[1]
    spans = _spans_by_name(collector, trace_id, {"pdserve.request", "pdserve.prefill.local", "pdserve.decode"})
    assert "pdserve.kv.transfer" not in spans and len(spans["pdserve.request"].parent_span_id) == 0
    assert _access_line(cluster, response.headers["x-pdserve-request-id"])["route"] == "local"


def test_start_up_shows_progress_and_ends_with_a_summary(traced_cluster):
    cluster, _ = traced_cluster
    text = "".join(cluster.lines)
    assert "starting 1 prefill + 1 decode worker(s)" in text
    assert "[1 of 2]" in text and "[2 of 2]" in text
    assert "loading " in text and "loaded " in text  # each worker's model load, begun and done
    ready = next(i for i, line in enumerate(cluster.lines) if line.startswith("pdserve: serving"))
    summary = [line.strip() for line in cluster.lines[ready + 1:ready + 4]]
    assert summary[0].startswith("prefill prefill-0: pid ") and "KV " in summary[0] and " tokens" in summary[0]
    assert summary[1].startswith("decode decode-0: pid ")
    assert summary[2].startswith("KV link prefill-0 -> decode-0: ") and not summary[2].endswith("down")
