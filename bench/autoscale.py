"""Autoscaling under a two-phase load: `pdserve serve --autoscale` vs a fixed 1 prefill + 1 decode worker.

Both clusters get the same requests on the same schedule (seeded, as in serving.py), and the
same --server-args:
    phase 1 (burst)  --burst-prompts long prompts (--burst-input-len tokens, --burst-output-len
                     output tokens) at --burst-rate req/s (inf: all at once);
    phase 2 (chats)  --chat-prompts short chats (--chat-min-len..--chat-max-len tokens,
                     --chat-output-len output tokens), Poisson at --chat-rate req/s (gamma with
                     --burstiness), starting --phase-gap s after phase 1's last request is sent.
Each phase is measured on its own requests (the phases may overlap in time): completed and
failed requests, goodput (requests per second meeting the SLOs, over the phase's span from its
first send to its last stream end), TTFT p50 and p99, TPOT p99, with serving.py's definitions.

In the background, /metrics is read every --sample-interval s from the moment the server is
healthy until --tail s after the last request ends (the autoscaled run only: the fixed cluster
has nothing to scale down): `pdserve_workers{role,state}` (starting, serving, draining),
`pdserve_autoscaler_decisions_total{role,direction}`, the routes taken (remote prefill or local
on the decode worker) and the queue gauges the autoscaler decides from, summed per role.

Prints a table of both clusters, the ratios autoscaled/fixed of goodput and TTFT per phase and
the autoscaled run's worker timeline; --result-json writes everything, per-request records and
samples included; --plot draws the workers per role over time (matplotlib, Agg backend).

`--autoscale-mode slo` autoscales with the SLO planner (`--autoscale slo`) aiming at the bench's
own --slo-ttft-ms and --slo-tpot-ms instead of queue depth.

    python bench/autoscale.py --result-json bench/results/autoscale.json
    python bench/autoscale.py --model /path/to/hf_dir --burst-prompts 4 --chat-prompts 8 --tail 15
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from pdserve.cluster.benchmark.arguments import DEFAULT_MODEL, positive, slo_ms
from pdserve.cluster.benchmark.client import LoadRun, run_load
from pdserve.cluster.benchmark.command import interrupt
from pdserve.cluster.benchmark.launch import default_serve_command, launched_server
from pdserve.cluster.benchmark.report import fmt, fmt_ratio, json_safe, ratio
from pdserve.cluster.benchmark.run import vocab_size
from pdserve.cluster.benchmark.stats import RunMetrics, Slo, compute_metrics, record_json
from pdserve.cluster.benchmark.workload import (
    BenchError,
    BenchRequest,
    arrival_offsets,
    mixed_dataset,
    random_dataset,
)

ROLES = ("prefill", "decode")
STATES = ("serving", "starting", "draining")
PHASES = ("burst", "chats")
# What the autoscaler reads, summed per role: pdserve_worker_<name>
SIGNALS = ("queue_requests", "queue_tokens", "waiting_for_kv_requests", "running_requests")
FIXED_ARGS = "--prefill-workers 1 --decode-workers 1"
# The burst's 18,000 prompt tokens must fit a decode worker's KV pool (SmolLM2 keeps ~46 KB a
# token): a request that finds no room there is prefilled by the decode worker itself, and
# the burst would then load the decode workers instead of the prefill ones.
DEFAULT_SERVER_ARGS = "--kv-cache-memory 1024"
DEFAULT_PLOT = str(Path(__file__).resolve().parent / "results" / "autoscale.png")


class Workload(NamedTuple):
    requests: list[BenchRequest]
    offsets: np.ndarray  # seconds after the first request is due
    phase_of: list[str]  # PHASES entry of each request
    chats_start: float  # when phase 2's first request is due


class Sample(NamedTuple):
    """One read of /metrics; `at` is time.perf_counter()."""

    at: float
    workers: dict[str, dict[str, int]]  # role -> state -> count
    decisions: dict[str, int]  # "prefill up" -> decisions so far
    routes: dict[str, int]  # "remote" / "local" prefill -> requests routed so far
    signals: dict[str, int]  # "prefill queue_tokens" -> sum over the role's workers (see SIGNALS)


class Measured(NamedTuple):
    label: str
    server_args: str
    run: LoadRun
    samples: list[Sample]
    scrape_failures: int


# ------------------------------------------------------------------------------ workload

def build_workload(args: argparse.Namespace, vocab: int) -> Workload:
    def rng(stream: int) -> np.random.Generator:
        return np.random.default_rng([args.seed, stream])

    burst = random_dataset(rng(0), vocab, args.burst_prompts, args.burst_input_len, args.burst_output_len, 0.0)
    burst_at = arrival_offsets(len(burst), args.burst_rate, args.burstiness, rng(1))
    chats = mixed_dataset(rng(2), vocab, args.chat_prompts, 0.0, 1, args.chat_min_len, args.chat_max_len,
                          args.chat_output_len)
    chats_start = float(burst_at[-1]) + args.phase_gap
    chats_at = chats_start + arrival_offsets(len(chats), args.chat_rate, args.burstiness, rng(3))
    return Workload(burst + chats, np.concatenate([burst_at, chats_at]),
                    [PHASES[0]] * len(burst) + [PHASES[1]] * len(chats), chats_start)


def describe_workload(args: argparse.Namespace, w: Workload) -> str:
    def rate(value: float) -> str:
        return "all at once" if math.isinf(value) else f"at {value:g} req/s"

    chat_lens = [len(r.prompt_ids) for r, p in zip(w.requests, w.phase_of) if p == PHASES[1]]
    return (f"phase 1 (burst): {args.burst_prompts} prompts of {args.burst_input_len} tokens, "
            f"{args.burst_output_len} output tokens, {rate(args.burst_rate)}\n"
            f"phase 2 (chats): {args.chat_prompts} prompts of {min(chat_lens)}-{max(chat_lens)} tokens, "
            f"{args.chat_output_len} output tokens, {rate(args.chat_rate)} (burstiness {args.burstiness:g}) "
            f"from t = {w.chats_start:.1f} s")


# ------------------------------------------------------------------------------ worker samples

def parse_metrics(text: str, at: float) -> Sample:
    """Workers per role and state, autoscaler decisions per "role direction", routed
    requests per prefill path (remote: a prefill worker; local: the decode worker) and
    the autoscaler's signals per role."""
    workers = {role: dict.fromkeys(STATES, 0) for role in ROLES}
    decisions = {f"{role} {d}": 0 for role in ROLES for d in ("up", "down")}
    routes = {"remote": 0, "local": 0}
    signals = {f"{role} {name}": 0 for role in ROLES for name in SIGNALS}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pdserve_workers" and s.labels.get("state") in STATES:
                workers.setdefault(s.labels["role"], dict.fromkeys(STATES, 0))[s.labels["state"]] = int(s.value)
            elif s.name == "pdserve_autoscaler_decisions_total":
                decisions[f"{s.labels['role']} {s.labels['direction']}"] = int(s.value)
            elif s.name == "pdserve_routes_total":
                routes[s.labels["prefill"]] = routes.get(s.labels["prefill"], 0) + int(s.value)
            elif s.name.removeprefix("pdserve_worker_") in SIGNALS:
                key = f"{s.labels['role']} {s.name.removeprefix('pdserve_worker_')}"
                signals[key] = signals.get(key, 0) + int(s.value)
    return Sample(at, workers, decisions, routes, signals)


