"""Chaos: worker processes killed under a steady stream load, with and without migration.

`pdserve serve` with 1 prefill and 2 decode workers; --clients clients each send
--streams-per-client greedy streaming completions back to back (token-id prompts of
--min-prompt..--max-prompt tokens, --min-output..--max-output tokens, ignore_eos, seeded).
Three runs on fresh servers, same requests:

    reference   no faults: the outputs every other run must reproduce
    chaos       SIGKILL the first decode worker once --kill-at[0] of the streams are done,
                the prefill worker at --kill-at[1], the second original decode worker at
                --kill-at[2] (the controller replaces each); migration on (the default)
    peer        the same kills with --max-migrations 0: what is lost without migration

Per run: streams completed / errored / hung (a stream hung if it waited more than
--hang-after s for a token, or never ended), completed outputs identical to the reference,
time from each kill to the role's serving count being whole again (from /metrics, sampled
every --sample-interval s), and whether every live worker holds no KV once the load ends.
Prints the table and the completed ratio chaos/peer; --result-json keeps everything,
--plot draws tokens/s and serving workers per role over time with the kills marked.

    python bench/chaos.py --result-json bench/results/chaos.json --plot bench/results/chaos.png
    python bench/chaos.py --clients 4 --streams-per-client 10 --model /path/to/hf_dir   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

from pdserve.cluster.benchmark.launch import default_serve_command, launched_server
from pdserve.cluster.benchmark.run import vocab_size
from pdserve.cluster.benchmark.workload import BenchError, draw_tokens
from pdserve.runtime.weights.checkpoint import DEFAULT_MODEL

SERVER_ARGS = "--prefill-workers 1 --decode-workers 2"
ROLES = ("prefill", "decode")
KILL_ORDER = ("decode", "prefill", "decode")


@dataclass
class StreamRecord:
    client: int
    index: int
    started: float = 0.0
    ended: float = 0.0
    text: str = ""
    token_times: list[float] = field(default_factory=list)
    completion_tokens: int | None = None
    error: str | None = None

    @property
    def longest_wait(self) -> float:
        times = [self.started, *self.token_times] + ([self.ended] if self.ended else [])
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@dataclass
class Kill:
    role: str
    pid: int
    at: float  # time.monotonic()
    whole_again_at: float | None = None  # the role's serving count back to what it was


@dataclass
class Run:
    label: str
    streams: list[StreamRecord]
    kills: list[Kill]
    samples: list[tuple[float, dict[str, int]]]  # (time, serving workers per role)
    kv_idle_after: bool | None
    started: float
    ended: float


# ----------------------------------------------------------------------------- the load


def build_requests(args: argparse.Namespace, vocab: int) -> list[list[tuple[list[int], int]]]:
    """Per client, its (prompt ids, max tokens) in order."""
    rng = np.random.default_rng(args.seed)
    return [[(draw_tokens(rng, vocab, int(rng.integers(args.min_prompt, args.max_prompt + 1))),
              int(rng.integers(args.min_output, args.max_output + 1)))
             for _ in range(args.streams_per_client)] for _ in range(args.clients)]


async def stream_one(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, record: StreamRecord,
                     timeout: float) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    record.started = time.monotonic()
    try:
        async with asyncio.timeout(timeout), client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    record.error = event["error"].get("message", "error")
                    continue
                for choice in event.get("choices", []):
                    if choice.get("text"):
                        record.text += choice["text"]
                        record.token_times.append(time.monotonic())
                if event.get("usage"):
                    record.completion_tokens = event["usage"]["completion_tokens"]
    except TimeoutError:
        record.error = f"no end within {timeout:g} s"
    except (httpx.HTTPError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.ended = time.monotonic()


class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.changed = asyncio.Event()

    def tick(self) -> None:
        self.done += 1
        self.changed.set()
        if self.done % max(1, self.total // 10) == 0:
            print(f"  {self.done}/{self.total} streams done", file=sys.stderr, flush=True)


async def drive(base_url: str, api_key: str, requests, progress: Progress, timeout: float) -> list[StreamRecord]:
    headers = {"Authorization": f"Bearer {api_key}"}
    records = [[StreamRecord(c, i) for i in range(len(rs))] for c, rs in enumerate(requests)]
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=None, trust_env=False,
                                 limits=httpx.Limits(max_connections=None)) as client:
        async def one_client(c: int) -> None:
            for (prompt, max_tokens), record in zip(requests[c], records[c]):
                await stream_one(client, prompt, max_tokens, record, timeout)
                progress.tick()

        await asyncio.gather(*(one_client(c) for c in range(len(requests))))
    return [r for rs in records for r in rs]


# ----------------------------------------------------------------------------- the faults


def worker_pids(server: subprocess.Popen, role: str) -> list[int]:
    """PIDs of the server's worker processes of `role` (Ray names them after the actor class)."""
    name = "PrefillWorker" if role == "prefill" else "DecodeWorker"
    found = []
    with contextlib.suppress(psutil.NoSuchProcess):
        for process in psutil.Process(server.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if name in " ".join(process.cmdline()):
                    found.append(process.pid)
    return sorted(found)


def serving_counts(text: str) -> dict[str, int]:
    counts = dict.fromkeys(ROLES, 0)
    for family in text_string_to_metric_families(text):
        if family.name == "pdserve_workers":
            for sample in family.samples:
                if sample.labels.get("state") == "serving":
                    counts[sample.labels["role"]] = int(sample.value)
    return counts


def kv_idle(text: str) -> bool:
    """Every worker holds no KV for requests and runs nothing."""
    busy = {"pdserve_worker_kv_usage", "pdserve_worker_running_requests", "pdserve_worker_waiting_for_kv_requests",
            "pdserve_worker_queue_requests"}
    return all(sample.value == 0 for family in text_string_to_metric_families(text) if family.name in busy
               for sample in family.samples)


async def sample_loop(base_url: str, every: float, stop: asyncio.Event, samples: list) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=10, trust_env=False) as client:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                samples.append((time.monotonic(), serving_counts((await client.get("/metrics")).text)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)


async def kill_loop(server: subprocess.Popen, progress: Progress, kill_at: list[float], originals: dict,
                    kills: list[Kill]) -> None:
    """SIGKILL workers in KILL_ORDER as the load passes each fraction of `kill_at`."""
    decode_victims = list(originals["decode"])
    for role, fraction in zip(KILL_ORDER, kill_at):
        while progress.done < fraction * progress.total:
            progress.changed.clear()
            await progress.changed.wait()
        pids = decode_victims[:1] if role == "decode" else worker_pids(server, "prefill")[:1]
        if role == "decode":
            decode_victims = decode_victims[1:]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                kills.append(Kill(role, pid, time.monotonic()))
                print(f"  killed the {role} worker (pid {pid}) at {progress.done}/{progress.total} streams",
                      file=sys.stderr, flush=True)


def mark_recoveries(kills: list[Kill], samples: list[tuple[float, dict[str, int]]], target: dict[str, int]) -> None:
    for kill in kills:
        after = [(t, c) for t, c in samples if t > kill.at]
        dipped = False
        for t, counts in after:
            dipped = dipped or counts[kill.role] < target[kill.role]
            if dipped and counts[kill.role] >= target[kill.role]:
                kill.whole_again_at = t
                break


# ----------------------------------------------------------------------------- one run


def run_once(args: argparse.Namespace, label: str, requests, server_args: str, faults: bool) -> Run:
    print(f"{label}: {SERVER_ARGS} {server_args}".rstrip(), file=sys.stderr, flush=True)
    holder: dict[str, subprocess.Popen] = {}
    with launched_server(args, f"{SERVER_ARGS} {server_args}", on_start=lambda p: holder.setdefault("p", p)) as url:
        server = holder["p"]
        originals = {role: worker_pids(server, role) for role in ROLES}
        target = {"prefill": 1, "decode": 2}
        progress = Progress(sum(len(r) for r in requests))
        samples: list = []
        kills: list[Kill] = []

        async def everything() -> list[StreamRecord]:
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_loop(url, args.sample_interval, stop, samples))
            killer = asyncio.create_task(kill_loop(server, progress, args.kill_at, originals, kills)) if faults \
                else None
            try:
                return await drive(url, args.api_key, requests, progress, args.stream_timeout)
            finally:
                if killer is not None:
                    killer.cancel()
                # Wait for the replacements (or the timeout), then look at the KV.
                deadline = time.monotonic() + args.settle
                while time.monotonic() < deadline and (not samples or samples[-1][1] != target):
                    await asyncio.sleep(args.sample_interval)
                stop.set()
                await sampler

        started = time.monotonic()
        streams = asyncio.run(everything())
        ended = time.monotonic()
        mark_recoveries(kills, samples, target)
        idle = None
        deadline = time.monotonic() + args.settle
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                idle = kv_idle(httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text)
                if idle:
                    break
            time.sleep(1.0)
    return Run(label, streams, kills, samples, idle, started, ended)


