"""bench/autoscale.py's server arguments for each autoscaling mode (the bench itself runs
servers; this checks only what it would start them with)."""

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))  # its parts import as top-level modules

import autoscale

from pdserve.cluster.benchmark.workload import BenchError
from pdserve.cluster.cli import build_parser


def _bench_args(argv: list[str]):
    return autoscale.build_parser().parse_args(argv)


def _parsed(bench_argv: list[str]):
    """The `pdserve serve` arguments the bench gives its autoscaled cluster, parsed."""
    return build_parser().parse_args(["serve", *autoscale.autoscale_args(_bench_args(bench_argv)).split()])


def test_queue_mode_scales_by_queue_depth():
    serve = _parsed([])
    assert serve.autoscale == "queue" and serve.ttft_slo is None
    assert (serve.min_prefill, serve.max_prefill, serve.min_decode, serve.max_decode) == (1, 2, 1, 2)


def test_slo_mode_runs_the_planner_at_the_benchs_own_targets():
    serve = _parsed(["--autoscale-mode", "slo", "--slo-ttft-ms", "1500", "--slo-tpot-ms", "80"])
    assert serve.autoscale == "slo"
    assert (serve.ttft_slo, serve.tpot_slo) == (1.5, 0.08)
    with pytest.raises(BenchError, match="needs --slo-ttft-ms"):
        autoscale.autoscale_args(_bench_args(["--autoscale-mode", "slo", "--slo-ttft-ms", "none"]))
