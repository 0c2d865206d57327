"""OpenTelemetry traces of requests: one trace per request, built by the gateway.

    open(record, traceparent)   the request's span starts at arrival, a child of the
                                client's W3C `traceparent` when it sent one; the record
                                gets this span's own traceparent (workers and response
                                headers carry it)
    close(record)               the child spans, from what the record holds, then the
                                request's span ends

The tree of a request prefilled on a prefill worker:

    pdserve.request                 request id, api, tokens, route, finish reason
      pdserve.route                 arrival .. route chosen: decode and prefill worker, cached tokens
      pdserve.prefill.queue         job sent .. its first chunk computes      (prefill worker's clock)
      pdserve.prefill.compute       .. its last chunk computed, first token sampled
      pdserve.kv.transfer           first chunk .. decode accepted all KV: transport, pages, bytes,
                                    delta_only (only the tokens the decode worker lacked), outcome
      pdserve.decode.first_step     .. the first token reached the gateway
      pdserve.decode                first token .. finish: tokens, steps, tokens per step (speculation)

Prefilled on its decode worker instead (short prompt, or a fallback), `pdserve.prefill.local`
(route chosen .. first token) replaces the prefill and transfer spans; each fallback is a
`pdserve.fallback` span (its reason) and each migration a `pdserve.migration` span (lost ..
rerouted). Spans are built when the request ends, from durations measured where the work
ran (PrefillReport) placed on the gateway's clock: one exporter, in the gateway, sees the
whole tree even when a worker died under the request.

Without a tracer provider (no --otlp-endpoint) nothing is built or exported; a client's
traceparent is still kept on the record, so the access log carries its trace id.
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pdserve.cluster.gateway.request_record import RequestRecord
from pdserve.version import __version__

_PROPAGATOR = TraceContextTextMapPropagator()


def otlp_tracer_provider(endpoint: str, service_name: str = "pdserve") -> TracerProvider:
    """A provider exporting in batches over OTLP/gRPC to `endpoint` (host:port or a URL)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    insecure = not endpoint.startswith("https://")
    provider = TracerProvider(resource=Resource.create({"service.name": service_name,
                                                        "service.version": __version__}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure)))
    return provider


class RequestTracer:
    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("pdserve.gateway", __version__) if provider is not None else None
        self._open: dict[str, Span] = {}  # request id -> its request span, until close

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def open(self, record: RequestRecord, traceparent: str | None) -> None:
        if self._tracer is None:
            record.traceparent = _valid_traceparent(traceparent)
            return
        parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
        span = self._tracer.start_span("pdserve.request", context=parent, kind=trace.SpanKind.SERVER,
                                       start_time=_ns(record.arrived_at),
                                       attributes={"pdserve.request_id": record.request_id,
                                                   "pdserve.api": record.api,
                                                   "gen_ai.usage.input_tokens": record.num_prompt_tokens})
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        record.traceparent = carrier.get("traceparent", "")
        self._open[record.request_id] = span

    def close(self, record: RequestRecord) -> None:
        span = self._open.pop(record.request_id, None)
        if span is None:
            return
        context = trace.set_span_in_context(span)
        for name, start, end, attributes in _child_spans(record):
            child = self._tracer.start_span(name, context=context, start_time=_ns(start), attributes=attributes)
            if attributes.get("pdserve.kv.outcome") == "failed":
                child.set_status(Status(StatusCode.ERROR, str(attributes.get("pdserve.kv.reason", ""))))
            child.end(end_time=_ns(max(start, end)))
        span.set_attributes({key: value for key, value in _request_attributes(record).items() if value is not None})
        if record.error:
            span.set_status(Status(StatusCode.ERROR, record.error))
        span.end(end_time=_ns(record.finished_at if record.finished_at is not None else time.monotonic()))

    def shutdown(self) -> None:
        """Export what is pending and stop (at the gateway's shutdown)."""
        if self.provider is not None:
            self.provider.shutdown()