# ----------------------------------------------------------------------------- report


def summarize(run: Run, reference: Run | None, hang_after: float) -> dict:
    completed = [s for s in run.streams if s.error is None and s.completion_tokens is not None]
    hung = [s for s in run.streams if s.longest_wait > hang_after or (s.error or "").startswith("no end")]
    summary = {"label": run.label, "streams": len(run.streams), "completed": len(completed),
               "errored": sum(1 for s in run.streams if s.error is not None), "hung": len(hung),
               "longest_wait_s": max((s.longest_wait for s in run.streams), default=0.0),
               "kv_idle_after": run.kv_idle_after,
               "kills": [{"role": k.role, "pid": k.pid, "at_s": k.at - run.started,
                          "whole_again_after_s": None if k.whole_again_at is None else k.whole_again_at - k.at}
                         for k in run.kills],
               "seconds": run.ended - run.started,
               "errors": sorted({s.error for s in run.streams if s.error})[:10]}
    if reference is not None:
        by_key = {(s.client, s.index): s.text for s in reference.streams if s.error is None}
        summary["identical_to_reference"] = sum(1 for s in completed if by_key.get((s.client, s.index)) == s.text)
        summary["different_from_reference"] = [(s.client, s.index) for s in completed
                                               if (s.client, s.index) in by_key
                                               and by_key[(s.client, s.index)] != s.text][:20]
    return summary