def describe_workers(workers: dict[str, dict[str, int]]) -> str:
    """'prefill 2 (1 starting), decode 1': serving counts, then the others if any."""
    parts = []
    for role in ROLES:
        extra = [f"{workers[role][s]} {s}" for s in STATES[1:] if workers[role][s]]
        parts.append(f"{role} {workers[role]['serving']}" + (f" ({', '.join(extra)})" if extra else ""))
    return ", ".join(parts)


async def sample_workers(base_url: str, every: float, stop: asyncio.Event, label: str,
                         samples: list[Sample]) -> int:
    """Append a `Sample` every `every` s until `stop` is set; report changes on stderr.
    Returns the number of reads that failed (they leave a gap, not a zero)."""
    failures = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=5.0, trust_env=False) as client:
        while not stop.is_set():
            began = time.perf_counter()
            try:
                response = await client.get("/metrics")
                response.raise_for_status()
                sample = parse_metrics(response.text, time.perf_counter())
            except (httpx.HTTPError, ValueError):
                failures += 1
            else:
                if not samples or sample.workers != samples[-1].workers:
                    print(f"  {label} {time.strftime('%H:%M:%S')} workers: {describe_workers(sample.workers)}",
                          file=sys.stderr, flush=True)
                samples.append(sample)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, every - (time.perf_counter() - began)))
    return failures


