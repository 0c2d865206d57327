"""What happened to one request, told once it ends: the access log line, the `x-pdserve-*`
response headers (gRPC: trailing metadata) and the trace's spans all read one
`RequestRecord`.

Writers, in order (one-way, all on the gateway's event loop):

    OutputStream    opens it (request id, prompt tokens, arrival) and closes it
                    (first token, output tokens, finish reason or error)
    the backend     the route (prefill and decode worker, or local), the prefill worker's
                    report (queue, compute, transfer tail; KV pages, bytes, transport),
                    fallbacks and migrations, as they happen

Times are `time.monotonic()` seconds of this process; durations measured on a worker (the
prefill queue, compute and transfer tail) are placed on this clock where the gateway sent
the prefill job (`prefill_sent_at`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

ACCESS_LOGGER = "pdserve.access"
LOG_FORMATS = ("plain", "json")
HEADER_PREFIX = "x-pdserve-"

# How a request was prefilled: by a prefill worker, by its decode worker (short prompt or a
# full prefill tier), by its decode worker because the pair's KV link was down, or from its
# group leader's pages (n > 1).
ROUTES = ("remote", "local", "unlinked", "group")


@dataclass
class PrefillReport:
    """The prefill worker's account of a job (from `PrefillResult`)."""

    worker: str
    queue_seconds: float
    compute_seconds: float
    transfer_tail_seconds: float  # last chunk computed .. decode accepted all KV
    kv_pages: int
    kv_bytes: int
    transport: str  # the KV link's scheme: tcp, shm, grpc, nixl, nccl, gloo
    ok: bool
    reason: str = ""


@dataclass
class Fallback:
    at: float
    reason: str


@dataclass
class Migration:
    at: float  # when the decode worker was lost
    from_worker: str
    reason: str
    tokens_sent: int  # output tokens the client had when it moved
    rerouted_at: float | None = None  # when its next route was chosen


