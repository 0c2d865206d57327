"""Online serving benchmark: an OpenAI-compatible endpoint driven over HTTP, as `vllm bench serve`.

Requests go to `/v1/completions` as streamed (SSE) completions whose prompts are lists of
token ids drawn from the model's vocabulary with a fixed seed; `max_tokens` is each
request's output length, with `ignore_eos` and greedy sampling, so every request produces
exactly that many tokens. Per run it reports TTFT, TPOT, ITL and E2E latency (mean, p50,
p90, p99), request / output-token / total-token throughput, goodput (requests per second
that meet every SLO) and the failed requests.

Definitions (those of `vllm bench serve`): a request's clock starts when it is sent, after
any --max-concurrency wait. TTFT is the arrival of the first chunk with content (text or
token ids: requests ask for `return_token_ids`); ITL is every gap between successive such
chunks; E2E ends with the stream; TPOT = (E2E - TTFT) / (output tokens - 1) over requests
with more than one output token, the count coming from the final `usage`
(stream_options.include_usage). For goodput a one-token request's TPOT is 0. Percentiles
interpolate linearly; ITL percentiles pool the gaps of all requests.

Datasets: `random` (input and output lengths uniform in [L*(1-r), L*(1+r)]),
`shared-prefix` (request i extends group i % G's common prefix with its own suffix) and
`mixed` (a --long-fraction of --long-len prompts, the rest --short-min-len..--short-max-len).
Arrivals: all at once (--request-rate inf) or gamma-distributed gaps with mean 1/rate and
shape --burstiness (1 is Poisson), optionally capped by --max-concurrency requests in flight.
The dataset and the schedule depend only on the flags and --seed, so runs compare.

Targets: --base-url for a running server, --launch "ARGS" to start `pdserve serve ARGS`
on free ports for the run, or --compare "ARGS_A" "ARGS_B" to run the same requests on the
same schedule against both and print the ratios A/B (--compare alone: disaggregated vs
colocated). A single-flag ARGS needs the = form: --launch="--colocated".
--http-overhead instead compares the TTFT of a 16-token prompt through the gateway with the
same model's engine in this process.

    python bench/serving.py --base-url http://127.0.0.1:8000 --num-prompts 50 --request-rate 2
    python bench/serving.py --launch "--prefill-workers 1 --decode-workers 1" --dataset mixed
    python bench/serving.py --compare --labels disagg colocated --dataset mixed --request-rate 1 \\
        --result-json /tmp/compare.json
    python bench/serving.py --launch="--colocated" --http-overhead
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_COMPARE = ("--prefill-workers 1 --decode-workers 1", "--colocated --decode-workers 2")
DEFAULT_COMPARE_LABELS = ("disagg", "colocated")
# Special tokens and single bytes sit at the bottom of the vocabulary: prompts use the
# ordinary pieces above them, as real text would.
FIRST_TOKEN_ID = 300
OVERHEAD_PROMPT_LEN = 16


class BenchError(Exception):
    """A run that cannot go on; the message says what was wrong and what to do."""


# ------------------------------------------------------------------------------ workload

class BenchRequest(NamedTuple):
    prompt_ids: list[int]
    output_len: int


def draw_tokens(rng: np.random.Generator, vocab_size: int, n: int) -> list[int]:
    return rng.integers(FIRST_TOKEN_ID, vocab_size, size=n).tolist()


def uniform_lengths(rng: np.random.Generator, length: int, range_ratio: float, n: int) -> np.ndarray:
    """n integers uniform in [floor(length*(1-r)), ceil(length*(1+r))], never below 1."""
    low = max(1, math.floor(length * (1 - range_ratio)))
    high = max(low, math.ceil(length * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def random_dataset(rng: np.random.Generator, vocab_size: int, num_prompts: int, input_len: int,
                   output_len: int, range_ratio: float) -> list[BenchRequest]:
    inputs = uniform_lengths(rng, input_len, range_ratio, num_prompts)
    outputs = uniform_lengths(rng, output_len, range_ratio, num_prompts)
    return [BenchRequest(draw_tokens(rng, vocab_size, int(i)), int(o)) for i, o in zip(inputs, outputs)]


def shared_prefix_dataset(rng: np.random.Generator, vocab_size: int, num_prompts: int, prefix_len: int,
                          suffix_len: int, num_groups: int, output_len: int) -> list[BenchRequest]:
    """Request i belongs to group i % num_groups, so the groups interleave in arrival order."""
    prefixes = [draw_tokens(rng, vocab_size, prefix_len) for _ in range(num_groups)]
    return [BenchRequest(prefixes[i % num_groups] + draw_tokens(rng, vocab_size, suffix_len), output_len)
            for i in range(num_prompts)]


def mixed_dataset(rng: np.random.Generator, vocab_size: int, num_prompts: int, long_fraction: float,
                  long_len: int, short_min_len: int, short_max_len: int,
                  output_len: int) -> list[BenchRequest]:
    """Exactly round(num_prompts * long_fraction) long prompts, at seeded random positions."""
    is_long = np.zeros(num_prompts, dtype=bool)
    is_long[rng.choice(num_prompts, round(num_prompts * long_fraction), replace=False)] = True
    lengths = np.where(is_long, long_len, rng.integers(short_min_len, short_max_len + 1, size=num_prompts))
    return [BenchRequest(draw_tokens(rng, vocab_size, int(n)), output_len) for n in lengths]


def build_dataset(args: argparse.Namespace, vocab_size: int) -> list[BenchRequest]:
    rng = np.random.default_rng([args.seed, 0])  # the arrivals draw from their own stream
    n = args.num_prompts
    if args.dataset == "random":
        return random_dataset(rng, vocab_size, n, args.random_input_len, args.output_len,
                              args.random_range_ratio)
    if args.dataset == "shared-prefix":
        return shared_prefix_dataset(rng, vocab_size, n, args.prefix_len, args.suffix_len, args.num_groups,
                                     args.output_len)
    return mixed_dataset(rng, vocab_size, n, args.long_fraction, args.long_len, args.short_min_len,
                         args.short_max_len, args.output_len)


def arrival_offsets(num: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds after the start at which each request is due; the first at 0. The gaps are
    gamma distributed with shape `burstiness` and mean 1/rate: 1 is a Poisson process,
    below 1 burstier, above 1 more regular. An infinite rate sends everything at once."""
    if math.isinf(rate):
        return np.zeros(num)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