def _child_spans(record: RequestRecord) -> list[tuple[str, float, float, dict]]:
    end = record.finished_at if record.finished_at is not None else time.monotonic()
    first = record.first_token_at
    spans = []
    if record.routed_at is not None:
        first_route = record.migrations[0].at if record.migrations else record.routed_at
        spans.append(("pdserve.route", record.arrived_at, min(first_route, record.routed_at),
                      {"pdserve.route": record.route, "pdserve.decode_worker": record.decode_worker,
                       "pdserve.prefill_worker": record.prefill_worker,
                       "pdserve.cached_tokens": record.num_cached_tokens}))
    report, sent = record.prefill, record.prefill_sent_at
    if report is not None and sent is not None:
        queued = sent + report.queue_seconds
        computed = queued + report.compute_seconds
        accepted = computed + report.transfer_tail_seconds
        worker = {"pdserve.worker": report.worker}
        spans.append(("pdserve.prefill.queue", sent, queued, worker))
        spans.append(("pdserve.prefill.compute", queued, computed, worker))
        spans.append(("pdserve.kv.transfer", queued, accepted, {
            "pdserve.kv.transport": report.transport, "pdserve.kv.pages": report.kv_pages,
            "pdserve.kv.bytes": report.kv_bytes, "pdserve.kv.delta_only": record.num_cached_tokens > 0,
            "pdserve.kv.outcome": "ok" if report.ok else "failed", "pdserve.kv.reason": report.reason,
            "pdserve.kv.tail_seconds": report.transfer_tail_seconds}))
        if report.ok and first is not None and first >= accepted:
            spans.append(("pdserve.decode.first_step", accepted, first, {"pdserve.worker": record.decode_worker}))
    elif record.routed_at is not None and first is not None and first >= record.routed_at:
        spans.append(("pdserve.prefill.local", record.routed_at, first,
                      {"pdserve.worker": record.decode_worker, "pdserve.route": record.route}))
    for fallback in record.fallbacks:
        spans.append(("pdserve.fallback", fallback.at, fallback.at, {"pdserve.reason": fallback.reason}))
    for migration in record.migrations:
        spans.append(("pdserve.migration", migration.at, migration.rerouted_at or migration.at, {
            "pdserve.from_worker": migration.from_worker, "pdserve.reason": migration.reason,
            "pdserve.tokens_sent": migration.tokens_sent}))
    if first is not None:
        steps = max(1, record.decode_steps)
        spans.append(("pdserve.decode", first, end, {
            "pdserve.worker": record.decode_worker, "pdserve.tokens": record.num_output_tokens,
            "pdserve.decode.steps": record.decode_steps,
            "pdserve.speculative.tokens_per_step": record.num_output_tokens / steps}))
    return spans


def _request_attributes(record: RequestRecord) -> dict:
    return {"pdserve.route": record.route, "pdserve.decode_worker": record.decode_worker or None,
            "pdserve.prefill_worker": record.prefill_worker or None,
            "pdserve.cached_tokens": record.num_cached_tokens,
            "gen_ai.usage.output_tokens": record.num_output_tokens,
            "pdserve.finish_reason": record.finish_reason or None, "pdserve.error": record.error or None,
            "pdserve.fallbacks": len(record.fallbacks), "pdserve.migrations": len(record.migrations),
            "pdserve.ttft_seconds": record.ttft, "pdserve.tpot_seconds": record.tpot}


# Unix-epoch nanoseconds at time.monotonic() == 0, read once: every span time converts
# with the same offset, so spans measured back to back stay back to back.
_EPOCH_AT_MONOTONIC_ZERO_NS = time.time_ns() - time.monotonic_ns()


def _ns(monotonic_seconds: float) -> int:
    """A `time.monotonic()` reading of this process as Unix-epoch nanoseconds."""
    return _EPOCH_AT_MONOTONIC_ZERO_NS + round(monotonic_seconds * 1e9)


def _valid_traceparent(traceparent: str | None) -> str:
    """The client's traceparent when it parses as W3C trace context, else ""."""
    if not traceparent:
        return ""
    context = trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()
    return traceparent if context.is_valid else ""
