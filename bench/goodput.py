"""Goodput, DistServe's method: the highest request rate at which at least 90% of requests
meet both latency targets, per serving configuration at equal cores, over a sweep of rates.

Targets relative to the machine, measured at the start of the run on the first
configuration, one request at a time (nothing else running): a request's TTFT target is
k_ttft x the unloaded TTFT at its prompt length (a line a + b * prompt tokens, fitted by
least squares through the unloaded TTFTs of the calibration prompts, which span the
workload's lengths), its TPOT target k_tpot x the median unloaded single-stream TPOT. Both
are printed.

Per workload and configuration: one server (started for it, warmed up, stopped before the
next), then for each rate in the sweep the workload's requests with Poisson arrivals: the
same seeded requests and schedule for every configuration, fresh prompts for each rate and
for the calibration (a repeated prompt would be served from the prefix cache). Attainment at a rate = requests
that met both targets / all sent (a failed or refused request misses). Goodput = the
highest swept rate with attainment >= 90%; `goodput~` interpolates attainment linearly to
90% between it and the next rate. The planner configuration runs `--autoscale slo` with
the measured targets (its prediction targets: the median request's TTFT target) and its
worker counts are sampled from /metrics every second; the vLLM peer
(`../shared/peers/vllm-cpu.sh serve PORT`) gets the same sweep when --peer-url answers.

`--config NAME=FLAGS` adds (or replaces) a configuration; `--targets-from JSON` reuses an
earlier run's targets, so configurations measured in separate runs meet the same ones.

Workloads (token-id prompts to /v1/completions, every request exactly its output length):
    mixed      a fifth ~1,500-token prompts, the rest 64..256, 64 output tokens
    summarize  1,200..1,800-token prompts, 24..40 output tokens (prompt >> output)
    multiturn  4 conversations' 1,024-token shared prefixes, each request its own 64-token
               turn, 64 output tokens (the prefix cache and prefix-aware routing matter)

Output: a table per workload (attainment per rate, goodput, ratios against colocated), a
JSON file, and two plots in bench/results/: attainment vs rate (one line per
configuration, one panel per workload) and the planner's worker counts over time.

    python bench/goodput.py --workloads mixed --rates 0.05 0.1 0.2 0.4
    python bench/goodput.py --peer-url http://127.0.0.1:8100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
from serving import RESULTS_DIR, probe_peer

from pdserve.cluster.benchmark.client import run_load
from pdserve.cluster.benchmark.flavors import FLAVORS, pdserve_extras
from pdserve.cluster.benchmark.launch import default_serve_command, launched_server
from pdserve.cluster.benchmark.report import write_result
from pdserve.cluster.benchmark.stats import RequestRecord
from pdserve.cluster.benchmark.workload import (
    BenchError,
    BenchRequest,
    arrival_offsets,
    mixed_dataset,
    random_dataset,
    shared_prefix_dataset,
    token_warmups,
)
from pdserve.runtime.weights.checkpoint import DEFAULT_MODEL

ATTAINMENT = 0.9  # DistServe's: the share of requests that must meet both targets
VOCAB = 49152  # SmolLM2's; prompts draw ordinary pieces above the special tokens
CALIBRATION_PROMPTS = 8
# Deadline order on every worker (a short prompt overtakes a long one) and prefill steps of
# at most 256 prompt tokens per request: measured on the mixed load, what lets one prefill
# worker meet the short prompts' TTFT without spilling them onto the decode worker.
DEADLINE = "--prompt-deadline-factor 4 --max-prefill-chunk 256"
CONFIGS = {
    "colocated": "--colocated --decode-workers 2",
    "1P+1D": "--prefill-workers 1 --decode-workers 1",
    "1P+1D-deadline": f"--prefill-workers 1 --decode-workers 1 {DEADLINE} --spill-backlog-tokens 1000000000",
    # the planner at the same two cores: a budget of two workers it splits between the
    # roles (1P+1D, or 0P+2D: colocated's shape); it also sets the local-prefill
    # threshold, spilling and the decode batch cap
    "planner": ("--prefill-workers 1 --decode-workers 1 --autoscale slo --min-prefill 0 --max-prefill 1 "
                "--min-decode 1 --max-decode 2 --max-workers 2 --autoscale-window 10 --autoscale-up-cooldown 10 "
                f"--autoscale-down-delay 30 {DEADLINE}"),
}


def workload(name: str, n: int, seed: tuple[int, ...]) -> list[BenchRequest]:
    rng = np.random.default_rng([*seed, 0])
    if name == "mixed":
        return mixed_dataset(rng, VOCAB, n, 0.2, 1500, 64, 256, 64)
    if name == "summarize":
        return random_dataset(rng, VOCAB, n, 1500, 32, 0.2)
    if name == "multiturn":
        return shared_prefix_dataset(rng, VOCAB, n, 1024, 64, 4, 64)
    raise BenchError(f"unknown workload {name!r}")


class Targets:
    """A request's latency targets: TTFT k_ttft (a + b L), TPOT k_tpot tpot0."""

    def __init__(self, a: float, b: float, tpot0: float, k_ttft: float, k_tpot: float) -> None:
        self.a, self.b, self.tpot0, self.k_ttft, self.k_tpot = a, b, tpot0, k_ttft, k_tpot

    def ttft(self, prompt_len: int) -> float:
        return self.k_ttft * (self.a + self.b * prompt_len)

    @property
    def tpot(self) -> float:
        return self.k_tpot * self.tpot0

    def met(self, record: RequestRecord) -> bool:
        if not record.ok or record.output_tokens < record.max_tokens:
            return False
        tpot = record.tpot
        return record.ttft <= self.ttft(record.prompt_len) and (tpot is None or tpot <= self.tpot)

    def misses(self, records: Sequence[RequestRecord]) -> dict[str, int]:
        """Why requests missed: failed (or short of their tokens), over the TTFT target,
        over the TPOT target (a request may be over both)."""
        out = {"failed": 0, "ttft": 0, "tpot": 0}
        for r in records:
            if not r.ok or r.output_tokens < r.max_tokens:
                out["failed"] += 1
                continue
            out["ttft"] += r.ttft > self.ttft(r.prompt_len)
            out["tpot"] += r.tpot is not None and r.tpot > self.tpot
        return out

    def to_json(self) -> dict:
        return {"ttft_a_s": self.a, "ttft_b_s_per_token": self.b, "tpot0_s": self.tpot0,
                "k_ttft": self.k_ttft, "k_tpot": self.k_tpot, "tpot_target_s": self.tpot}


