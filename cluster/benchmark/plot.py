"""--plot: one PNG of a serving benchmark result, drawn from its JSON form (the per-request
records), so that a saved result can be drawn again later.

Six panels, one line or bar per measured server: the distributions (CDFs) of TTFT, TPOT,
ITL and E2E latency, each request's TTFT against when it was sent (queueing shows as a
rising TTFT), and request throughput beside goodput. matplotlib is optional (the `bench`
extra): `require_matplotlib` says how to install it before anything is measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pdserve.cluster.benchmark.report import fresh_path
from pdserve.cluster.benchmark.workload import BenchError

# (panel title, the per-request record's field); ITL records hold a list per request
LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E latency", "e2el_ms"))


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise BenchError("--plot needs matplotlib, which is not installed: pip install 'pdserve[bench]' "
                         "(or leave --plot out)") from exc


def latencies(run: dict, field: str) -> np.ndarray:
    """Every value of `field` over the run's successful requests, in ms (ITL gaps pooled)."""
    values = []
    for request in run["requests"]:
        value = request.get(field) if request["success"] else None
        if isinstance(value, list):
            values.extend(value)
        elif value is not None:
            values.append(value)
    return np.sort(np.asarray(values, dtype=float))


def draw_cdf(ax, result: dict, title: str, field: str) -> None:
    for run in result["runs"]:
        values = latencies(run, field)
        if len(values):
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=run["label"])
    ax.set(title=f"{title} (CDF)", xlabel="ms", ylabel="share of requests" if field != "itl_ms" else "share of gaps",
           ylim=(0, 1.02))
    ax.grid(alpha=0.3)


def draw_ttft_over_time(ax, result: dict) -> None:
    for run in result["runs"]:
        done = [r for r in run["requests"] if r["success"]]
        ax.scatter([r["sent_s"] for r in done], [r["ttft_ms"] for r in done], s=8, label=run["label"])
    ax.set(title="TTFT by send time", xlabel="s since the first request was due", ylabel="ms")
    ax.grid(alpha=0.3)


def draw_throughput(ax, result: dict) -> None:
    labels = [run["label"] for run in result["runs"]]
    x = np.arange(len(labels))
    # Colours apart from the servers' (the other panels): here a colour is a measure.
    bars = ((-0.2, "request_throughput", "requests", "0.6"), (0.2, "goodput", "goodput (met SLOs)", "tab:green"))
    for offset, key, name, colour in bars:
        values = [run["metrics"][key] for run in result["runs"]]
        ax.bar(x + offset, values, width=0.4, label=name, color=colour)
    ax.set_xticks(x, labels)
    ax.set(title="throughput", ylabel="req/s")
    ax.legend(fontsize="small", loc="lower right")


def plot_result(result: dict, path: Path) -> Path:
    """Draw `result` (as `run_all` returns it) into a PNG at a fresh path near `path`
    (an existing file is never overwritten) and return where it went."""
    require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    if not result.get("runs"):
        raise BenchError("--plot draws the runs of a load test; this result has none")
    figure = Figure(figsize=(15, 8.5), layout="constrained")
    axes = figure.subplots(2, 3).flatten()
    for ax, (title, field) in zip(axes, LATENCIES):
        draw_cdf(ax, result, title, field)
    draw_ttft_over_time(axes[4], result)
    draw_throughput(axes[5], result)
    axes[0].legend(fontsize="small")
    workload = result.get("workload", {})
    figure.suptitle(f"{workload.get('name', 'serving benchmark')}: {workload.get('requests', '?')} requests")
    path.parent.mkdir(parents=True, exist_ok=True)
    target = fresh_path(path)
    figure.savefig(target, format="png", dpi=100)
    return target
