"""bench/autoscale.py's server arguments for each autoscaling mode, and how it reads the
autoscaler's decisions off its /metrics samples (the bench itself runs servers; this checks
only what it would start them with and what it would report)."""

import sys
from pathlib import Path
from types import SimpleNamespace

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


def test_min_prefill_zero_lets_the_autoscaler_drain_the_prefill_worker():
    serve = _parsed(["--autoscale-mode", "slo", "--min-prefill", "0", "--max-prefill", "1", "--max-decode", "1"])
    assert (serve.min_prefill, serve.max_prefill, serve.min_decode, serve.max_decode) == (0, 1, 1, 1)


def _measured(counts: list[tuple[float, dict[str, int]]]) -> autoscale.Measured:
    """An autoscaled run whose /metrics reads at t s (the load started at 100) showed
    these decision counters."""
    samples = [autoscale.Sample(100.0 + t, {}, {"prefill up": 0, "prefill down": 0, "decode up": 0,
                                                "decode down": 0} | c, {}, {}) for t, c in counts]
    return autoscale.Measured("autoscaled", "", SimpleNamespace(started=100.0), samples, 0)


def test_decisions_step_responses_and_flaps_from_the_counters():
    m = _measured([(0.0, {}), (3.0, {"prefill up": 1}), (4.0, {"prefill up": 1}),
                   (30.0, {"prefill up": 1, "prefill down": 1}), (32.0, {"prefill up": 2, "prefill down": 1}),
                   (33.0, {"prefill up": 2, "prefill down": 1, "decode up": 2})])
    made = autoscale.decisions(m)
    assert [(d.at, d.role, d.direction) for d in made] == [
        (3.0, "prefill", "up"), (30.0, "prefill", "down"), (32.0, "prefill", "up"),
        (33.0, "decode", "up"), (33.0, "decode", "up")]
    responses = autoscale.step_responses(made, [("burst", 0.0), ("chats", 10.0), ("end", 40.0)])
    assert [(r["decision"], r["delay_s"]) for r in responses] == [("prefill up", 3.0), ("prefill down", 20.0),
                                                                  (None, None)]
    # down 27 s after the up is allowed (down delay 20); up 2 s after the down is not (cooldown 5)
    args = _bench_args(["--autoscale-down-delay", "20", "--autoscale-up-cooldown", "5"])
    [flap] = autoscale.flaps(made, args)
    assert flap["role"] == "prefill" and (flap["first"]["at"], flap["then"]["at"]) == (30.0, 32.0)
    assert autoscale.flaps(made, _bench_args(["--autoscale-down-delay", "30", "--autoscale-up-cooldown", "1"])) \
        == [{"role": "prefill", "first": made[0]._asdict(), "then": made[1]._asdict()}]
