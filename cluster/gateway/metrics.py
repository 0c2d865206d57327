"""Prometheus metrics of the gateway: per request (observed here) and per worker (the
latest `WorkerStats` each worker reported to the controller, exported as they are).

One registry per gateway, so that everything a cluster measures is one scrape target
(`/metrics`). The router and the autoscaler read the same `WorkerStats` snapshots.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pdserve.cluster.gateway.errors import ErrorKind
from pdserve.cluster.workers.stats import WorkerStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
RECENT_SECONDS = 600.0  # how far back `recent_latencies` can look (the SLO planner's window)


class RecentLatencies(NamedTuple):
    """`GatewayMetrics.recent_latencies`: the means (None: nothing measured) and counts."""

    ttft: float | None
    tpot: float | None
    ttft_requests: int = 0
    tpot_requests: int = 0
TTFT_STAGES = ("prefill_queue", "prefill_compute", "kv_transfer", "first_decode_step")


class ControlPlaneStatus(NamedTuple):
    """What the controller reports about itself (counters grow over the gateway's life)."""

    errors: int  # monitor-loop failures survived
    kv_links: dict[str, int]  # state -> (prefill, decode) pairs in it
    prefix_resyncs: int  # worker cache indexes reloaded after lost events
    workers_replaced: int


_NO_CONTROLLER = ControlPlaneStatus(0, {}, 0, 0)


class GatewayMetrics:
    def __init__(self, worker_stats: Callable[[], Iterable[WorkerStats]] = tuple,
                 worker_counts: Callable[[], dict[tuple[str, str], int]] = dict,
                 control_status: Callable[[], ControlPlaneStatus] = lambda: _NO_CONTROLLER) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.errors = Counter("pdserve_request_errors", "Requests refused or failed, by error kind "
                              "(overloaded requests are the rejections)", ["kind"], registry=r)
        self.finishes = Counter("pdserve_requests_finished", "Requests that finished, by finish reason",
                                ["finish_reason"], registry=r)
        self.e2e = Histogram("pdserve_request_e2e_seconds", "End-to-end request latency at the gateway",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("pdserve_request_ttft_seconds", "Time to first token at the gateway",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft_split = Histogram("pdserve_request_ttft_split_seconds", "Time to first token of "
                                    "disaggregated requests, split by stage", ["stage"],
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pdserve_request_tpot_seconds", "Time per output token after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.output_tokens = Counter("pdserve_output_tokens", "Output tokens streamed", registry=r)
        self.routes = Counter("pdserve_routes", "Routing decisions, by decode worker and prefill path "
                              "(remote: a prefill worker; local: the decode worker prefills; unlinked: "
                              "the decode worker prefills because the chosen pair's KV link is down; group: a sequence "
                              "of an n > 1 request, sent to its leader's decode worker to share its prompt KV)",
                              ["decode_worker", "prefill"], registry=r)
        self.migrations = Counter("pdserve_request_migrations", "Requests moved to another decode worker after "
                                  "theirs was lost, by why it was lost", ["reason"], registry=r)
        self.migration_seconds = Histogram("pdserve_request_migration_seconds", "From losing a request's decode "
                                           "worker to its next token from the new one", buckets=_LATENCY_BUCKETS,
                                           registry=r)
        self.scaling = Counter("pdserve_autoscaler_decisions", "Autoscaler decisions, by role and direction "
                               "(the reason of each is logged)", ["role", "direction"], registry=r)
        self.planner_predicted = Gauge("pdserve_planner_predicted_seconds", "The SLO planner's latest "
                                       "prediction at the serving worker counts (NaN: none)", ["slo"], registry=r)
        self.planner_error = Gauge("pdserve_planner_prediction_error", "The SLO planner's mean prediction over "
                                   "its window against the mean measured at the gateway for requests that "
                                   "finished in it: predicted / observed - 1 (NaN: nothing to compare)",
                                   ["slo"], registry=r)
        self.shed_requests = Counter("pdserve_requests_shed", "Requests refused with 429 because their predicted "
                                     "TTFT exceeded the target (--shed-on-slo)", registry=r)
        # (finish time, ttft, tpot) of the requests that finished in the last RECENT_SECONDS
        self._recent: deque[tuple[float, float | None, float | None]] = deque()
        r.register(_WorkerCollector(worker_stats))
        r.register(_CountCollector(worker_counts))
        r.register(_ControlCollector(control_status))

    def error(self, kind: ErrorKind) -> None:
        self.errors.labels(kind.name.lower()).inc()

    def finished(self, finish_reason: str, e2e: float, ttft: float | None, tpot: float | None,
                 num_tokens: int) -> None:
        self.finishes.labels(finish_reason).inc()
        self.e2e.observe(e2e)
        self.output_tokens.inc(num_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        now = time.monotonic()
        self._recent.append((now, ttft, tpot))
        while self._recent[0][0] < now - RECENT_SECONDS:
            self._recent.popleft()

    def recent_latencies(self, since: float) -> RecentLatencies:
        """Mean TTFT and mean TPOT of the requests that finished since `since` (monotonic
        time, at most RECENT_SECONDS ago), None where none measured it, and how many
        measured each."""
        sums, counts = [0.0, 0.0], [0, 0]
        for finished, *latencies in reversed(self._recent):  # newest first: stop at `since`
            if finished < since:
                break
            for column, value in enumerate(latencies):
                if value is not None:
                    sums[column] += value
                    counts[column] += 1
        ttft, tpot = (total / n if n else None for total, n in zip(sums, counts))
        return RecentLatencies(ttft, tpot, *counts)

    def planned(self, ttft: float | None, tpot: float | None, errors: dict[str, float | None]) -> None:
        """The SLO planner's latest predictions and their errors (`SLOPlanner.prediction_error`)."""
        for slo, predicted in (("ttft", ttft), ("tpot", tpot)):
            self.planner_predicted.labels(slo).set(math.nan if predicted is None else predicted)
            error = errors.get(slo)
            self.planner_error.labels(slo).set(math.nan if error is None else error)

    def shed(self) -> None:
        self.shed_requests.inc()

    def observe_ttft_split(self, stages: dict[str, float]) -> None:
        for stage, seconds in stages.items():
            self.ttft_split.labels(stage).observe(max(0.0, seconds))

    def track_in_flight(self, in_flight: Callable[[], int]) -> None:
        """Export the gateway's requests in flight (admitted, not yet ended), read at scrape time."""
        Gauge("pdserve_requests_in_flight", "Requests admitted at the gateway and not yet ended",
              registry=self.registry).set_function(in_flight)

    def migrated(self, reason: str) -> None:
        self.migrations.labels(reason).inc()

    def migration_took(self, seconds: float) -> None:
        self.migration_seconds.observe(seconds)

    def scaled(self, decision) -> None:
        """An `autoscaler.Decision` was made."""
        self.scaling.labels(decision.role, decision.direction).inc()

    def routed(self, decode_worker: str, path: str) -> None:
        """`path`: remote, local, unlinked or group (see the metric's help)."""
        self.routes.labels(decode_worker, path).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


# (metric suffix, WorkerStats field, help, is_counter)
_WORKER_FIELDS = (
    ("queue_requests", "num_waiting", "Requests queued on the worker", False),
    ("queue_tokens", "num_waiting_tokens", "Prompt tokens queued on the worker", False),
    ("running_requests", "num_running", "Requests in the worker's running batch", False),
    ("waiting_for_kv_requests", "num_waiting_for_kv", "Decode requests waiting for their KV", False),
    ("kv_usage", "kv_usage", "Fraction of the KV pool in use by requests", False),
    ("prefix_hit_tokens", "prefix_hit_tokens", "Prompt tokens served from the prefix cache", True),
    ("prefix_query_tokens", "prefix_query_tokens", "Prompt tokens looked up in the prefix cache", True),
    ("transfer_bytes", "transfer_bytes", "KV bytes sent (prefill) or received (decode)", True),
    ("transfer_seconds", "transfer_seconds",
     "Prefill: seconds spent sending KV; decode: seconds from a transfer's first page received to its settling",
     True),
    ("kv_wait_seconds", "kv_wait_seconds",
     ("Decode: seconds remote requests waited for their KV, ticket issued to transfer settled (prefill queue "
      "and compute included)"), True),
    ("steps", "num_steps", "Engine steps run", True),
    ("kv_tickets_live", "kv_tickets_live", "KV tickets a decode worker issued and has not settled", False),
    ("draft_kv_blocks", "draft_kv_blocks", "KV blocks a decode worker's draft model holds", False),
    ("engine_heartbeat_age_seconds", "engine_heartbeat_age",
     "Seconds since the worker's engine loop last made progress (a worker past its hang timeout is replaced)",
     False),
    ("engine_errors", "engine_errors",
     "Engine steps and commands that failed (their requests ended with an error; the engine went on)", True),
    ("step_seconds", "step_seconds", "Seconds spent in engine steps", True),
    ("prompt_tokens_computed", "prompt_tokens_computed",
     "Prompt tokens the worker's steps computed (on a decode worker: local prefills, recomputes)", True),
    ("batch_requests_stepped", "batch_requests_stepped",
     "Requests in the worker's steps, summed over steps (over steps_total: the mean batch)", True),
    ("kv_tail_seconds", "kv_tail_seconds",
     ("Prefill: over transfers sent, seconds from the prompt's last step to the decode worker's acceptance "
     "(what layer-by-layer sending did not hide)"), True),
    ("spec_proposed_tokens", "spec_proposed_tokens", "Speculative draft tokens proposed", True),
    ("spec_accepted_tokens", "spec_accepted_tokens", "Speculative draft tokens accepted", True),
    ("spec_verify_steps", "spec_verify_steps",
     "Request-steps that verified a draft (mean accepted length = (accepted + verify steps) / verify steps)",
     True),
)


class _WorkerCollector:
    """Exports the latest snapshot of every worker, labelled by role and worker id."""

    def __init__(self, worker_stats: Callable[[], Iterable[WorkerStats]]) -> None:
        self._worker_stats = worker_stats

    def describe(self):
        return []  # values appear and disappear with workers: collect-time only

    def collect(self):
        snapshots = list(self._worker_stats())
        labels = ["role", "worker"]
        for suffix, field, text, is_counter in _WORKER_FIELDS:
            family = (CounterMetricFamily if is_counter else GaugeMetricFamily)(
                f"pdserve_worker_{suffix}", text, labels=labels)
            for stats in snapshots:
                family.add_metric([stats.role, stats.worker_id], float(getattr(stats, field)))
            yield family
        outcomes = CounterMetricFamily("pdserve_worker_transfer_outcomes", "KV transfers by outcome",
                                       labels=[*labels, "outcome"])
        for stats in snapshots:
            for outcome, count in stats.transfer_outcomes.items():
                outcomes.add_metric([stats.role, stats.worker_id, outcome], float(count))
        yield outcomes
        rejected = CounterMetricFamily("pdserve_kv_rejected_frames", "KV-plane frames and links a decode worker "
                                       "refused (garbage, oversized, unknown tickets, idle, over the limit, ...)",
                                       labels=[*labels, "reason"])
        for stats in snapshots:
            for reason, count in sorted((stats.kv_rejected or {}).items()):
                rejected.add_metric([stats.role, stats.worker_id, reason], float(count))
        yield rejected
        for index, (name, text) in enumerate((
                ("proposed", "Drafts that reached position i (0-based)"),
                ("accepted", "Drafts whose position i was accepted (acceptance rate = accepted / proposed)"))):
            family = CounterMetricFamily(f"pdserve_worker_spec_{name}_at_position", text,
                                         labels=[*labels, "position"])
            for stats in snapshots:
                for position, counts in enumerate(stats.spec_accepted_at):
                    family.add_metric([stats.role, stats.worker_id, str(position)], float(counts[index]))
            yield family


class _CountCollector:
    """Workers per role and state (starting, serving, draining), from the controller."""

    def __init__(self, worker_counts: Callable[[], dict[tuple[str, str], int]]) -> None:
        self._worker_counts = worker_counts

    def describe(self):
        return []

    def collect(self):
        family = GaugeMetricFamily("pdserve_workers", "Workers by role and state", labels=["role", "state"])
        for (role, state), count in sorted(self._worker_counts().items()):
            family.add_metric([role, state], float(count))
        yield family


class _ControlCollector:
    """The controller's own state: its survived errors, KV links by state, index resyncs."""

    def __init__(self, control_status: Callable[[], ControlPlaneStatus]) -> None:
        self._control_status = control_status

    def describe(self):
        return []

    def collect(self):
        status = self._control_status()
        yield CounterMetricFamily("pdserve_controller_errors", "Controller monitor-loop failures (logged; the "
                                  "loop went on)", value=float(status.errors))
        links = GaugeMetricFamily("pdserve_kv_links", "KV links between (prefill, decode) pairs, by state "
                                  "(down: failed, retried with backoff)", labels=["state"])
        for state, count in sorted(status.kv_links.items()):
            links.add_metric([state], float(count))
        yield links
        yield CounterMetricFamily("pdserve_prefix_index_resyncs", "Worker prefix-cache indexes reloaded from a "
                                  "snapshot after lost events", value=float(status.prefix_resyncs))
        yield CounterMetricFamily("pdserve_workers_replaced", "Workers replaced after their process died, they "
                                  "missed health checks, or their engine died or hung",
                                  value=float(status.workers_replaced))