# ------------------------------------------------------------------------------ statistics

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


# ------------------------------------------------------------------------------ client

def completion_payload(model: str | None, prompt_ids: list[int], max_tokens: int) -> dict:
    # return_token_ids: a token whose text the server holds back (part of a UTF-8
    # character) still arrives as a chunk, so ITL sees every token.
    payload = {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    return payload if model is None else {"model": model, **payload}


async def stream_completion(client: httpx.AsyncClient, payload: dict, record: RequestRecord) -> None:
    """Send one streamed completion and fill `record` in; failures go to `record.error`."""
    record.sent = time.perf_counter()
    ended = False
    try:
        async with client.stream("POST", "/v1/completions", json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {body[:300]}"
                return
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    ended = True
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = f"error event: {json.dumps(event['error'])[:300]}"
                    return
                choices = event.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("token_ids")):
                    record.chunk_times.append(now)
                if choices and choices[0].get("finish_reason"):
                    ended = True
                if usage := event.get("usage"):
                    record.usage_tokens = usage.get("completion_tokens")
                    record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        record.finished = time.perf_counter()
        if not ended:
            record.error = "the stream ended without a finish reason or [DONE]"
        elif not record.chunk_times:
            record.error = "the stream carried no tokens"
    except (httpx.HTTPError, httpx.StreamError, ValueError, TypeError, AttributeError) as exc:
        # A broken response (transport, malformed SSE or JSON) fails this request, not the run.
        record.error = f"{type(exc).__name__}: {exc}"


def make_client(base_url: str, api_key: str | None, timeout: float) -> httpx.AsyncClient:
    # trust_env=False: a proxy from the environment must not sit between us and 127.0.0.1.
    return httpx.AsyncClient(
        base_url=base_url, timeout=httpx.Timeout(timeout), trust_env=False,
        headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def served_model(client: httpx.AsyncClient) -> str | None:
    """The first model of /v1/models, or None (the request then names no model)."""
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
        response = await client.get("/v1/models")
        if response.status_code == 200:
            return response.json()["data"][0]["id"]
    return None


async def warm_up(client: httpx.AsyncClient, model: str | None, base_url: str) -> None:
    """One small request outside the measurement; it must succeed before anything is timed."""
    prompt = list(range(FIRST_TOKEN_ID, FIRST_TOKEN_ID + OVERHEAD_PROMPT_LEN))
    record = RequestRecord(len(prompt), 4)
    await stream_completion(client, completion_payload(model, prompt, 4), record)
    if not record.ok:
        raise BenchError(f"the warm-up request to {base_url}/v1/completions failed: {record.error}. "
                         "Check that the server is up and serves an OpenAI-compatible completions API.")


class Progress:
    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.every = max(1, total // 10)

    def tick(self) -> None:
        self.done += 1
        if self.done % self.every == 0 or self.done == self.total:
            print(f"  {self.label}: {self.done}/{self.total} requests done", file=sys.stderr, flush=True)


class LoadRun(NamedTuple):
    records: list[RequestRecord]
    started: float  # time.perf_counter() when the first request was due
    duration_s: float  # until the last stream ended


async def run_load(base_url: str, requests: Sequence[BenchRequest], offsets: np.ndarray,
                   max_concurrency: int | None, api_key: str | None, timeout: float,
                   label: str) -> LoadRun:
    """Send each request at its offset, then through the concurrency gate, after one
    warm-up request."""
    async with make_client(base_url, api_key, timeout) as client:
        model = await served_model(client)
        await warm_up(client, model, base_url)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
        progress = Progress(label, len(requests))
        records = [RequestRecord(len(r.prompt_ids), r.output_len, float(due)) for r, due in
                   zip(requests, offsets)]

        async def one(request: BenchRequest, record: RequestRecord) -> None:
            await asyncio.sleep(max(0.0, started + record.due - time.perf_counter()))
            async with gate:
                await stream_completion(client, completion_payload(model, request.prompt_ids,
                                                                   request.output_len), record)
            progress.tick()

        started = time.perf_counter()
        await asyncio.gather(*(one(r, rec) for r, rec in zip(requests, records)))
        return LoadRun(records, started, time.perf_counter() - started)


def record_json(record: RequestRecord, started: float) -> dict:
    out = {"prompt_len": record.prompt_len, "max_tokens": record.max_tokens, "due_s": record.due,
           "output_tokens": record.output_tokens, "cached_tokens": record.cached_tokens,
           "success": record.ok, "error": record.error}
    if record.ok:
        out.update(sent_s=record.sent - started, ttft_ms=1000 * record.ttft, e2el_ms=1000 * record.e2el,
                   tpot_ms=None if record.tpot is None else 1000 * record.tpot,
                   itl_ms=[1000 * gap for gap in record.itls])
    return out


# ------------------------------------------------------------------------------ server

def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def with_defaults(server_args: list[str], defaults: dict[str, str | None]) -> list[str]:
    """`server_args` plus each default flag they do not set themselves."""
    present = {arg.split("=", 1)[0] for arg in server_args if arg.startswith("--")}
    return server_args + [item for flag, value in defaults.items()
                          if value is not None and flag not in present for item in (flag, value)]


def default_serve_command() -> str:
    script = Path(sys.executable).with_name("pdserve")
    return shlex.join([str(script) if script.exists() else "pdserve", "serve"])


def output_tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


@contextlib.contextmanager
def launched_server(args: argparse.Namespace, server_args: str) -> Iterator[str]:
    """Start the server with `server_args` on free ports, wait for /health, yield its base
    URL; stop it (SIGINT, then SIGKILL for its whole process group) when the block ends."""
    port, grpc_port = free_ports(2)
    extra = with_defaults(shlex.split(server_args),
                          {"--model": args.model, "--host": "127.0.0.1", "--api-key": args.api_key})
    command = shlex.split(args.serve_command) + extra + ["--port", str(port), "--grpc-port", str(grpc_port)]
    base_url = f"http://127.0.0.1:{port}"
    # The output is kept only when something went wrong (the path is printed).
    with tempfile.NamedTemporaryFile("wb", prefix="pdserve-bench-", suffix=".log", delete=False) as log:
        print(f"starting: {shlex.join(command)}\n  (output: {log.name})", file=sys.stderr, flush=True)
        try:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise BenchError(f"cannot run {command[0]!r} ({exc}); point --serve-command at the "
                             "command that starts the server") from exc
        try:
            wait_healthy(process, base_url, args.server_timeout, log.name)
            yield base_url
        finally:
            stop_server(process, args.server_stop_timeout)
    os.unlink(log.name)


def wait_healthy(process: subprocess.Popen, base_url: str, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise BenchError(f"the server exited with code {process.returncode} before {base_url}/health "
                             f"answered; its output ({log_path}) ends with:\n{output_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/health", timeout=2.0, trust_env=False).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise BenchError(f"the server was not healthy within {timeout:g} s (raise --server-timeout); "
                             f"its output ({log_path}) ends with:\n{output_tail(log_path)}")
        time.sleep(0.5)


def stop_server(process: subprocess.Popen, grace: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"the server ignored SIGINT for {grace:g} s; killing it", file=sys.stderr)
    # The server ran in its own session: whatever is left of its group (helpers it
    # started) belongs to this run and must not load the next one.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def target(args: argparse.Namespace, server_args: str | None) -> Iterator[str]:
    if server_args is None:
        yield args.base_url.rstrip("/")
    else:
        with launched_server(args, server_args) as base_url:
            yield base_url


# ------------------------------------------------------------------------------ report

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


# ------------------------------------------------------------------------------ http overhead

async def gateway_ttfts(args: argparse.Namespace, base_url: str, prompts: list[list[int]]) -> list[float]:
    async with make_client(base_url, args.api_key, args.request_timeout) as client:
        model = await served_model(client)
        ttfts = []
        for prompt in prompts:
            record = RequestRecord(len(prompt), 1)
            await stream_completion(client, completion_payload(model, prompt, 1), record)
            if not record.ok:
                raise BenchError(f"a request to {base_url}/v1/completions failed: {record.error}")
            ttfts.append(record.ttft)
        return ttfts


def engine_ttfts(model: str, prompts: list[list[int]]) -> list[float]:
    """TTFT of each prompt, one at a time, through an AsyncEngine in this process."""
    import torch

    from pdserve.decode_worker.async_engine import AsyncEngine
    from pdserve.decode_worker.engine import EngineCore
    from pdserve.runtime.loader import load_model
    from pdserve.runtime.sampling_params import SamplingParams

    torch.set_num_threads(1)
    loaded = load_model(model)
    engine = AsyncEngine(EngineCore(loaded.runner, loaded.info))
    params = SamplingParams(max_tokens=1, temperature=0.0)

    async def one(prompt: list[int]) -> float:
        started, first = time.perf_counter(), None
        async for chunk in engine.generate(prompt, params):
            if chunk.token_ids and first is None:
                first = time.perf_counter()
        if first is None:
            raise BenchError("the in-process engine finished a request without a token")
        return first - started

    async def all_in_order() -> list[float]:
        return [await one(prompt) for prompt in prompts]

    try:
        return asyncio.run(all_in_order())
    finally:
        engine.shutdown()


def http_overhead(args: argparse.Namespace, vocab_size: int, server_args: str | None) -> dict:
    rng = np.random.default_rng([args.seed, 2])
    # One more prompt than measured: the first of each side warms it up and is dropped.
    prompts = [draw_tokens(rng, vocab_size, OVERHEAD_PROMPT_LEN) for _ in range(args.overhead_requests + 1)]
    with target(args, server_args) as base_url:  # stopped before the engine loads: no contention
        gateway = asyncio.run(gateway_ttfts(args, base_url, prompts))[1:]
    engine = engine_ttfts(args.model, prompts)[1:]
    g, e = 1000 * float(np.median(gateway)), 1000 * float(np.median(engine))
    print(f"TTFT of a {OVERHEAD_PROMPT_LEN}-token prompt, max_tokens 1, median of "
          f"{args.overhead_requests} sequential requests:")
    print(f"  through the gateway (HTTP)   {g:8.2f} ms")
    print(f"  in-process AsyncEngine       {e:8.2f} ms")
    print(f"  gateway overhead             {g - e:+8.2f} ms ({g / e:.2f}x)")
    return {"gateway_ttft_ms": [1000 * t for t in gateway], "engine_ttft_ms": [1000 * t for t in engine],
            "gateway_median_ms": g, "engine_median_ms": e, "overhead_ms": g - e, "ratio": g / e}


# ------------------------------------------------------------------------------ main

def _slo_ms(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"an SLO is a positive number of ms or 'none', got {text}")
    return value


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--launch", metavar="ARGS", help="start `pdserve serve ARGS` for the run")
    where.add_argument("--compare", nargs="*", metavar="ARGS",
                       help="two quoted `pdserve serve` argument strings, run one after the other; "
                       f"alone: {' vs '.join(repr(a) for a in DEFAULT_COMPARE)}")
    p.add_argument("--labels", nargs=2, help="names of the two --compare servers")
    p.add_argument("--model", default=DEFAULT_MODEL, help="sets the vocabulary; passed to launched servers")
    p.add_argument("--api-key", help="sent as a bearer token; passed to launched servers")
    p.add_argument("--serve-command", default=default_serve_command(), help="what --launch runs")
    p.add_argument("--server-timeout", type=float, default=300.0, help="s to wait for /health")
    p.add_argument("--server-stop-timeout", type=float, default=30.0, help="s from SIGINT to SIGKILL")
    p.add_argument("--request-timeout", type=float, default=600.0, help="s per request")
    p.add_argument("--dataset", choices=("random", "shared-prefix", "mixed"), default="random", help="workload")
    p.add_argument("--num-prompts", type=_positive(int), default=100, help="requests per run")
    p.add_argument("--seed", type=int, default=0, help="fixes the prompts and the arrival schedule")
    p.add_argument("--random-output-len", "--output-len", dest="output_len", type=_positive(int), default=64,
                   help="output tokens per request (every dataset)")
    p.add_argument("--random-input-len", type=_positive(int), default=256, help="random: prompt tokens")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random: input and output lengths uniform in [L*(1-r), L*(1+r)]")
    p.add_argument("--prefix-len", type=_positive(int), default=1024, help="shared-prefix: common tokens")
    p.add_argument("--suffix-len", type=_positive(int), default=64, help="shared-prefix: own tokens")
    p.add_argument("--num-groups", type=_positive(int), default=8, help="shared-prefix: distinct prefixes")
    p.add_argument("--long-fraction", type=float, default=0.2, help="mixed: share of long prompts")
    p.add_argument("--long-len", type=_positive(int), default=1500, help="mixed: long prompt tokens")
    p.add_argument("--short-min-len", type=_positive(int), default=64, help="mixed: short prompt tokens, min")
    p.add_argument("--short-max-len", type=_positive(int), default=256, help="mixed: short prompt tokens, max")
    p.add_argument("--request-rate", type=_positive(float), default=math.inf, help="req/s; inf: all at once")
    p.add_argument("--burstiness", type=_positive(float), default=1.0, help="1: Poisson; gamma otherwise")
    p.add_argument("--max-concurrency", type=_positive(int), help="requests in flight at most")
    p.add_argument("--slo-ttft-ms", type=_slo_ms, default=2000.0, help="'none' to drop")
    p.add_argument("--slo-tpot-ms", type=_slo_ms, default=100.0, help="'none' to drop")
    p.add_argument("--slo-e2el-ms", type=_slo_ms, default=None, help="E2E latency SLO")
    p.add_argument("--target-itl-ratio", type=float, default=0.5, help="--compare: p99 ITL A/B at most")
    p.add_argument("--target-goodput-ratio", type=float, default=1.3, help="--compare: goodput A/B at least")
    p.add_argument("--http-overhead", action="store_true", help="measure the gateway's TTFT overhead only")
    p.add_argument("--overhead-requests", type=_positive(int), default=20, help="--http-overhead: per side")
    p.add_argument("--result-json", metavar="PATH", help="write the config, metrics and per-request records")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare is not None:
        if not args.compare:
            args.compare = list(DEFAULT_COMPARE)
            args.labels = args.labels or list(DEFAULT_COMPARE_LABELS)
        if len(args.compare) != 2:
            parser.error(f"--compare takes two quoted server argument strings, got {len(args.compare)}")
        args.labels = args.labels or ["A", "B"]
        if args.http_overhead:
            parser.error("--http-overhead measures one server: use --base-url or --launch")
    if not 0 <= args.random_range_ratio < 1:
        parser.error(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    if not 0 <= args.long_fraction <= 1:
        parser.error(f"--long-fraction must be in [0, 1], got {args.long_fraction}")
    if args.short_min_len > args.short_max_len:
        parser.error("--short-min-len must not exceed --short-max-len")
    return args


def vocab_size(model: str) -> int:
    """The model's vocabulary size, read from its checkpoint's metadata (no weights)."""
    from pdserve.runtime.weights import load_checkpoint

    try:
        return load_checkpoint(model).config.vocab_size
    except ValueError as exc:  # CheckpointError and ConfigError say what is wrong
        raise BenchError(f"cannot read the vocabulary of --model {model!r}: {exc}") from exc


def describe_workload(args: argparse.Namespace, requests: list[BenchRequest]) -> str:
    lengths = [len(r.prompt_ids) for r in requests]
    outputs = [r.output_len for r in requests]
    arrivals = ("all at once" if math.isinf(args.request_rate) else
                f"{'Poisson' if args.burstiness == 1 else f'gamma (burstiness {args.burstiness:g})'} "
                f"at {args.request_rate:g} req/s")
    return (f"{args.dataset}: {len(requests)} prompts of {min(lengths)}-{max(lengths)} tokens "
            f"(mean {np.mean(lengths):.0f}), {min(outputs)}-{max(outputs)} output tokens; arrivals "
            f"{arrivals}, max concurrency {args.max_concurrency or 'none'}")


def json_safe(value: object) -> object:
    """`value` with infinite and NaN floats as strings: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def run_all(args: argparse.Namespace, vocab: int) -> dict:
    requests = build_dataset(args, vocab)
    offsets = arrival_offsets(len(requests), args.request_rate, args.burstiness,
                              np.random.default_rng([args.seed, 1]))
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2el_ms)
    print(describe_workload(args, requests), flush=True)
    if args.compare is not None:
        targets = list(zip(args.labels, args.compare))
    else:
        targets = [("run", args.launch)]
    runs, metrics = [], []
    for label, server_args in targets:
        with target(args, server_args) as base_url:
            run = asyncio.run(run_load(base_url, requests, offsets, args.max_concurrency, args.api_key,
                                       args.request_timeout, label))
        m = compute_metrics(run.records, run.duration_s, slo)
        print_run(label, m, slo)
        for error in sorted({r.error for r in run.records if r.error})[:3]:
            print(f"  failure: {error}")
        metrics.append(m)
        runs.append({"label": label, "server_args": server_args, "base_url": base_url, "metrics": m.to_json(),
                     "requests": [record_json(r, run.started) for r in run.records]})
    result = {"runs": runs}
    if args.compare is not None:
        rows = comparison(args.labels, *metrics, args.target_itl_ratio, args.target_goodput_ratio)
        print_comparison(args.labels, rows)
        result["comparison"] = {"labels": list(args.labels), "ratios": rows}
    return result


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the `with` that stops a launched server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        vocab = vocab_size(args.model)
        if args.http_overhead:
            result = {"http_overhead": http_overhead(args, vocab, args.launch)}
        else:
            result = run_all(args, vocab)
    except BenchError as exc:
        print(f"serving.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("serving.py: interrupted", file=sys.stderr)
        return 130
    if args.result_json:
        result = {"config": vars(args), "vocab_size": vocab, "cpus": os.cpu_count(), **result}
        Path(args.result_json).write_text(json.dumps(json_safe(result), indent=1, allow_nan=False))
        print(f"wrote {args.result_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
