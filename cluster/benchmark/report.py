"""What a serving benchmark run prints and saves: one run's table, the A/B table of two
pdserve configurations (--compare), and the JSON result file, which never replaces an
existing one.

Formatting only: the numbers come from stats.py; the pdserve/peer table is in
peer.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from pdserve.cluster.benchmark.stats import RunMetrics, Slo


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b; infinite for a positive a over 0, None when either is missing or both are 0."""
    if a is None or b is None or a == b == 0:
        return None
    return math.inf if b == 0 else a / b


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def print_run(label: str, m: RunMetrics, slo: Slo) -> None:
    print(f"{'=' * 22} {label} {'=' * 22}")
    rows = [("successful / failed requests", f"{m.completed} / {m.failed}"),
            ("duration (s)", f"{m.duration_s:.2f}"),
            ("input / output tokens", f"{m.input_tokens} / {m.output_tokens}"),
            ("request throughput (req/s)", f"{m.request_throughput:.2f}"),
            ("output token throughput (tok/s)", f"{m.output_throughput:.1f}"),
            ("total token throughput (tok/s)", f"{m.total_token_throughput:.1f}"),
            (f"goodput (req/s) [{slo}]", f"{m.goodput:.2f} ({m.good}/{m.completed} met)")]
    if m.length_mismatches:
        rows.append(("output length != max_tokens", str(m.length_mismatches)))
    for name, value in rows:
        print(f"{name:<52} {value}")
    print(f"{'(ms)':<8}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, stats in (("TTFT", m.ttft), ("TPOT", m.tpot), ("ITL", m.itl), ("E2E", m.e2el)):
        print(f"{name:<8}" + "".join(f"{fmt(v):>10}" for v in stats))


def comparison(labels: Sequence[str], a: RunMetrics, b: RunMetrics, itl_target: float,
               goodput_target: float) -> list[dict]:
    """The A/B ratios of interest; p99 ITL (at most `itl_target`) and goodput (at least
    `goodput_target`) carry targets."""
    rows = [("TTFT p50", a.ttft.p50, b.ttft.p50, None), ("TTFT p99", a.ttft.p99, b.ttft.p99, None),
            ("TPOT p50", a.tpot.p50, b.tpot.p50, None), ("TPOT p99", a.tpot.p99, b.tpot.p99, None),
            ("p99 ITL", a.itl.p99, b.itl.p99, ("<=", itl_target)),
            ("goodput", a.goodput, b.goodput, (">=", goodput_target))]
    out = []
    for name, va, vb, goal in rows:
        r = ratio(va, vb)
        met = None if goal is None or r is None else (r <= goal[1] if goal[0] == "<=" else r >= goal[1])
        out.append({"metric": name, "a": va, "b": vb, "ratio": r,
                    "target": None if goal is None else f"{goal[0]} {goal[1]:g}x", "met": met})
    return out


def print_comparison(labels: Sequence[str], rows: list[dict]) -> None:
    a, b = labels
    print(f"{'=' * 22} {a} vs {b} {'=' * 22}")
    print(f"{'':<20}{a:>14}{b:>14}{a + '/' + b:>22}")
    for row in rows:
        unit = "req/s" if row["metric"] == "goodput" else "ms"
        print(f"{row['metric'] + ' (' + unit + ')':<20}{fmt(row['a'], '.2f'):>14}{fmt(row['b'], '.2f'):>14}"
              f"{fmt_ratio(row['ratio']):>22}")
    for row in rows:
        if row["target"] is not None:
            verdict = "n/a" if row["met"] is None else "met" if row["met"] else "MISSED"
            print(f"{row['metric']} {a}/{b} = {fmt_ratio(row['ratio'])} (target {row['target']}: {verdict})")


def json_safe(value: object) -> object:
    """`value` with infinite and NaN floats as strings: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def fresh_path(path: Path) -> Path:
    """`path` if nothing is there yet, else the first free NAME-2.EXT, NAME-3.EXT, ..."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def write_result(path: Path, result: dict) -> Path:
    """Write `result` as strict JSON to a fresh path near `path` (creating its folder) and
    return where it went: an earlier result is never overwritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    target = fresh_path(path)
    # "x": should another run claim the name between the check and the write, fail loudly.
    with target.open("x") as f:
        f.write(json.dumps(json_safe(result), indent=1, allow_nan=False))
    return target
