"""The serving benchmark's pure parts: statistics, goodput, arrivals, datasets, SSE parsing.

No server and no clock: the streams come from httpx.MockTransport and every time is given.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

_BENCH = Path(__file__).resolve().parent.parent / "bench"
# serving.py imports its parts (bench/serving_*.py) as top-level modules, as a script run from
# bench/ does; appended, so that bench/ shadows no module of the test run.
sys.path.append(str(_BENCH))
_SPEC = importlib.util.spec_from_file_location("bench_serving", _BENCH / "serving.py")
serving = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = serving  # registered, as an import would
_SPEC.loader.exec_module(serving)

VOCAB = 49152


def record(ttft: float, gaps: list[float], output_tokens: int | None = None, max_tokens: int | None = None,
           prompt_len: int = 10, error: str | None = None) -> serving.RequestRecord:
    """A request sent at t=100 s whose text chunks came `ttft` later, then `gaps` apart."""
    times = list(100.0 + ttft + np.cumsum([0.0, *gaps]))
    n = len(times) if output_tokens is None else output_tokens
    return serving.RequestRecord(prompt_len, max_tokens or n, sent=100.0, chunk_times=times,
                                 finished=times[-1], usage_tokens=n, error=error)


# ------------------------------------------------------------------------------ statistics

def test_describe_interpolates_percentiles_like_numpy():
    stats = serving.describe([i / 1000 for i in range(1, 101)])  # 1..100 ms
    # Linear interpolation between ranks: p90 sits 0.1 of the way from 90 to 91 ms.
    assert stats == pytest.approx((50.5, 50.5, 90.1, 99.01))
    assert serving.describe([]) == (None, None, None, None)


def test_record_metrics_follow_the_vllm_definitions():
    r = record(ttft=0.5, gaps=[0.1, 0.2, 0.3])
    assert r.ok and r.output_tokens == 4
    assert r.ttft == pytest.approx(0.5)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    assert r.e2el == pytest.approx(1.1)
    assert r.tpot == pytest.approx((1.1 - 0.5) / 3)
    assert record(ttft=0.5, gaps=[]).tpot is None  # one token: no time per output token


def test_output_tokens_come_from_usage_and_fall_back_to_chunks():
    r = record(ttft=0.1, gaps=[0.1], output_tokens=6)  # e.g. several tokens in one chunk
    assert r.output_tokens == 6 and r.tpot == pytest.approx(0.1 / 5)
    r.usage_tokens = None
    assert r.output_tokens == 2


def test_goodput_counts_completed_requests_meeting_every_slo():
    records = [
        record(ttft=0.5, gaps=[0.05] * 9),  # meets both
        record(ttft=2.5, gaps=[0.05] * 9),  # TTFT too slow
        record(ttft=0.5, gaps=[0.2] * 9),  # TPOT too slow
        record(ttft=0.5, gaps=[]),  # one token: TPOT counts as 0, meets both
        record(ttft=0.1, gaps=[0.01], error="HTTP 500: boom"),  # failed: never good
    ]
    m = serving.compute_metrics(records, duration_s=2.0, slo=serving.Slo(2000, 100))
    assert (m.completed, m.failed, m.good) == (4, 1, 2)
    assert m.goodput == pytest.approx(1.0)
    assert m.request_throughput == pytest.approx(2.0)
    assert m.output_tokens == 31 and m.output_throughput == pytest.approx(15.5)
    assert m.total_token_throughput == pytest.approx((40 + 31) / 2)
    assert m.tpot.mean == pytest.approx((50 + 50 + 200) / 3)  # the one-token request has no TPOT
    assert m.itl.p50 == pytest.approx(50.0)  # 18 gaps of 50 ms and 9 of 200 ms, pooled
    assert serving.compute_metrics(records, 2.0, serving.Slo(None, None)).good == 4
    assert serving.compute_metrics(records, 2.0, serving.Slo(None, None, e2el_ms=1000)).good == 2


def test_length_mismatches_are_counted():
    records = [record(ttft=0.1, gaps=[0.1] * 3, max_tokens=4), record(ttft=0.1, gaps=[0.1], max_tokens=4)]
    assert serving.compute_metrics(records, 1.0, serving.Slo(None, None)).length_mismatches == 1


def test_slo_reads_as_text():
    assert str(serving.Slo(2000.0, 100.0)) == "TTFT <= 2000 ms, TPOT <= 100 ms"
    assert str(serving.Slo(None, None)) == "no SLO"


def test_ratios_and_targets():
    assert serving.ratio(1.0, 2.0) == 0.5
    assert serving.ratio(1.0, 0.0) == math.inf
    assert serving.ratio(0.0, 0.0) is None and serving.ratio(None, 1.0) is None
    a = serving.compute_metrics([record(ttft=0.1, gaps=[0.02] * 4)], 1.0, serving.Slo(2000, 100))
    b = serving.compute_metrics([record(ttft=0.1, gaps=[0.05] * 4)], 2.0, serving.Slo(2000, 100))
    rows = {row["metric"]: row for row in serving.comparison(("x", "y"), a, b, 0.5, 1.3)}
    assert rows["p99 ITL"]["ratio"] == pytest.approx(0.4) and rows["p99 ITL"]["met"] is True
    assert rows["goodput"]["ratio"] == pytest.approx(2.0) and rows["goodput"]["met"] is True
    assert rows["TTFT p50"]["met"] is None


# ------------------------------------------------------------------------------ arrivals

def test_infinite_rate_sends_everything_at_once():
    assert serving.arrival_offsets(5, math.inf, 1.0, np.random.default_rng(0)).tolist() == [0.0] * 5


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrival_gaps_have_the_rate_and_burstiness_asked_for(burstiness):
    offsets = serving.arrival_offsets(20001, 4.0, burstiness, np.random.default_rng(7))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps >= 0).all()
    # Gamma gaps with shape k and mean 1/rate have coefficient of variation 1/sqrt(k).
    # With 20,000 samples the estimates lie within a few percent (standard error ~1-2%).
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_arrivals_depend_only_on_the_seed():
    first = serving.arrival_offsets(50, 2.0, 1.0, np.random.default_rng([3, 1]))
    again = serving.arrival_offsets(50, 2.0, 1.0, np.random.default_rng([3, 1]))
    assert first.tolist() == again.tolist()


# ------------------------------------------------------------------------------ datasets

def test_random_dataset_lengths_cover_the_range():
    requests = serving.random_dataset(np.random.default_rng(0), VOCAB, 2000, 100, 20, 0.5)
    inputs = [len(r.prompt_ids) for r in requests]
    outputs = [r.output_len for r in requests]
    assert (min(inputs), max(inputs)) == (50, 150)
    assert (min(outputs), max(outputs)) == (10, 30)
    ids = np.concatenate([r.prompt_ids for r in requests])
    assert ids.min() >= serving.FIRST_TOKEN_ID and ids.max() < VOCAB
    fixed = serving.random_dataset(np.random.default_rng(0), VOCAB, 10, 100, 20, 0.0)
    assert {len(r.prompt_ids) for r in fixed} == {100} and {r.output_len for r in fixed} == {20}


def test_shared_prefix_groups_interleave_and_share_their_prefix():
    requests = serving.shared_prefix_dataset(np.random.default_rng(0), VOCAB, 10, 32, 8, 3, 16)
    assert all(len(r.prompt_ids) == 40 and r.output_len == 16 for r in requests)
    prefixes = [tuple(r.prompt_ids[:32]) for r in requests]
    assert prefixes[0] == prefixes[3] == prefixes[6] == prefixes[9]
    assert len(set(prefixes)) == 3
    assert len({tuple(r.prompt_ids[32:]) for r in requests}) == 10


def test_mixed_dataset_has_exactly_the_long_fraction():
    requests = serving.mixed_dataset(np.random.default_rng(0), VOCAB, 50, 0.2, 1500, 64, 256, 32)
    lengths = [len(r.prompt_ids) for r in requests]
    assert lengths.count(1500) == 10
    assert all(64 <= n <= 256 for n in lengths if n != 1500)
    assert {r.output_len for r in requests} == {32}


def test_datasets_depend_only_on_the_seed():
    args = serving.parse_args(["--base-url", "http://127.0.0.1:1", "--dataset", "mixed", "--num-prompts", "8"])
    assert serving.build_dataset(args, VOCAB) == serving.build_dataset(args, VOCAB)


# ------------------------------------------------------------------------------ SSE parsing

def sse(*events: object) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def text(t: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": t, "finish_reason": finish}]}


def stream(body: bytes, status: int = 200) -> serving.RequestRecord:
    client = httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(
        lambda request: httpx.Response(status, content=body)))
    r = serving.RequestRecord(4, 3)

    async def go() -> None:
        async with client:
            await serving.stream_completion(client, serving.completion_payload(None, [300] * 4, 3), r)
    asyncio.run(go())
    return r


def test_stream_counts_text_chunks_and_reads_usage():
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3,
                                      "prompt_tokens_details": {"cached_tokens": 2}}}
    held_back = {"choices": [{"index": 0, "text": "", "token_ids": [7], "finish_reason": None}]}
    r = stream(sse(text("a"), text(""), held_back, text("b"), text("", "length"), usage, "[DONE]"))
    assert r.ok and len(r.chunk_times) == 3  # text or token ids; the empty chunks carry neither
    assert (r.output_tokens, r.cached_tokens) == (3, 2)


def test_stream_failures_are_recorded():
    assert stream(b'{"error": "no"}', status=400).error.startswith("HTTP 400")
    assert stream(sse(text("a"), {"error": {"message": "worker died"}})).error.startswith("error event")
    assert "without a finish" in stream(sse(text("a"), text("b"))).error
    assert stream(b"data: {not json\n\n").error.startswith("JSONDecodeError")
    assert not stream(sse(text("a", "length"), "[DONE]")).error


# ------------------------------------------------------------------------------ command line

def test_compare_alone_is_disaggregated_vs_colocated():
    args = serving.parse_args(["--compare"])
    assert args.compare == list(serving.DEFAULT_COMPARE) and args.labels == ["disagg", "colocated"]
    args = serving.parse_args(["--compare", "--prefill-workers 2", "--colocated --decode-workers 2"])
    assert args.compare == ["--prefill-workers 2", "--colocated --decode-workers 2"]
    assert args.labels == ["A", "B"]


def test_launch_defaults_do_not_override_given_flags():
    given = ["--model=/m", "--colocated"]
    assert serving.with_defaults(given, {"--model": "x", "--host": "127.0.0.1", "--api-key": None}) == [
        "--model=/m", "--colocated", "--host", "127.0.0.1"]


def test_json_safe_spells_out_infinities():
    assert serving.json_safe({"rate": math.inf, "xs": [1.0, math.nan]}) == {"rate": "inf", "xs": [1.0, "nan"]}
