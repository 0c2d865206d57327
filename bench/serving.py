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
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

# The benchmark's parts. `serving` also re-exports those of their names it does not use
# itself (hence noqa: F401), so that `serving.X` reaches every part, as the tests do.
from serving_client import completion_payload, run_load, stream_completion  # noqa: F401
from serving_launch import default_serve_command, target, with_defaults  # noqa: F401
from serving_overhead import http_overhead
from serving_stats import RequestRecord, RunMetrics, Slo, compute_metrics, describe, record_json  # noqa: F401
from serving_workload import (  # noqa: F401
    FIRST_TOKEN_ID,
    BenchError,
    arrival_offsets,
    build_dataset,
    describe_workload,
    mixed_dataset,
    random_dataset,
    shared_prefix_dataset,
)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_COMPARE = ("--prefill-workers 1 --decode-workers 1", "--colocated --decode-workers 2")
DEFAULT_COMPARE_LABELS = ("disagg", "colocated")


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


# ------------------------------------------------------------------------------ main

def slo_ms(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"an SLO is a positive number of ms or 'none', got {text}")
    return value


def positive(kind: type) -> Callable[[str], float]:
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
    p.add_argument("--num-prompts", type=positive(int), default=100, help="requests per run")
    p.add_argument("--seed", type=int, default=0, help="fixes the prompts and the arrival schedule")
    p.add_argument("--random-output-len", "--output-len", dest="output_len", type=positive(int), default=64,
                   help="output tokens per request (every dataset)")
    p.add_argument("--random-input-len", type=positive(int), default=256, help="random: prompt tokens")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random: input and output lengths uniform in [L*(1-r), L*(1+r)]")
    p.add_argument("--prefix-len", type=positive(int), default=1024, help="shared-prefix: common tokens")
    p.add_argument("--suffix-len", type=positive(int), default=64, help="shared-prefix: own tokens")
    p.add_argument("--num-groups", type=positive(int), default=8, help="shared-prefix: distinct prefixes")
    p.add_argument("--long-fraction", type=float, default=0.2, help="mixed: share of long prompts")
    p.add_argument("--long-len", type=positive(int), default=1500, help="mixed: long prompt tokens")
    p.add_argument("--short-min-len", type=positive(int), default=64, help="mixed: short prompt tokens, min")
    p.add_argument("--short-max-len", type=positive(int), default=256, help="mixed: short prompt tokens, max")
    p.add_argument("--request-rate", type=positive(float), default=math.inf, help="req/s; inf: all at once")
    p.add_argument("--burstiness", type=positive(float), default=1.0, help="1: Poisson; gamma otherwise")
    p.add_argument("--max-concurrency", type=positive(int), help="requests in flight at most")
    p.add_argument("--slo-ttft-ms", type=slo_ms, default=2000.0, help="'none' to drop")
    p.add_argument("--slo-tpot-ms", type=slo_ms, default=100.0, help="'none' to drop")
    p.add_argument("--slo-e2el-ms", type=slo_ms, default=None, help="E2E latency SLO")
    p.add_argument("--target-itl-ratio", type=float, default=0.5, help="--compare: p99 ITL A/B at most")
    p.add_argument("--target-goodput-ratio", type=float, default=1.3, help="--compare: goodput A/B at least")
    p.add_argument("--http-overhead", action="store_true", help="measure the gateway's TTFT overhead only")
    p.add_argument("--overhead-requests", type=positive(int), default=20, help="--http-overhead: per side")
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


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the `with` that stops a launched server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
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
