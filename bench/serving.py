"""Online serving benchmark: an OpenAI-compatible endpoint driven over HTTP, as `vllm bench serve`.

Every request is streamed (SSE) and greedy; `max_tokens` is its output length, and the
server's flavour of extra fields (`ignore_eos`, and `min_tokens` for vLLM) makes every
request produce exactly that many tokens. Per run it reports TTFT, TPOT, ITL and E2E
latency (mean, p50, p90, p99), request / output-token / total-token throughput, goodput
(requests per second that meet every SLO) and the failed requests.

Definitions (those of `vllm bench serve`): a request's clock starts when it is sent, after
any --max-concurrency wait. TTFT is the arrival of the first chunk with content (text, chat
content or token ids: requests ask for `return_token_ids`); ITL is every gap between
successive such chunks; E2E ends with the stream; TPOT = (E2E - TTFT) / (output tokens - 1)
over requests with more than one output token, the count coming from the final `usage`
(stream_options.include_usage). For goodput a one-token request's TPOT is 0. Percentiles
interpolate linearly; ITL percentiles pool the gaps of all requests.

Workloads. --dataset sends token-id prompts to /v1/completions: `random` (input and output
lengths uniform in [L*(1-r), L*(1+r)]), `shared-prefix` (request i extends group i % G's
common prefix with its own suffix), `mixed` (a --long-fraction of --long-len prompts, the
rest --short-min-len..--short-max-len). --workload sends chats to /v1/chat/completions
(serving_chat.py): `short-chats` (32 short questions, 64 output tokens, concurrency 8) and
`mixed` (24 chats, a quarter of them ~1,500-token notes, the same otherwise).
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
bench/results/ unless --result-json says where; an existing file is never overwritten. The
exit status is 0 when every pdserve request succeeded, whatever the peer did.

    python bench/serving.py --launch --workload short-chats --peer-url http://127.0.0.1:8100
    python bench/serving.py --url http://127.0.0.1:8000 --workload mixed --peer-url http://127.0.0.1:8100
    python bench/serving.py --launch "--prefill-workers 1 --decode-workers 1" --dataset mixed
    python bench/serving.py --compare --labels disagg colocated --dataset mixed --request-rate 1
    python bench/serving.py --launch="--colocated" --http-overhead
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

# The benchmark's parts. `serving` also re-exports those of their names it does not use
# itself (hence noqa: F401), so that `serving.X` reaches every part, as the tests and
# bench/autoscale.py do.
from serving_chat import PRESETS, ChatRequest, CountTokens, chat_dataset, chat_warmups  # noqa: F401
from serving_cli import DEFAULT_COMPARE, DEFAULT_MODEL, build_parser, parse_args, positive, slo_ms  # noqa: F401
from serving_client import (  # noqa: F401
    FLAVORS,
    completion_payload,
    pdserve_extras,
    request_payload,
    run_load,
    stream_completion,
)
from serving_launch import default_serve_command, target, with_defaults  # noqa: F401
from serving_overhead import http_overhead
from serving_peer import PeerStatus, peer_comparison, print_peer_comparison, probe_peer
from serving_report import (  # noqa: F401
    RESULTS_DIR,
    comparison,
    fmt,
    fmt_ratio,
    json_safe,
    print_comparison,
    print_run,
    ratio,
    write_result,
)
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
    token_warmups,
)


class ModelInfo(NamedTuple):
    vocab_size: int
    count_tokens: CountTokens  # a chat's prompt length under the model's chat template


def model_info(model: str) -> ModelInfo:
    """The model's vocabulary size and token counter, from its checkpoint's metadata (no weights)."""
    from pdserve.runtime.weights import load_checkpoint

    try:
        checkpoint = load_checkpoint(model)
    except ValueError as exc:  # CheckpointError and ConfigError say what is wrong
        raise BenchError(f"cannot read the tokenizer of --model {model!r}: {exc}") from exc
    tokenizer = checkpoint.tokenizer
    return ModelInfo(checkpoint.config.vocab_size, lambda messages: len(tokenizer.encode_chat(messages)))


def vocab_size(model: str) -> int:
    return model_info(model).vocab_size


class Workload(NamedTuple):
    name: str
    requests: list  # BenchRequest or ChatRequest, in sending order
    warmups: list

    def fingerprint(self) -> str:
        """sha256 of every request's prompt and output length, in order: equal on both sides."""
        body = json.dumps([[r.prompt_body(), r.output_len] for r in self.requests], sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()


def build_workload(args: argparse.Namespace, info: ModelInfo) -> Workload:
    if args.workload:
        rng = np.random.default_rng([args.seed, 0])  # the arrivals draw from their own stream
        requests = chat_dataset(rng, args.num_prompts, args.long_fraction, args.long_len, args.output_len,
                                info.count_tokens)
        return Workload(args.workload, requests, chat_warmups(args.warmup_requests, info.count_tokens))
    return Workload(args.dataset, build_dataset(args, info.vocab_size), token_warmups(args.warmup_requests))


class Side(NamedTuple):
    """One measured server: its JSON entry and metrics."""

    entry: dict
    metrics: RunMetrics


def measure(args: argparse.Namespace, label: str, base_url: str, workload: Workload, offsets: np.ndarray,
            slo: Slo, extras=pdserve_extras, api_key: str | None = None) -> Side:
    run = asyncio.run(run_load(base_url, workload.requests, offsets, args.max_concurrency, api_key,
                               args.request_timeout, label, extras=extras, warmups=workload.warmups))
    m = compute_metrics(run.records, run.duration_s, slo)
    print_run(label, m, slo)
    for error in sorted({r.error for r in run.records if r.error})[:3]:
        print(f"  failure: {error}")
    return Side({"label": label, "base_url": base_url, "metrics": m.to_json(),
                 "requests": [record_json(r, run.started) for r in run.records]}, m)


def run_peer(args: argparse.Namespace, peer: PeerStatus, workload: Workload, offsets: np.ndarray,
             slo: Slo) -> tuple[Side | None, str | None]:
    """The peer's run, or None and why not (printed again here, after pdserve's long run);
    never raises BenchError: pdserve's numbers stand."""
    if not peer.available:
        print(peer.problem)
        return None, peer.problem
    try:
        side = measure(args, args.peer_name, peer.url, workload, offsets, slo, FLAVORS[args.peer_flavor],
                       args.peer_api_key)
    except BenchError as exc:
        problem = (f"The peer {peer.name!r} answered /v1/models but its run failed: {exc} (A refused field "
                   f"means another --peer-flavor: {', '.join(sorted(FLAVORS))}.) Reporting pdserve alone.")
        print(problem)
        return None, problem
    side.entry.update(side="peer", model=peer.model, flavor=args.peer_flavor)
    return side, None


def run_all(args: argparse.Namespace, info: ModelInfo) -> dict:
    workload = build_workload(args, info)
    offsets = arrival_offsets(len(workload.requests), args.request_rate, args.burstiness,
                              np.random.default_rng([args.seed, 1]))
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2el_ms)
    print(describe_workload(args, workload.requests), flush=True)
    peer = probe_peer(args.peer_name, args.peer_url, args.peer_api_key) if args.peer_url else None
    if peer is not None:
        print(peer.problem or f"peer {peer.name!r}: {peer.url}, model {peer.model!r} (runs after pdserve)",
              flush=True)
    targets = list(zip(args.labels, args.compare)) if args.compare is not None else [("pdserve", args.launch)]
    sides = []
    for label, server_args in targets:
        with target(args, server_args) as base_url:
            side = measure(args, label, base_url, workload, offsets, slo, api_key=args.api_key)
        side.entry.update(side="pdserve", server_args=server_args)
        sides.append(side)
    result = {"workload": {"name": workload.name, "requests": len(workload.requests),
                           "sha256": workload.fingerprint()}, "runs": [s.entry for s in sides]}
    if args.compare is not None:
        rows = comparison(args.labels, *(s.metrics for s in sides), args.target_itl_ratio,
                          args.target_goodput_ratio)
        print_comparison(args.labels, rows)
        result["comparison"] = {"labels": list(args.labels), "ratios": rows}
    if peer is not None:
        peer_side, problem = run_peer(args, peer, workload, offsets, slo)
        result["peer"] = {"name": peer.name, "url": peer.url, "model": peer.model, "flavor": args.peer_flavor,
                          "ran": peer_side is not None, "problem": problem}
        if peer_side is not None:
            result["runs"].append(peer_side.entry)
            result["peer_comparison"] = []
            for side in sides:
                rows = peer_comparison(side.metrics, peer_side.metrics)
                print_peer_comparison(side.entry["label"], peer.name, rows)
                result["peer_comparison"].append({"labels": [side.entry["label"], peer.name], "ratios": rows})
        else:
            print(f"pdserve alone: no comparison with {peer.name!r} in this run.")
    return result


def default_result_path(args: argparse.Namespace) -> Path:
    name = "http_overhead" if args.http_overhead else args.workload or args.dataset
    peer = f"_vs_{args.peer_name}" if args.peer_url else ""
    return RESULTS_DIR / f"serving_{name}{peer}.json"


def pdserve_failures(result: dict) -> int:
    return sum(run["metrics"]["failed"] for run in result.get("runs", []) if run.get("side") == "pdserve")


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the `with` that stops a launched server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        info = model_info(args.model)
        if args.http_overhead:
            result = {"http_overhead": http_overhead(args, info.vocab_size, args.launch)}
        else:
            result = run_all(args, info)
    except BenchError as exc:
        print(f"serving.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("serving.py: interrupted", file=sys.stderr)
        return 130
    result = {"config": vars(args), "vocab_size": info.vocab_size, "cpus": os.cpu_count(), **result}
    path = write_result(Path(args.result_json) if args.result_json else default_result_path(args), result)
    print(f"wrote {path}")
    if failed := pdserve_failures(result):
        print(f"serving.py: {failed} pdserve request(s) failed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
