"""bench/goodput.py's arithmetic: targets fitted from unloaded requests, attainment, and
goodput read off a sweep (no server: the records are built here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))  # its parts import as top-level modules
import goodput

from pdserve.cluster.benchmark.stats import RequestRecord


def _record(prompt_len: int, ttft: float, e2e: float, tokens: int = 9, max_tokens: int = 9) -> RequestRecord:
    """Sent at 100 s; the first chunk after `ttft`, the stream ended after `e2e`."""
    return RequestRecord(prompt_len, max_tokens, sent=100.0, chunk_times=[100.0 + ttft, 100.0 + e2e],
                         finished=100.0 + e2e, usage_tokens=tokens)


def test_targets_scale_the_unloaded_line_and_tpot():
    unloaded = [_record(n, 0.1 + 0.002 * n, 0.1 + 0.002 * n + 8 * 0.02) for n in (100, 500, 1000)]
    targets = goodput.fit_targets(unloaded, k_ttft=3, k_tpot=2)
    assert (targets.a, targets.b, targets.tpot0) == pytest.approx((0.1, 0.002, 0.02))
    assert targets.ttft(200) == pytest.approx(3 * 0.5) and targets.tpot == pytest.approx(0.04)
    assert targets.met(_record(200, 1.4, 1.4 + 8 * 0.039))
    assert not targets.met(_record(200, 1.6, 1.6 + 8 * 0.01))  # late first token
    assert not targets.met(_record(200, 0.5, 0.5 + 8 * 0.05))  # slow tokens
    assert not targets.met(_record(200, 0.5, 0.6, tokens=3))  # cut short
    assert not targets.met(RequestRecord(200, 9, error="HTTP 429"))  # refused or failed: a miss
    assert goodput.attainment([_record(200, 1.4, 1.5), _record(200, 1.6, 1.7)], targets) == 0.5
    records = [_record(200, 1.4, 1.5), _record(200, 1.6, 1.7), _record(200, 1.6, 1.6 + 8 * 0.05),
               _record(200, 0.5, 0.5 + 8 * 0.05), _record(200, 0.5, 0.6, tokens=3), RequestRecord(200, 9, error="x")]
    assert targets.misses(records) == {"failed": 2, "ttft": 2, "tpot": 2}


def test_a_negative_intercept_gives_the_best_line_through_the_origin():
    # Long prompts only: the TTFT grows faster than linearly, and a free line would cross
    # zero at ~560 tokens (TTFT 3.8 s at 1,200 tokens, 6.2 s at 1,780, as measured).
    unloaded = [_record(n, t, t + 8 * 0.02) for n, t in ((1200, 3.8), (1500, 5.0), (1780, 6.2))]
    targets = goodput.fit_targets(unloaded, k_ttft=4, k_tpot=4)
    lengths, ttfts = np.array([1200, 1500, 1780.0]), np.array([3.8, 5.0, 6.2])
    assert targets.a == 0 and targets.b == pytest.approx(lengths @ ttfts / (lengths @ lengths))
    assert targets.ttft(1500) == pytest.approx(4 * 5.0, rel=0.02)  # near the measured unloaded TTFT


def test_calibration_needs_two_answers():
    with pytest.raises(goodput.BenchError, match="only 1 of 2"):
        goodput.fit_targets([_record(10, 0.1, 0.2), RequestRecord(10, 9, error="boom")], 4, 4)


@pytest.mark.parametrize(("points", "expected"), [
    ([(0.1, 1.0), (0.2, 0.95), (0.4, 0.55)], (0.2, 0.2 + 0.2 * 0.05 / 0.4)),  # interpolated towards 0.4
    ([(0.4, 0.5), (0.1, 0.92)], (0.1, 0.1 + 0.3 * 0.02 / 0.42)),  # any order
    ([(0.1, 0.95), (0.2, 0.97)], (0.2, 0.2)),  # met at the highest rate swept: no more is known
    ([(0.1, 0.5), (0.2, 0.4)], (0.0, 0.0)),  # never met
])
def test_goodput_is_the_highest_rate_meeting_the_attainment(points, expected):
    assert goodput.goodput(points) == pytest.approx(expected)


def test_calibration_prompts_span_the_workloads_lengths():
    requests = goodput.workload("mixed", 40, seed=(3, 0))
    lengths = sorted(r.prompt_len for r in goodput.calibration_set(requests))
    assert len(lengths) == goodput.CALIBRATION_PROMPTS
    assert lengths[0] == min(r.prompt_len for r in requests) and lengths[-1] == max(r.prompt_len for r in requests)


def test_several_seeds_pool_their_records_per_rate(monkeypatch):
    """Each rate runs once per seed with that seed's own requests; the attainment is over
    the pooled records and each seed's is kept beside it."""
    from types import SimpleNamespace

    from pdserve.cluster.benchmark.stats import RequestRecord

    runs = []

    async def fake_run_load(base_url, requests, offsets, concurrency, api_key, timeout, label, **kwargs):
        runs.append((label, [r.prompt_len for r in requests]))
        fast = "seed 1" in label  # seed 1's requests all meet the targets, seed 2's none
        end = 0.2 if fast else 9.0
        records = [RequestRecord(r.prompt_len, 2, sent=0.0, chunk_times=[0.1, end], finished=end, usage_tokens=2)
                   for r in requests]
        return SimpleNamespace(records=records)

    monkeypatch.setattr(goodput, "run_load", fake_run_load)
    args = goodput.build_parser().parse_args(["--rates", "0.5", "--min-prompts", "4", "--duration", "1",
                                              "--seeds", "1", "2"])

    def requests_at(rate, seed):
        return goodput.workload("mixed", 4, (seed, 1)), np.zeros(4)

    targets = goodput.Targets(0.5, 0.0, 0.5, 1.0, 1.0)  # TTFT 0.5 s, TPOT 0.5 s
    points = goodput.sweep(args, "x", "http://unused", requests_at, targets, {}, None)
    assert [label for label, _ in runs] == ["x @ 0.5/s seed 1", "x @ 0.5/s seed 2"]
    assert runs[0][1] != runs[1][1]  # each seed its own prompts
    point = points[0.5]
    assert point["requests"] == 8 and point["attainment"] == 0.5 and point["attainment_per_seed"] == [1.0, 0.0]
    assert point["misses"]["tpot"] == 4