@dataclass
class RequestRecord:
    request_id: str
    num_prompt_tokens: int
    arrived_at: float = field(default_factory=time.monotonic)
    api: str = ""  # completions, chat, grpc
    traceparent: str = ""  # W3C trace context of this request's span ("" when not traced)
    # The backend's account (the latest route; a migrated request's first route is in `migrations`).
    route: str = ""
    routed_at: float | None = None
    decode_worker: str = ""
    prefill_worker: str = ""
    prefill_sent_at: float | None = None
    prefill: PrefillReport | None = None
    num_cached_tokens: int = 0
    fallbacks: list[Fallback] = field(default_factory=list)  # why a planned remote prefill did not happen
    migrations: list[Migration] = field(default_factory=list)
    # The stream's account.
    first_token_at: float | None = None
    decode_steps: int = 0  # deltas that carried tokens (a speculative step may carry several)
    num_output_tokens: int = 0
    finished_at: float | None = None
    finish_reason: str = ""  # stop, length, abort; or the error kind's name
    error: str = ""

    # ------------------------------------------------------------ backend writes

    def routed(self, path: str, decode_worker: str, prefill_worker: str | None) -> None:
        self.route, self.decode_worker, self.prefill_worker = path, decode_worker, prefill_worker or ""
        self.routed_at = time.monotonic()
        self.prefill_sent_at = None
        self.prefill = None
        if self.migrations and self.migrations[-1].rerouted_at is None:
            self.migrations[-1].rerouted_at = self.routed_at

    def fell_back(self, reason: str) -> None:
        self.fallbacks.append(Fallback(time.monotonic(), reason))

    def migrated(self, from_worker: str, reason: str, tokens_sent: int) -> None:
        self.migrations.append(Migration(time.monotonic(), from_worker, reason, tokens_sent))

    # ------------------------------------------------------------ derived

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrived_at

    @property
    def tpot(self) -> float | None:
        if self.first_token_at is None or self.finished_at is None or self.num_output_tokens < 2:
            return None
        return (self.finished_at - self.first_token_at) / (self.num_output_tokens - 1)

    @property
    def e2e(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.arrived_at

    def ttft_split(self) -> dict[str, float] | None:
        """Where a remotely prefilled request's time to first token went (the stages of
        `pdserve_request_ttft_split_seconds`, plus routing: arrival .. the job was sent)."""
        report, first = self.prefill, self.first_token_at
        if report is None or first is None or self.prefill_sent_at is None or self.migrations:
            return None
        split = {"routing": self.prefill_sent_at - self.arrived_at, "prefill_queue": report.queue_seconds,
                 "prefill_compute": report.compute_seconds, "kv_transfer": report.transfer_tail_seconds}
        split["first_decode_step"] = max(0.0, first - self.arrived_at - sum(split.values()))
        return split

    def summary(self) -> dict:
        """The record as flat JSON-ready fields (None: not applicable or not known)."""
        report = self.prefill
        return {
            "request_id": self.request_id, "api": self.api or None,
            "trace_id": self.traceparent.split("-")[1] if self.traceparent else None,
            "route": self.route or None, "prefill_worker": self.prefill_worker or None,
            "decode_worker": self.decode_worker or None,
            "prompt_tokens": self.num_prompt_tokens, "cached_tokens": self.num_cached_tokens,
            "output_tokens": self.num_output_tokens,
            "kv_pages": report.kv_pages if report else None, "kv_bytes": report.kv_bytes if report else None,
            "kv_transport": report.transport if report else None,
            "kv_transfer_ms": _ms(report.transfer_tail_seconds) if report else None,
            "fallbacks": [f.reason for f in self.fallbacks], "migrations": len(self.migrations),
            "ttft_ms": _ms(self.ttft), "ttft_split_ms": _split_ms(self.ttft_split()),
            "tpot_ms": _ms(self.tpot), "e2e_ms": _ms(self.e2e),
            "finish_reason": self.finish_reason or None, "error": self.error or None,
        }

    def headers(self) -> dict[str, str]:
        """`x-pdserve-*` response headers: the summary's known fields, as text."""
        headers = {}
        for name, value in self.summary().items():
            if value is None or value == [] or name == "trace_id":
                continue
            if isinstance(value, dict):
                value = ";".join(f"{stage}={ms}" for stage, ms in value.items())
            elif isinstance(value, list):
                value = "; ".join(value)
            headers[HEADER_PREFIX + name.replace("_", "-")] = _header_text(str(value))
        return headers

    def log_line(self, log_format: str) -> str:
        summary = self.summary()
        if log_format == "json":
            return json.dumps(summary, separators=(",", ":"))
        parts = []
        for name, value in summary.items():
            if value is None or value == []:
                continue
            if isinstance(value, dict):
                value = ",".join(f"{stage}:{ms}" for stage, ms in value.items())
            elif isinstance(value, list):
                value = json.dumps(value)
            parts.append(f"{name}={value}")
        return " ".join(parts)


def log_request(record: RequestRecord, log_format: str) -> None:
    logging.getLogger(ACCESS_LOGGER).info(record.log_line(log_format))


def configure_access_log(log_format: str, stream=None) -> None:
    """Access lines on their own handler (stderr unless `stream`), as they are: one JSON
    object per line for `json` (what log shippers parse), a timestamp and key=value pairs
    for `plain`. They do not also go through the root logger's format."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s" if log_format == "json"
                                           else "%(asctime)s pdserve.access: %(message)s"))
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _split_ms(split: dict[str, float] | None) -> dict[str, float] | None:
    return None if split is None else {stage: _ms(seconds) for stage, seconds in split.items()}


def _header_text(value: str) -> str:
    """A header value HTTP/1.1 and gRPC metadata both carry: printable ASCII, no newlines."""
    return "".join(c if " " <= c <= "~" else "?" for c in value)[:512]
