"""Online serving benchmark: an OpenAI-compatible endpoint driven over HTTP, as `vllm bench serve`.

Every request is streamed (SSE) and greedy; `max_tokens` is its output length, and the
server's flavour of extra fields (`ignore_eos`, and `min_tokens` for vLLM) makes every
request produce exactly that many tokens. Per run it reports TTFT, TPOT, ITL and E2E
latency (mean, p50, p90, p99), request / output-token / total-token throughput, goodput
(requests per second that meet every SLO) and the failed requests.

The implementation is the package pdserve.cluster.benchmark (the installed `pdserve bench
serve` runs the same code; its docstring has the metric definitions). This script adds
what needs a source checkout: bench/results/ as the default place of the JSON, the peer
script of ../shared/peers, and --http-overhead (which loads the engine in this process).

Workloads. --dataset sends token-id prompts to /v1/completions: `random` (input and output
lengths uniform in [L*(1-r), L*(1+r)]), `shared-prefix` (request i extends group i % G's
common prefix with its own suffix), `mixed` (a --long-fraction of --long-len prompts, the
rest --short-min-len..--short-max-len). --workload sends chats to /v1/chat/completions
(pdserve.cluster.benchmark.chat): `short-chats` (32 short questions, 64 output tokens,
concurrency 8) and `mixed` (24 chats, a quarter of them ~1,500-token notes, the same
otherwise).
Arrivals: all at once (--request-rate inf) or gamma-distributed gaps with mean 1/rate and
shape --burstiness (1 is Poisson), optionally capped by --max-concurrency requests in
flight; at rate inf that cap is a closed loop (the next request goes as one ends). The
requests and the schedule depend only on the flags and --seed, so runs compare.

Targets: --url for a running pdserve (`pdserve serve ...` started by hand), --launch ["ARGS"]
to start `pdserve serve ARGS` on free ports for the run, or --compare "ARGS_A" "ARGS_B" to
run the same requests on the same schedule against both and print the ratios A/B
(--compare alone: disaggregated vs colocated). A single-flag ARGS needs the = form:
--launch="--colocated". --peer-url adds another OpenAI-compatible server (vLLM from
../shared/peers/vllm-cpu.sh): after pdserve (a launched pdserve is stopped first, so the two
never share the CPU) it gets the same requests on the same schedule, and the output adds
the ratios pdserve/peer. Each server is warmed up first (--warmup-requests, not counted).
A peer that does not answer is reported as such and pdserve is reported alone.
--http-overhead instead compares the TTFT of a 16-token prompt through the gateway with the
same model's engine in this process.

Results: the tables on stdout, and a JSON file (config, metrics, per-request records) in
bench/results/ unless --result-json says where (--plot PATH draws it too); an existing file
is never overwritten. The exit status is 0 when every pdserve request succeeded, whatever
the peer did.

    python bench/serving.py --launch --workload short-chats --peer-url http://127.0.0.1:8100
    python bench/serving.py --url http://127.0.0.1:8000 --workload mixed --peer-url http://127.0.0.1:8100
    python bench/serving.py --launch "--prefill-workers 1 --decode-workers 1" --dataset mixed
    python bench/serving.py --compare --labels disagg colocated --dataset mixed --request-rate 1
    python bench/serving.py --launch="--colocated" --http-overhead
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving_overhead import http_overhead

from pdserve.cluster.benchmark import peer
from pdserve.cluster.benchmark.arguments import (
    DESCRIPTION,
    HelpFormatter,
    add_benchmark_flags,
    check_args,
    positive,
)
from pdserve.cluster.benchmark.command import run_command
from pdserve.cluster.benchmark.run import ModelInfo, run_all

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PEER_SCRIPT = "../shared/peers/vllm-cpu.sh"


def vllm_cpu_start_hint(port: int) -> str:
    return (f"To run vLLM's CPU backend as the peer: `{PEER_SCRIPT} setup` once (about 5 minutes), then "
            f"`{PEER_SCRIPT} serve {port}` in another shell; wait until it listens (it compiles the model "
            "first, about 3 minutes), then run this again.")


def probe_peer(name: str, url: str, api_key: str | None) -> peer.PeerStatus:
    """The package's probe, telling how to start this checkout's vLLM peer when none runs."""
    return peer.probe_peer(name, url, api_key, start_hint=vllm_cpu_start_hint)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
    add_benchmark_flags(p, result_json_default="a new file in bench/results/")
    p.add_argument("--http-overhead", action="store_true", help="measure the gateway's TTFT overhead only")
    p.add_argument("--overhead-requests", type=positive(int), default=20, help="--http-overhead: per side")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = check_args(parser, parser.parse_args(argv))
    if args.http_overhead:
        if args.compare is not None:
            parser.error("--http-overhead measures one server: use --url or --launch")
        if args.peer_url:
            parser.error("--http-overhead measures pdserve alone: drop --peer-url")
        if args.plot:
            parser.error("--plot draws a load run: --http-overhead has none")
    return args


def default_result_path(args: argparse.Namespace) -> Path:
    name = "http_overhead" if args.http_overhead else args.workload or args.dataset
    peer_suffix = f"_vs_{args.peer_name}" if args.peer_url else ""
    return RESULTS_DIR / f"serving_{name}{peer_suffix}.json"


def measure_overhead(args: argparse.Namespace, info: ModelInfo) -> dict:
    return {"http_overhead": http_overhead(args, info.vocab_size, args.launch)}


def measure_load(args: argparse.Namespace, info: ModelInfo) -> dict:
    return run_all(args, info, start_hint=vllm_cpu_start_hint)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result_path = Path(args.result_json) if args.result_json else default_result_path(args)
    return run_command(args, "serving.py", result_path, measure_overhead if args.http_overhead else measure_load)


if __name__ == "__main__":
    sys.exit(main())