def targets_from(path: Path, workload_name: str) -> Targets:
    """The targets an earlier run measured for the workload (its --result-json)."""
    try:
        t = json.loads(path.read_text())["results"][workload_name]["targets"]
    except (OSError, ValueError, KeyError) as exc:
        raise BenchError(f"--targets-from {path}: no targets for workload {workload_name!r} ({exc})") from exc
    return Targets(t["ttft_a_s"], t["ttft_b_s_per_token"], t["tpot0_s"], t["k_ttft"], t["k_tpot"])


def fit_targets(records: Sequence[RequestRecord], k_ttft: float, k_tpot: float) -> Targets:
    ok = [r for r in records if r.ok]
    if len(ok) < 2:
        raise BenchError(f"calibration: only {len(ok)} of {len(records)} unloaded requests succeeded")
    lengths = np.array([r.prompt_len for r in ok], dtype=float)
    ttfts = np.array([r.ttft for r in ok])
    b, a = np.polyfit(lengths, ttfts, 1) if np.ptp(lengths) > 0 else (0.0, float(ttfts.mean()))
    if a < 0:
        # Long prompts only: attention's quadratic cost bends the line, and its intercept
        # falls below zero. The least-squares line with a >= 0 then goes through the origin.
        a, b = 0.0, float(lengths @ ttfts / (lengths @ lengths))
    tpots = [r.tpot for r in ok if r.tpot is not None]
    return Targets(float(a), max(0.0, float(b)), statistics.median(tpots), k_ttft, k_tpot)


def calibration_set(requests: Sequence[BenchRequest]) -> list[BenchRequest]:
    """Up to CALIBRATION_PROMPTS requests spanning the workload's prompt lengths."""
    ranked = sorted(requests, key=lambda r: r.prompt_len)
    picks = np.linspace(0, len(ranked) - 1, min(CALIBRATION_PROMPTS, len(ranked))).round().astype(int)
    return [ranked[i] for i in sorted(set(picks.tolist()))]


def attainment(records: Sequence[RequestRecord], targets: Targets) -> float:
    return sum(targets.met(r) for r in records) / len(records) if records else 0.0


