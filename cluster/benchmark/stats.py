"""What a serving benchmark run measured: each request as the client saw it
(`RequestRecord`), the run's latency statistics, throughputs and goodput (`RunMetrics`),
and the per-request records of --result-json.

Pure arithmetic on given times (the definitions are `vllm bench serve`'s, spelled out in
the package's docstring): no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are time.perf_counter() seconds; `due` is
    its scheduled offset from the start of the run."""

    prompt_len: int
    max_tokens: int
    due: float = 0.0
    sent: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with tokens
    finished: float = 0.0
    usage_tokens: int | None = None  # completion_tokens of the final usage
    server_prompt_tokens: int | None = None  # prompt_tokens of the final usage
    cached_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def output_tokens(self) -> int:
        """From usage; the number of token chunks if the server sent none."""
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def e2el(self) -> float:
        return self.finished - self.sent

    @property
    def itls(self) -> list[float]:
        return np.diff(self.chunk_times).tolist()

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        return (self.e2el - self.ttft) / (n - 1) if n > 1 else None


class Stats(NamedTuple):
    """Milliseconds; None when there was nothing to measure."""

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


def describe(seconds: Sequence[float]) -> Stats:
    if len(seconds) == 0:
        return Stats(None, None, None, None)
    ms = np.asarray(seconds, dtype=float) * 1000
    return Stats(float(ms.mean()), *(float(np.percentile(ms, q)) for q in (50, 90, 99)))


class Slo(NamedTuple):
    """Service-level objectives in milliseconds; None leaves a metric unconstrained."""

    ttft_ms: float | None
    tpot_ms: float | None
    e2el_ms: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        measured = (record.ttft, record.tpot or 0.0, record.e2el)
        return all(limit is None or 1000 * value <= limit for limit, value in zip(self, measured))

    def __str__(self) -> str:
        parts = [f"{name} <= {limit:g} ms" for name, limit in zip(("TTFT", "TPOT", "E2E"), self)
                 if limit is not None]
        return ", ".join(parts) or "no SLO"


@dataclass(frozen=True)
class RunMetrics:
    completed: int
    failed: int
    length_mismatches: int  # completed requests whose output length is not max_tokens
    duration_s: float
    input_tokens: int
    output_tokens: int
    good: int  # completed requests that met every SLO
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2el: Stats

    @property
    def request_throughput(self) -> float:
        return self.completed / self.duration_s

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration_s

    @property
    def total_token_throughput(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.duration_s

    @property
    def goodput(self) -> float:
        return self.good / self.duration_s

    def to_json(self) -> dict:
        """Counts, throughputs (per second) and latency statistics (`*_ms`: mean, p50, p90, p99)."""
        out = {}
        for name, value in asdict(self).items():
            if isinstance(value, Stats):
                out[f"{name}_ms"] = value._asdict()
            else:
                out[name] = value
        derived = ("request_throughput", "output_throughput", "total_token_throughput", "goodput")
        return {**out, **{name: getattr(self, name) for name in derived}}


def compute_metrics(records: Sequence[RequestRecord], duration_s: float, slo: Slo) -> RunMetrics:
    done = [r for r in records if r.ok]
    return RunMetrics(
        completed=len(done), failed=len(records) - len(done),
        length_mismatches=sum(r.output_tokens != r.max_tokens for r in done),
        duration_s=duration_s,
        input_tokens=sum(r.prompt_len for r in done), output_tokens=sum(r.output_tokens for r in done),
        good=sum(slo.met_by(r) for r in done),
        ttft=describe([r.ttft for r in done]),
        tpot=describe([r.tpot for r in done if r.tpot is not None]),
        itl=describe([gap for r in done for gap in r.itls]),
        e2el=describe([r.e2el for r in done]),
    )


def record_json(record: RequestRecord, started: float) -> dict:
    out = {"prompt_len": record.prompt_len, "max_tokens": record.max_tokens, "due_s": record.due,
           "output_tokens": record.output_tokens, "server_prompt_tokens": record.server_prompt_tokens,
           "cached_tokens": record.cached_tokens,
           "success": record.ok, "error": record.error}
    if record.ok:
        out.update(sent_s=record.sent - started, ttft_ms=1000 * record.ttft, e2el_ms=1000 * record.e2el,
                   tpot_ms=None if record.tpot is None else 1000 * record.tpot,
                   itl_ms=[1000 * gap for gap in record.itls])
    return out