def test_the_peer_alone_on_an_earlier_runs_targets(monkeypatch, tmp_path):
    """`--configs` with none: no pdserve server starts, and the peer meets the targets the
    earlier run measured."""
    from types import SimpleNamespace

    earlier = goodput.Targets(0.2, 0.003, 0.0125, 4.0, 4.0)
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({"results": {"mixed": {"targets": earlier.to_json()}}}))
    sent_to = []

    async def fake_run_load(base_url, requests, offsets, concurrency, api_key, timeout, label, **kwargs):
        sent_to.append(base_url)
        return SimpleNamespace(records=[RequestRecord(r.prompt_len, 2, sent=0.0, chunk_times=[0.1, 0.12],
                                                      finished=0.12, usage_tokens=2) for r in requests])

    def no_server(*args, **kwargs):
        raise AssertionError("no pdserve configuration was asked for")

    monkeypatch.setattr(goodput, "run_load", fake_run_load)
    monkeypatch.setattr(goodput, "launched_server", no_server)
    args = goodput.build_parser().parse_args(["--configs", "--rates", "0.5", "--min-prompts", "2", "--duration",
                                              "1", "--targets-from", str(path), "--peer-url", "http://peer"])
    args.seeds, args.config_flags = [0], dict(goodput.CONFIGS)
    result = goodput.run_workload(args, "mixed", SimpleNamespace(available=True, url="http://peer"))
    assert list(result["configs"]) == ["vllm"] and result["targets"] == earlier.to_json()
    assert sent_to == ["http://peer"] and result["configs"]["vllm"]["points"][0.5]["attainment"] == 1.0
    with pytest.raises(SystemExit, match="only the peer needs --peer-url and --targets-from"):
        goodput.main(["--configs", "--peer-url", "http://peer"])