def print_table(summaries: list[dict]) -> None:
    columns = ("label", "streams", "completed", "errored", "hung", "identical_to_reference", "longest_wait_s",
               "kv_idle_after", "seconds")
    print("  ".join(f"{c:>22}" for c in columns))
    for s in summaries:
        cells = []
        for c in columns:
            value = s.get(c, "-")
            cells.append(f"{value:>22.1f}" if isinstance(value, float) else f"{value!s:>22}")
        print("  ".join(cells))
    for s in summaries:
        for k in s["kills"]:
            took = k["whole_again_after_s"]
            when = f"after {took:.1f} s" if took is not None else "never (within the run)"
            print(f"{s['label']}: killed {k['role']} at {k['at_s']:.1f} s; serving count whole again {when}")


def plot(path: str, runs: list[Run]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.2 * len(runs)), sharex=False, squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        times = sorted(t - run.started for s in run.streams for t in s.token_times)
        if times:
            edges = np.arange(0, times[-1] + 2, 1.0)
            rate, _ = np.histogram(times, edges)
            ax.plot(edges[:-1], rate, color="black", lw=1, label="text chunks/s")
        ax.set_ylabel("streamed text chunks/s (~ tokens/s)")
        twin = ax.twinx()
        for role, color in (("prefill", "tab:blue"), ("decode", "tab:orange")):
            twin.step([t - run.started for t, _ in run.samples], [c[role] for _, c in run.samples],
                      where="post", color=color, label=f"{role} serving")
        twin.set_ylabel("workers")
        twin.set_ylim(0, 3)
        for k in run.kills:
            ax.axvline(k.at - run.started, color="red", ls="--", lw=1)
        ax.set_title(run.label)
        ax.legend(loc="upper left")
        twin.legend(loc="upper right")
    axes[-1, 0].set_xlabel("seconds since the load started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def stream_json(s: StreamRecord, t0: float) -> dict:
    """One stream for --result-json: its outcome and timing, not its text or every token."""
    return {"client": s.client, "index": s.index, "started_s": s.started - t0, "ended_s": s.ended - t0,
            "chunks": len(s.token_times), "completion_tokens": s.completion_tokens, "error": s.error,
            "longest_wait_s": s.longest_wait}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--streams-per-client", type=int, default=100)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=160)
    p.add_argument("--min-output", type=int, default=32)
    p.add_argument("--max-output", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kill-at", type=float, nargs=3, default=[0.2, 0.45, 0.7],
                   help="fractions of the streams done at which to kill decode, prefill, decode")
    p.add_argument("--hang-after", type=float, default=60.0, help="a wait for a token longer than this is a hang")
    p.add_argument("--stream-timeout", type=float, default=600.0)
    p.add_argument("--sample-interval", type=float, default=0.5)
    p.add_argument("--settle", type=float, default=180.0,
                   help="seconds to wait after the load for replacements and an idle KV pool")
    p.add_argument("--server-args", default="", help="more `pdserve serve` flags for every run")
    p.add_argument("--skip-peer", action="store_true", help="no run with migration off")
    p.add_argument("--api-key", default="chaos-bench")
    p.add_argument("--serve-command", default=default_serve_command())
    p.add_argument("--server-timeout", type=float, default=600.0)
    p.add_argument("--server-stop-timeout", type=float, default=60.0)
    p.add_argument("--result-json")
    p.add_argument("--plot")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        requests = build_requests(args, vocab_size(args.model))
        runs = [run_once(args, "reference (no faults)", requests, args.server_args, faults=False),
                run_once(args, "chaos, migration on", requests, args.server_args, faults=True)]
        if not args.skip_peer:
            runs.append(run_once(args, "chaos, migration off", requests, f"{args.server_args} --max-migrations 0",
                                 faults=True))
    except BenchError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 1
    summaries = [summarize(run, runs[0] if run is not runs[0] else None, args.hang_after) for run in runs]
    print(f"\n{args.clients} clients x {args.streams_per_client} greedy streams, {args.model}, "
          f"{shlex.join(['pdserve', 'serve', *SERVER_ARGS.split()])} {args.server_args}".rstrip())
    print_table(summaries)
    if len(summaries) == 3:
        on, off = summaries[1]["completed"], summaries[2]["completed"]
        print(f"completed with migration / without: {on} / {off} = {on / max(off, 1):.2f}x")
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(
            {"args": vars(args), "summaries": summaries,
             "runs": [{"label": r.label, "streams": [stream_json(s, r.started) for s in r.streams],
                       "samples": [(t - r.started, c) for t, c in r.samples]} for r in runs]}, indent=1))
    if args.plot:
        plot(args.plot, runs)
    chaos = summaries[1]
    ok = chaos["completed"] == chaos["streams"] and chaos["hung"] == 0 and \
        chaos.get("identical_to_reference") == chaos["completed"]
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
