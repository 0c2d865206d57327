"""One serving benchmark run from parsed flags: the workload they describe, measured on
each server under test (--url, a --launch'ed pdserve, or both --compare configurations one
after the other) and then on the peer (--peer-url), all on the same schedule.

`run_all` returns the result (workload fingerprint, per-server metrics and per-request
records, ratios) and prints the tables; it raises BenchError when the server under test
cannot be measured, but never because of the peer: a peer that fails is reported as such.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from typing import NamedTuple

import numpy as np

from pdserve.cluster.benchmark.chat import CountTokens, chat_dataset, chat_warmups
from pdserve.cluster.benchmark.client import run_load
from pdserve.cluster.benchmark.flavors import FLAVORS, Extras
from pdserve.cluster.benchmark.launch import target
from pdserve.cluster.benchmark.peer import (
    PeerStatus,
    StartHint,
    generic_start_hint,
    peer_comparison,
    print_peer_comparison,
    probe_peer,
)
from pdserve.cluster.benchmark.report import comparison, print_comparison, print_run
from pdserve.cluster.benchmark.stats import RunMetrics, Slo, compute_metrics, record_json
from pdserve.cluster.benchmark.workload import (
    BenchError,
    arrival_offsets,
    build_dataset,
    describe_workload,
    token_warmups,
)


class ModelInfo(NamedTuple):
    vocab_size: int
    count_tokens: CountTokens  # a chat's prompt length under the model's chat template


def model_info(model: str) -> ModelInfo:
    """The model's vocabulary size and token counter, from its checkpoint's metadata and
    tokenizer (no weights are loaded)."""
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
            slo: Slo, extras: Extras, api_key: str | None = None) -> Side:
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
    """The peer's run, or None and why not (printed again here, after the long run of the
    server under test); never raises BenchError: the other server's numbers stand."""
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


def servers_under_test(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(label, `pdserve serve` arguments to launch, or None for --url) of each server to
    measure, in order."""
    if args.compare is not None:
        return list(zip(args.labels, args.compare))
    return [(args.flavor if args.base_url is not None else "pdserve", args.launch)]


def run_all(args: argparse.Namespace, info: ModelInfo, start_hint: StartHint = generic_start_hint) -> dict:
    """Measure every server of `args` on the same workload and schedule. In the result,
    `runs` lists the servers under test (side "pdserve": what --url, --launch or --compare
    name, whatever server that is) and then the peer (side "peer")."""
    workload = build_workload(args, info)
    offsets = arrival_offsets(len(workload.requests), args.request_rate, args.burstiness,
                              np.random.default_rng([args.seed, 1]))
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2el_ms)
    print(describe_workload(args, workload.requests), flush=True)
    peer = (probe_peer(args.peer_name, args.peer_url, args.peer_api_key, start_hint=start_hint)
            if args.peer_url else None)
    if peer is not None:
        print(peer.problem or f"peer {peer.name!r}: {peer.url}, model {peer.model!r} (runs after pdserve)",
              flush=True)
    sides = []
    for label, server_args in servers_under_test(args):
        with target(args, server_args) as base_url:
            side = measure(args, label, base_url, workload, offsets, slo, FLAVORS[args.flavor], args.api_key)
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
            result["peer_comparison"] = peer_ratios(sides, peer.name, peer_side)
        else:
            print(f"pdserve alone: no comparison with {peer.name!r} in this run.")
    return result


def peer_ratios(sides: list[Side], peer_name: str, peer_side: Side) -> list[dict]:
    """The ratios of each server under test to the peer, printed as tables."""
    out = []
    for side in sides:
        rows = peer_comparison(side.metrics, peer_side.metrics)
        print_peer_comparison(side.entry["label"], peer_name, rows)
        out.append({"labels": [side.entry["label"], peer_name], "ratios": rows})
    return out


def pdserve_failures(result: dict) -> int:
    """Failed requests of the servers under test (the peer's do not count)."""
    return sum(run["metrics"]["failed"] for run in result.get("runs", []) if run.get("side") == "pdserve")