# ------------------------------------------------------------------------------ runs

async def drive(base_url: str, w: Workload, args: argparse.Namespace, label: str,
                tail_s: float) -> tuple[LoadRun, list[Sample], int]:
    samples: list[Sample] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_workers(base_url, args.sample_interval, stop, label, samples))
    try:
        run = await run_load(base_url, w.requests, w.offsets, None, args.api_key, args.request_timeout, label)
        if tail_s > 0:
            print(f"  {label}: load done in {run.duration_s:.1f} s; watching the workers for {tail_s:g} s more",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(tail_s)
    finally:
        stop.set()
        failures = await sampler
    return run, samples, failures


def measure(args: argparse.Namespace, w: Workload, label: str, server_args: str, tail_s: float) -> Measured:
    print(f"{label}: pdserve serve {server_args}", file=sys.stderr, flush=True)
    with launched_server(args, server_args) as base_url:
        run, samples, failures = asyncio.run(drive(base_url, w, args, label, tail_s))
    return Measured(label, server_args, run, samples, failures)


def phase_metrics(m: Measured, w: Workload, slo: Slo) -> dict[str, RunMetrics]:
    """Per phase: its requests over its span, from its first due time to its last stream end."""
    out = {}
    for phase in PHASES:
        records = [r for r, p in zip(m.run.records, w.phase_of) if p == phase]
        start = m.run.started + min(r.due for r in records)
        end = max(r.finished or r.sent for r in records)
        out[phase] = compute_metrics(records, max(end - start, 1e-9), slo)
    return out


def autoscale_args(args: argparse.Namespace) -> str:
    common = (f"--min-prefill {args.min_prefill} --max-prefill {args.max_prefill} --min-decode 1 --max-decode {args.max_decode} "
              f"--autoscale-window {args.autoscale_window:g} --autoscale-up-cooldown {args.autoscale_up_cooldown:g} "
              f"--autoscale-down-delay {args.autoscale_down_delay:g} "
              f"--autoscale-down-cooldown {args.autoscale_down_cooldown:g}")
    if args.autoscale_mode == "slo":  # the planner, aiming at the bench's own SLOs
        if args.slo_ttft_ms is None or args.slo_tpot_ms is None:
            raise BenchError("--autoscale-mode slo needs --slo-ttft-ms and --slo-tpot-ms")
        return (f"{FIXED_ARGS} --autoscale slo --ttft-slo {args.slo_ttft_ms / 1000:g} "
                f"--tpot-slo {args.slo_tpot_ms / 1000:g} {common}")
    return (f"{FIXED_ARGS} --autoscale {common} --autoscale-prefill-tokens {args.autoscale_prefill_tokens} "
            f"--autoscale-decode-waiting {args.autoscale_decode_waiting}")


# ------------------------------------------------------------------------------ report

def timeline(m: Measured) -> list[Sample]:
    """The first sample and each one whose worker counts differ from the one before."""
    return [s for i, s in enumerate(m.samples) if i == 0 or s.workers != m.samples[i - 1].workers]


def describe_signals(signals: dict[str, int]) -> str:
    def get(role: str, name: str) -> int:
        return signals.get(f"{role} {name}", 0)

    return (f"prefill {get('prefill', 'queue_requests')} queued ({get('prefill', 'queue_tokens')} tok) "
            f"{get('prefill', 'running_requests')} running; decode {get('decode', 'queue_requests')} queued "
            f"{get('decode', 'waiting_for_kv_requests')} for KV {get('decode', 'running_requests')} running")


class Decision(NamedTuple):
    at: float  # s since the first request was due (to within one --sample-interval)
    role: str
    direction: str  # "up" or "down"


def decisions(m: Measured) -> list[Decision]:
    """The autoscaler's decisions, in order, from the rises of its decision counters."""
    out = []
    for before, now in itertools.pairwise(m.samples):
        for key, count in now.decisions.items():
            role, direction = key.split()
            out += [Decision(now.at - m.run.started, role, direction)] * (count - before.decisions.get(key, 0))
    return out


def step_responses(made: Sequence[Decision], steps: Sequence[tuple[str, float]]) -> list[dict]:
    """Per load step (name, s since the first request was due): the first decision after
    it, before the next step, and its delay; None when the autoscaler made none."""
    out = []
    for i, (name, at) in enumerate(steps):
        until = steps[i + 1][1] if i + 1 < len(steps) else math.inf
        first = next((d for d in made if at <= d.at < until), None)
        out.append({"step": name, "at_s": at, "decision": None if first is None else f"{first.role} {first.direction}",
                    "delay_s": None if first is None else first.at - at})
    return out


def flaps(made: Sequence[Decision], args: argparse.Namespace) -> list[dict]:
    """Reversals of a role's direction sooner than its rules allow on a steady load: down
    within --autoscale-down-delay of an up, or up within --autoscale-up-cooldown of a down."""
    out = []
    for role in ROLES:
        mine = [d for d in made if d.role == role]
        for before, after in itertools.pairwise(mine):
            if before.direction == after.direction:
                continue
            allowed = args.autoscale_down_delay if after.direction == "down" else args.autoscale_up_cooldown
            if after.at - before.at < allowed:
                out.append({"role": role, "first": before._asdict(), "then": after._asdict()})
    return out


def most_serving(m: Measured, role: str) -> int:
    return max((s.workers[role]["serving"] for s in m.samples), default=0)


def print_report(runs: Sequence[Measured], metrics: Sequence[dict[str, RunMetrics]], slo: Slo) -> list[dict]:
    print(f"{'=' * 24} autoscaled vs fixed [goodput: {slo}] {'=' * 24}")
    print(f"{'cluster':<12}{'phase':<8}{'ok / failed':>13}{'goodput (req/s)':>17}{'met':>9}"
          f"{'TTFT p50 (ms)':>15}{'TTFT p99 (ms)':>15}{'TPOT p99 (ms)':>15}")
    for m, per_phase in zip(runs, metrics):
        for phase, pm in per_phase.items():
            print(f"{m.label:<12}{phase:<8}{f'{pm.completed} / {pm.failed}':>13}{pm.goodput:>17.3f}"
                  f"{f'{pm.good}/{pm.completed}':>9}{fmt(pm.ttft.p50):>15}{fmt(pm.ttft.p99):>15}"
                  f"{fmt(pm.tpot.p99):>15}")
    for m in runs:
        last = m.samples[-1] if m.samples else Sample(0.0, {}, {}, {}, {})
        decided = ", ".join(f"{k} {v}" for k, v in last.decisions.items() if v) or "none"
        most = ", ".join(f"{role} {most_serving(m, role)}" for role in ROLES)
        routed = ", ".join(f"{v} {k}" for k, v in last.routes.items())
        print(f"{m.label}: load {m.run.duration_s:.1f} s; most serving workers: {most}; decisions: {decided}; "
              f"prefill: {routed or '-'} (warm-up included)"
              + (f"; {m.scrape_failures} /metrics reads failed" if m.scrape_failures else ""))
    rows = []
    print(f"{runs[0].label + '/' + runs[1].label:<20}{'goodput':>10}{'TTFT p50':>10}{'TTFT p99':>10}")
    for phase in PHASES:
        a, b = metrics[0][phase], metrics[1][phase]
        row = {"phase": phase, "goodput": ratio(a.goodput, b.goodput), "ttft_p50": ratio(a.ttft.p50, b.ttft.p50),
               "ttft_p99": ratio(a.ttft.p99, b.ttft.p99)}
        rows.append(row)
        print(f"{phase:<20}{fmt_ratio(row['goodput']):>10}{fmt_ratio(row['ttft_p50']):>10}"
              f"{fmt_ratio(row['ttft_p99']):>10}")
    return rows


def print_decisions(m: Measured, w: Workload, args: argparse.Namespace) -> dict:
    """The autoscaled run's decisions, how soon it answered each load step (in decision
    windows), and its flaps; returned for the JSON."""
    made = decisions(m)
    steps = [("burst starts", 0.0), ("chats start", w.chats_start), ("load ends", m.run.duration_s)]
    responses = step_responses(made, steps)
    flapped = flaps(made, args)
    window = args.autoscale_window
    print(f"{m.label} decisions (s since the first request was due, +-{args.sample_interval:g} s): "
          + (", ".join(f"{d.role} {d.direction} {d.at:.1f}" for d in made) or "none"))
    for r in responses:
        answer = ("no decision" if r["decision"] is None else
                  f"{r['decision']} after {r['delay_s']:.1f} s = {r['delay_s'] / window:.1f} windows of {window:g} s")
        print(f"  {r['step']} at {r['at_s']:.1f} s: {answer}")
    print(f"  flaps (a reversal sooner than the down delay / up cooldown allow): {len(flapped)}")
    return {"decisions": [d._asdict() for d in made], "step_responses": responses, "flaps": flapped}


def print_timelines(runs: Sequence[Measured]) -> None:
    for m in runs:
        changes = timeline(m)
        if len(changes) > 1:
            print(f"{m.label} workers over time (s since the first request; serving, then others) "
                  "| the autoscaler's signals then:")
            for s in changes:
                print(f"  {s.at - m.run.started:7.1f}  {describe_workers(s.workers):<46} | "
                      f"{describe_signals(s.signals)}")


def plot(path: str, auto: Measured, fixed: Measured, w: Workload) -> None:
    """Workers per role over time: the autoscaled run's states as step lines, the fixed
    run's serving count for reference, the phase boundaries as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marks = [("phase 1 (burst) starts", 0.0, "black", "-."),
             (f"phase 2 (chats) starts: {w.chats_start:.1f} s", w.chats_start, "tab:purple", "-."),
             (f"{auto.label}: load done, {auto.run.duration_s:.1f} s", auto.run.duration_s, "tab:blue", ":"),
             (f"{fixed.label}: load done, {fixed.run.duration_s:.1f} s", fixed.run.duration_s, "gray", ":")]
    fig, axes = plt.subplots(len(ROLES), 1, sharex=True, figsize=(10, 6.5), layout="constrained")
    for ax, role in zip(axes, ROLES):
        ax.step([s.at - fixed.run.started for s in fixed.samples], [s.workers[role]["serving"] for s in fixed.samples],
                where="post", color="gray", alpha=0.5, linewidth=4, label=f"{fixed.label}: serving")
        t = [s.at - auto.run.started for s in auto.samples]
        for state, style, color in (("serving", "-", "tab:blue"), ("starting", "--", "tab:green"),
                                    ("draining", ":", "tab:red")):
            ax.step(t, [s.workers[role][state] for s in auto.samples], where="post", linestyle=style,
                    color=color, label=f"{auto.label}: {state}")
        for name, x, color, style in marks:
            ax.axvline(x, color=color, linestyle=style, linewidth=1.2, label=name)
        top = max([most_serving(auto, role), most_serving(fixed, role)] +
                  [s.workers[role][st] for s in auto.samples for st in STATES])
        ax.set_ylim(-0.1, top + 0.4)
        ax.set_yticks(range(top + 1))
        ax.set_ylabel(f"{role} workers")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=8)
    axes[-1].set_xlabel("seconds since the first request was due")
    fig.suptitle("pdserve: workers per role under a burst of long prompts, then short chats")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def result_json(args: argparse.Namespace, vocab: int, w: Workload, runs: Sequence[Measured],
                metrics: Sequence[dict[str, RunMetrics]], rows: list[dict], scaling: dict) -> dict:
    out = []
    for m, per_phase in zip(runs, metrics):
        samples = [{"t": round(s.at - m.run.started, 3), **s.workers, "decisions": s.decisions, "routes": s.routes,
                    "signals": s.signals}
                   for s in m.samples]
        requests = [{"phase": p, **record_json(r, m.run.started)} for r, p in zip(m.run.records, w.phase_of)]
        out.append({"label": m.label, "server_args": m.server_args, "duration_s": m.run.duration_s,
                    "phases": {p: pm.to_json() for p, pm in per_phase.items()},
                    "worker_samples": samples, "scrape_failures": m.scrape_failures, "requests": requests})
    return {"config": vars(args), "vocab_size": vocab, "cpus": os.cpu_count(), "chats_start_s": w.chats_start,
            "runs": out, "ratios": {"labels": [m.label for m in runs], "by_phase": rows}, "scaling": scaling}


# ------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pos_int, pos_float = positive(int), positive(float)
    p.add_argument("--model", default=DEFAULT_MODEL, help="passed to both servers; sets the vocabulary")
    p.add_argument("--server-args", default=DEFAULT_SERVER_ARGS, help="more `pdserve serve` flags for both clusters")
    p.add_argument("--api-key", help="passed to both servers and sent as a bearer token")
    p.add_argument("--serve-command", default=default_serve_command(), help="what starts a server")
    p.add_argument("--server-timeout", type=float, default=300.0, help="s to wait for /health")
    p.add_argument("--server-stop-timeout", type=float, default=30.0, help="s from SIGINT to SIGKILL")
    p.add_argument("--request-timeout", type=float, default=600.0, help="s per request")
    p.add_argument("--seed", type=int, default=0, help="fixes the prompts and the arrival schedule")
    p.add_argument("--burst-prompts", type=pos_int, default=12, help="phase 1: long prompts")
    p.add_argument("--burst-input-len", type=pos_int, default=1500, help="phase 1: prompt tokens")
    p.add_argument("--burst-output-len", type=pos_int, default=32, help="phase 1: output tokens")
    p.add_argument("--burst-rate", type=pos_float, default=2.0, help="phase 1: req/s; inf: all at once")
    p.add_argument("--phase-gap", type=float, default=0.0, help="s from phase 1's last send to phase 2")
    p.add_argument("--chat-prompts", type=pos_int, default=48, help="phase 2: short chats")
    p.add_argument("--chat-min-len", type=pos_int, default=64, help="phase 2: prompt tokens, min")
    p.add_argument("--chat-max-len", type=pos_int, default=128, help="phase 2: prompt tokens, max")
    p.add_argument("--chat-output-len", type=pos_int, default=64, help="phase 2: output tokens")
    p.add_argument("--chat-rate", type=pos_float, default=1.0, help="phase 2: req/s")
    p.add_argument("--burstiness", type=pos_float, default=1.0, help="arrival gaps: 1 is Poisson; gamma otherwise")
    p.add_argument("--slo-ttft-ms", type=slo_ms, default=2000.0, help="'none' to drop")
    p.add_argument("--slo-tpot-ms", type=slo_ms, default=100.0, help="'none' to drop")
    p.add_argument("--slo-e2el-ms", type=slo_ms, default=None, help="E2E latency SLO")
    scale = p.add_argument_group("the autoscaled cluster (starts at 1 + 1, never below --min-prefill + 1)")
    scale.add_argument("--autoscale-mode", choices=["queue", "slo"], default="queue",
                       help="queue depth (--autoscale), or the SLO planner aiming at --slo-ttft-ms/--slo-tpot-ms")
    scale.add_argument("--min-prefill", type=int, choices=(0, 1), default=1,
                       help="0: the autoscaler may drain the prefill worker (prompts then run on the decode worker)")
    scale.add_argument("--max-prefill", type=pos_int, default=2)
    scale.add_argument("--max-decode", type=pos_int, default=2)
    scale.add_argument("--autoscale-prefill-tokens", type=pos_int, default=1500,
                       help="pending prompt tokens per prefill worker: one burst prompt")
    scale.add_argument("--autoscale-decode-waiting", type=pos_int, default=4)
    scale.add_argument("--autoscale-window", type=pos_float, default=5.0)
    scale.add_argument("--autoscale-up-cooldown", type=float, default=5.0)
    scale.add_argument("--autoscale-down-delay", type=float, default=20.0)
    scale.add_argument("--autoscale-down-cooldown", type=float, default=5.0)
    p.add_argument("--sample-interval", type=pos_float, default=0.5, help="s between reads of /metrics")
    p.add_argument("--tail", type=float, default=30.0, help="s to keep sampling after the autoscaled load")
    p.add_argument("--result-json", metavar="PATH", help="write the config, metrics, samples and records")
    p.add_argument("--plot", default=DEFAULT_PLOT, metavar="PNG", help="workers over time; 'none' to skip")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.chat_min_len > args.chat_max_len:
        parser.error("--chat-min-len must not exceed --chat-max-len")
    if args.phase_gap < 0 or args.tail < 0:
        parser.error("--phase-gap and --tail must be >= 0")
    if args.plot.lower() in ("", "none", "off"):
        args.plot = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        if args.plot is not None:
            try:
                import matplotlib  # noqa: F401 - checked before a run of minutes, used after
            except ImportError as exc:
                raise BenchError("--plot needs matplotlib: `.venv/bin/pip install matplotlib`, "
                                 "or pass --plot none") from exc
        vocab = vocab_size(args.model)
        w = build_workload(args, vocab)
        print(describe_workload(args, w), flush=True)
        slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2el_ms)
        extra = f" {args.server_args}" if args.server_args else ""
        runs = [measure(args, w, "autoscaled", autoscale_args(args) + extra, args.tail),
                measure(args, w, "fixed", FIXED_ARGS + extra, 0.0)]
    except BenchError as exc:
        print(f"autoscale.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("autoscale.py: interrupted", file=sys.stderr)
        return 130
    metrics = [phase_metrics(m, w, slo) for m in runs]
    rows = print_report(runs, metrics, slo)
    scaling = print_decisions(runs[0], w, args)
    print_timelines(runs)
    for m in runs:
        for error in sorted({r.error for r in m.run.records if r.error})[:3]:
            print(f"  {m.label} failure: {error}")
    if args.plot is not None:
        plot(args.plot, *runs, w)
        print(f"wrote {args.plot}")
    if args.result_json:
        result = result_json(args, vocab, w, runs, metrics, rows, scaling)
        Path(args.result_json).write_text(json.dumps(json_safe(result), indent=1, allow_nan=False))
        print(f"wrote {args.result_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