def goodput(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(highest swept rate with attainment >= ATTAINMENT, that rate interpolated to exactly
    ATTAINMENT towards the next rate); (0, 0) when none meets it. Points: (rate, attainment)."""
    points = sorted(points)
    best, index = 0.0, -1
    for i, (rate, share) in enumerate(points):
        if share >= ATTAINMENT:
            best, index = rate, i
    if index < 0:
        return 0.0, 0.0
    if index + 1 < len(points):
        (r0, s0), (r1, s1) = points[index], points[index + 1]
        if s0 > s1:
            return best, r0 + (r1 - r0) * (s0 - ATTAINMENT) / (s0 - s1)
    return best, best


class WorkerTimeline:
    """Serving workers per role from /metrics, once a second, in a thread."""

    def __init__(self, base_url: str, started: float) -> None:
        self.base_url, self.started = base_url, started
        self.samples: list[tuple[float, int, int]] = []  # (seconds since started, prefill, decode)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                text = httpx.get(f"{self.base_url}/metrics", timeout=5).text
            except httpx.HTTPError:
                continue
            counts = {"prefill": 0, "decode": 0}
            for line in text.splitlines():
                if line.startswith("pdserve_workers{") and 'state="serving"' in line:
                    role = "prefill" if 'role="prefill"' in line else "decode"
                    counts[role] = int(float(line.rsplit(" ", 1)[1]))
            self.samples.append((time.monotonic() - self.started, counts["prefill"], counts["decode"]))


def sweep(args: argparse.Namespace, label: str, base_url: str, requests_at, targets: Targets | None,
          extras, api_key: str | None, timeline: WorkerTimeline | None = None) -> dict:
    """One server over every rate; returns {rate: {...}} and prints a line per rate. With
    several --seeds, each rate runs every seed's requests and schedule in turn and the
    records are pooled (the attainment is over all of them; each seed's is kept beside)."""
    points = {}
    for rate in args.rates:
        records, per_seed = [], []
        for seed in args.seeds:
            requests, offsets = requests_at(rate, seed)
            if timeline is not None:
                timeline.samples.append((time.monotonic() - timeline.started, -1, -1))  # a run starts
            run = asyncio.run(run_load(base_url, requests, offsets, None, api_key, args.request_timeout,
                                       f"{label} @ {rate:g}/s seed {seed}", extras=extras, warmups=token_warmups(2)))
            records += run.records
            per_seed.append(attainment(run.records, targets))
        share = attainment(records, targets)
        failed = sum(not r.ok for r in records)
        ttfts = [r.ttft for r in records if r.ok]
        misses = targets.misses(records)
        spread = f"  seeds {' '.join(f'{s:.0%}' for s in per_seed)}" if len(per_seed) > 1 else ""
        print(f"  {label:10s} rate {rate:6.3g}/s  attainment {share:6.1%}  failed {failed:3d}  "
              f"TTFT p50 {np.median(ttfts) if ttfts else math.nan:7.2f} s  over TTFT {misses['ttft']:3d}  "
              f"over TPOT {misses['tpot']:3d}{spread}", flush=True)
        points[rate] = {"attainment": share, "failed": failed, "requests": len(records), "misses": misses,
                        "attainment_per_seed": per_seed,
                        "ttft_p50_s": float(np.median(ttfts)) if ttfts else None,
                        "tpot_p50_s": float(np.median([t for r in records if r.ok and (t := r.tpot)])) if ttfts
                        else None}
    return points


def run_workload(args: argparse.Namespace, name: str, peer) -> dict:
    # Every rate (and the calibration) its own prompts: a repeated prompt would be served
    # from the prefix cache, and the next rate would look faster than it is.
    base = workload(name, 4 * CALIBRATION_PROMPTS, (args.seed, 0))

    def requests_at(rate: float, run_seed: int) -> tuple[list[BenchRequest], np.ndarray]:
        n = max(args.min_prompts, math.ceil(rate * args.duration))
        seed = (run_seed, 1 + args.rates.index(rate))  # distinct from every other run's and the calibration's
        return workload(name, n, seed), arrival_offsets(n, rate, 1.0, np.random.default_rng([*seed, 1]))

    print(f"\n##### workload {name}: rates {', '.join(f'{r:g}' for r in args.rates)}/s", flush=True)
    result = {"configs": {}, "timeline": []}
    targets = None
    if args.targets_from is not None:
        targets = targets_from(args.targets_from, name)
        print(f"  targets from {args.targets_from}: TTFT {targets.k_ttft:g} x ({targets.a * 1e3:.0f} ms + "
              f"{targets.b * 1e3:.3f} ms/token), TPOT {targets.tpot * 1e3:.0f} ms", flush=True)
        result["targets"] = targets.to_json()
    for label in args.configs:
        server_args = f"{args.config_flags[label]} {args.server_args}".strip()
        planned = "--autoscale slo" in server_args
        if planned:
            if targets is None:
                raise BenchError("the planner needs the targets: put another configuration first")
            median_len = int(np.median([r.prompt_len for r in base]))
            server_args += f" --ttft-slo {targets.ttft(median_len):.3f} --tpot-slo {targets.tpot:.4f}"
        with launched_server(args, server_args) as base_url:
            if targets is None:
                calibration = calibration_set(base)
                run = asyncio.run(run_load(base_url, calibration, np.zeros(len(calibration)), 1, args.api_key,
                                           args.request_timeout, f"{label} unloaded",
                                           warmups=token_warmups(2)))
                targets = fit_targets(run.records, args.k_ttft, args.k_tpot)
                print(f"  unloaded on {label}: TTFT = {targets.a * 1e3:.0f} ms + {targets.b * 1e3:.3f} ms/token, "
                      f"TPOT {targets.tpot0 * 1e3:.1f} ms -> targets TTFT {args.k_ttft:g}x, TPOT {args.k_tpot:g}x "
                      f"= {targets.tpot * 1e3:.0f} ms", flush=True)
                result["targets"] = targets.to_json()
            timeline = WorkerTimeline(base_url, time.monotonic()) if planned else None
            if timeline is not None:
                timeline.start()
            try:
                points = sweep(args, label, base_url, requests_at, targets, pdserve_extras, args.api_key, timeline)
            finally:
                if timeline is not None:
                    timeline.stop()
                    result["timeline"] = timeline.samples
        result["configs"][label] = {"server_args": server_args, "points": points}
    if peer is not None and peer.available:
        points = sweep(args, args.peer_name, peer.url, requests_at, targets, FLAVORS[args.peer_flavor],
                       args.peer_api_key)
        result["configs"][args.peer_name] = {"server_args": None, "points": points}
    elif peer is not None:
        print(peer.problem)
    for entry in result["configs"].values():
        entry["goodput"], entry["goodput_interpolated"] = goodput(
            [(rate, p["attainment"]) for rate, p in entry["points"].items()])
    return result


def report(name: str, result: dict) -> None:
    configs = result["configs"]
    print(f"\n{name}: goodput (highest rate with >= {ATTAINMENT:.0%} of requests within both targets)")
    base = configs.get("colocated", {}).get("goodput_interpolated")
    for label, entry in configs.items():
        versus = "" if not base or label == "colocated" else f"  {entry['goodput_interpolated'] / base:.2f}x colocated"
        print(f"  {label:10s} {entry['goodput']:7.3g} req/s (interpolated {entry['goodput_interpolated']:.3g}){versus}")
    fixed = [e["goodput_interpolated"] for e in configs.values()
             if e["server_args"] and "--autoscale slo" not in e["server_args"]]
    for label, entry in configs.items():
        if entry["server_args"] and "--autoscale slo" in entry["server_args"] and fixed and max(fixed) > 0:
            print(f"  {label} / best fixed: {entry['goodput_interpolated'] / max(fixed):.2f}x")


def plot(results: dict, path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for label, entry in results[name]["configs"].items():
            rates = sorted(entry["points"], key=float)
            ax.plot([float(r) for r in rates], [entry["points"][r]["attainment"] for r in rates], marker="o",
                    label=label)
        ax.axhline(ATTAINMENT, color="grey", linestyle=":")
        ax.set(title=name, xlabel="request rate (req/s)", ylabel="SLO attainment", ylim=(0, 1.05))
        ax.legend()
    fig.tight_layout()
    attainment_png = path.with_suffix(".png")
    fig.savefig(attainment_png)
    out = [attainment_png]
    timelines = {n: r["timeline"] for n, r in results.items() if r.get("timeline")}
    if timelines:
        fig, axes = plt.subplots(len(timelines), 1, figsize=(9, 3 * len(timelines)), squeeze=False)
        for ax, (name, samples) in zip(axes[:, 0], timelines.items()):
            counted = [s for s in samples if s[1] >= 0]
            ax.step([s[0] for s in counted], [s[1] for s in counted], where="post", label="prefill")
            ax.step([s[0] for s in counted], [s[2] for s in counted], where="post", label="decode")
            for s in samples:
                if s[1] < 0:
                    ax.axvline(s[0], color="grey", linestyle=":")
            most = max((max(s[1], s[2]) for s in counted), default=1)
            ax.set(title=f"{name}: the planner's serving workers (dotted: next rate starts)", xlabel="s",
                   ylabel="workers", ylim=(-0.2, most + 1.2), yticks=range(most + 2))
            ax.legend()
        fig.tight_layout()
        timeline_png = path.with_name(path.stem + "_workers.png")
        fig.savefig(timeline_png)
        out.append(timeline_png)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workloads", nargs="+", choices=("mixed", "summarize", "multiturn"),
                   default=["mixed", "summarize", "multiturn"])
    p.add_argument("--configs", nargs="*", default=list(CONFIGS),
                   help=f"in order, of {', '.join(CONFIGS)} and those --config names; the first is "
                        "calibrated on (a planner needs one before it); none: only the peer, on --targets-from")
    p.add_argument("--config", action="append", default=[], metavar="NAME=FLAGS",
                   help="name another configuration (or replace one): `pdserve serve` flags at the same "
                        "cores, e.g. '1P+1D-k4=--prefill-workers 1 --decode-workers 1 --prompt-deadline-factor 4'")
    p.add_argument("--server-args", default="", metavar="FLAGS",
                   help="more `pdserve serve` flags for every configuration, e.g. '--kv-cache-memory 2048'")
    p.add_argument("--rates", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.4], help="req/s, swept")
    p.add_argument("--duration", type=float, default=120.0, help="s of arrivals per rate (at least --min-prompts)")
    p.add_argument("--min-prompts", type=int, default=12)
    p.add_argument("--k-ttft", type=float, default=4.0, help="TTFT target / unloaded TTFT")
    p.add_argument("--k-tpot", type=float, default=4.0, help="TPOT target / unloaded TPOT")
    p.add_argument("--targets-from", type=Path, default=None, metavar="JSON",
                   help="take the targets an earlier run measured (its --result-json) instead of calibrating: "
                        "runs that add configurations to it then compare against the same targets")
    p.add_argument("--seed", type=int, default=0, help="of the calibration prompts, and of the runs without --seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run each rate once per seed (its own prompts and arrivals) and pool the records")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--api-key", default=None)
    p.add_argument("--serve-command", default=default_serve_command())
    p.add_argument("--server-timeout", type=float, default=300.0)
    p.add_argument("--server-stop-timeout", type=float, default=30.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--keep-server-logs", action="store_true",
                   help="keep each server's output (e.g. the planner's decisions); paths are printed")
    p.add_argument("--peer-url", help="vLLM from ../shared/peers/vllm-cpu.sh serve PORT")
    p.add_argument("--peer-name", default="vllm")
    p.add_argument("--peer-flavor", choices=sorted(FLAVORS), default="vllm")
    p.add_argument("--peer-api-key", default=None)
    p.add_argument("--result-json", type=Path, default=RESULTS_DIR / "goodput.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.seeds = args.seeds or [args.seed]
    args.config_flags = dict(CONFIGS)
    for entry in args.config:
        name, sep, flags = entry.partition("=")
        if not (sep and name and flags):
            raise SystemExit(f"--config: NAME=FLAGS, got {entry!r}")
        args.config_flags[name] = flags
    if unknown := [c for c in args.configs if c not in args.config_flags]:
        raise SystemExit(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(args.config_flags)})")
    if any(not r > 0 or math.isinf(r) for r in args.rates):
        raise SystemExit("--rates: finite request rates > 0")
    if not args.configs and not (args.peer_url and args.targets_from):
        raise SystemExit("--configs: none given; measuring only the peer needs --peer-url and --targets-from")
    if args.configs and "--autoscale slo" in args.config_flags[args.configs[0]] and args.targets_from is None:
        raise SystemExit("--configs: the planner needs the targets measured on another configuration first")
    peer = probe_peer(args.peer_name, args.peer_url, args.peer_api_key) if args.peer_url else None
    print(f"goodput: {shlex.join(sys.argv[1:]) or '(defaults)'}", flush=True)
    results = {}
    try:
        for name in args.workloads:
            results[name] = run_workload(args, name, peer)
            report(name, results[name])
    except BenchError as exc:
        print(f"goodput: {exc}", file=sys.stderr)
        return 1
    path = write_result(args.result_json, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
    plots = plot(results, path)
    print(f"\nresults: {path}; plots: {', '.join(str(p) for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
