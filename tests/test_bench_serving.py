"""The serving benchmark's parts (pdserve.cluster.benchmark): statistics, goodput, arrivals,
datasets, SSE parsing; and bench/serving.py, the script over them, against fake servers.

No real model server: the streams come from httpx.MockTransport or a small FastAPI app in
a thread, and every time in the statistics tests is given.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import socket
import sys
import threading
import time
from pathlib import Path

import fastapi
import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.responses import JSONResponse, StreamingResponse

from pdserve.cluster.benchmark import command
from pdserve.cluster.benchmark.arguments import DEFAULT_COMPARE
from pdserve.cluster.benchmark.chat import ChatRequest, chat_dataset, chat_warmups
from pdserve.cluster.benchmark.client import completion_payload, request_payload, run_load, stream_completion
from pdserve.cluster.benchmark.flavors import FLAVORS
from pdserve.cluster.benchmark.launch import with_defaults
from pdserve.cluster.benchmark.peer import peer_comparison
from pdserve.cluster.benchmark.report import comparison, json_safe, ratio, write_result
from pdserve.cluster.benchmark.run import ModelInfo
from pdserve.cluster.benchmark.stats import RequestRecord, Slo, compute_metrics, describe
from pdserve.cluster.benchmark.workload import (
    FIRST_TOKEN_ID,
    arrival_offsets,
    build_dataset,
    mixed_dataset,
    random_dataset,
    shared_prefix_dataset,
)

_BENCH = Path(__file__).resolve().parent.parent / "bench"
# serving.py imports its neighbour serving_overhead.py as a top-level module, as a script run
# from bench/ does; appended, so that bench/ shadows no module of the test run.
sys.path.append(str(_BENCH))
_SPEC = importlib.util.spec_from_file_location("bench_serving", _BENCH / "serving.py")
serving = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = serving  # registered, as an import would
_SPEC.loader.exec_module(serving)

VOCAB = 49152


def record(ttft: float, gaps: list[float], output_tokens: int | None = None, max_tokens: int | None = None,
           prompt_len: int = 10, error: str | None = None) -> RequestRecord:
    """A request sent at t=100 s whose text chunks came `ttft` later, then `gaps` apart."""
    times = list(100.0 + ttft + np.cumsum([0.0, *gaps]))
    n = len(times) if output_tokens is None else output_tokens
    return RequestRecord(prompt_len, max_tokens or n, sent=100.0, chunk_times=times,
                                 finished=times[-1], usage_tokens=n, error=error)


# ------------------------------------------------------------------------------ statistics

def test_describe_interpolates_percentiles_like_numpy():
    stats = describe([i / 1000 for i in range(1, 101)])  # 1..100 ms
    # Linear interpolation between ranks: p90 sits 0.1 of the way from 90 to 91 ms.
    assert stats == pytest.approx((50.5, 50.5, 90.1, 99.01))
    assert describe([]) == (None, None, None, None)


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
    m = compute_metrics(records, duration_s=2.0, slo=Slo(2000, 100))
    assert (m.completed, m.failed, m.good) == (4, 1, 2)
    assert m.goodput == pytest.approx(1.0)
    assert m.request_throughput == pytest.approx(2.0)
    assert m.output_tokens == 31 and m.output_throughput == pytest.approx(15.5)
    assert m.total_token_throughput == pytest.approx((40 + 31) / 2)
    assert m.tpot.mean == pytest.approx((50 + 50 + 200) / 3)  # the one-token request has no TPOT
    assert m.itl.p50 == pytest.approx(50.0)  # 18 gaps of 50 ms and 9 of 200 ms, pooled
    assert compute_metrics(records, 2.0, Slo(None, None)).good == 4
    assert compute_metrics(records, 2.0, Slo(None, None, e2el_ms=1000)).good == 2


def test_length_mismatches_are_counted():
    records = [record(ttft=0.1, gaps=[0.1] * 3, max_tokens=4), record(ttft=0.1, gaps=[0.1], max_tokens=4)]
    assert compute_metrics(records, 1.0, Slo(None, None)).length_mismatches == 1


def test_slo_reads_as_text():
    assert str(Slo(2000.0, 100.0)) == "TTFT <= 2000 ms, TPOT <= 100 ms"
    assert str(Slo(None, None)) == "no SLO"


def test_ratios_and_targets():
    assert ratio(1.0, 2.0) == 0.5
    assert ratio(1.0, 0.0) == math.inf
    assert ratio(0.0, 0.0) is None and ratio(None, 1.0) is None
    a = compute_metrics([record(ttft=0.1, gaps=[0.02] * 4)], 1.0, Slo(2000, 100))
    b = compute_metrics([record(ttft=0.1, gaps=[0.05] * 4)], 2.0, Slo(2000, 100))
    rows = {row["metric"]: row for row in comparison(("x", "y"), a, b, 0.5, 1.3)}
    assert rows["p99 ITL"]["ratio"] == pytest.approx(0.4) and rows["p99 ITL"]["met"] is True
    assert rows["goodput"]["ratio"] == pytest.approx(2.0) and rows["goodput"]["met"] is True
    assert rows["TTFT p50"]["met"] is None


# ------------------------------------------------------------------------------ arrivals

def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(5, math.inf, 1.0, np.random.default_rng(0)).tolist() == [0.0] * 5


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrival_gaps_have_the_rate_and_burstiness_asked_for(burstiness):
    offsets = arrival_offsets(20001, 4.0, burstiness, np.random.default_rng(7))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps >= 0).all()
    # Gamma gaps with shape k and mean 1/rate have coefficient of variation 1/sqrt(k).
    # With 20,000 samples the estimates lie within a few percent (standard error ~1-2%).
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_arrivals_depend_only_on_the_seed():
    first = arrival_offsets(50, 2.0, 1.0, np.random.default_rng([3, 1]))
    again = arrival_offsets(50, 2.0, 1.0, np.random.default_rng([3, 1]))
    assert first.tolist() == again.tolist()


# ------------------------------------------------------------------------------ datasets

def test_random_dataset_lengths_cover_the_range():
    requests = random_dataset(np.random.default_rng(0), VOCAB, 2000, 100, 20, 0.5)
    inputs = [len(r.prompt_ids) for r in requests]
    outputs = [r.output_len for r in requests]
    assert (min(inputs), max(inputs)) == (50, 150)
    assert (min(outputs), max(outputs)) == (10, 30)
    ids = np.concatenate([r.prompt_ids for r in requests])
    assert ids.min() >= FIRST_TOKEN_ID and ids.max() < VOCAB
    fixed = random_dataset(np.random.default_rng(0), VOCAB, 10, 100, 20, 0.0)
    assert {len(r.prompt_ids) for r in fixed} == {100} and {r.output_len for r in fixed} == {20}


def test_shared_prefix_groups_interleave_and_share_their_prefix():
    requests = shared_prefix_dataset(np.random.default_rng(0), VOCAB, 10, 32, 8, 3, 16)
    assert all(len(r.prompt_ids) == 40 and r.output_len == 16 for r in requests)
    prefixes = [tuple(r.prompt_ids[:32]) for r in requests]
    assert prefixes[0] == prefixes[3] == prefixes[6] == prefixes[9]
    assert len(set(prefixes)) == 3
    assert len({tuple(r.prompt_ids[32:]) for r in requests}) == 10


def test_mixed_dataset_has_exactly_the_long_fraction():
    requests = mixed_dataset(np.random.default_rng(0), VOCAB, 50, 0.2, 1500, 64, 256, 32)
    lengths = [len(r.prompt_ids) for r in requests]
    assert lengths.count(1500) == 10
    assert all(64 <= n <= 256 for n in lengths if n != 1500)
    assert {r.output_len for r in requests} == {32}


def test_datasets_depend_only_on_the_seed():
    args = serving.parse_args(["--base-url", "http://127.0.0.1:1", "--dataset", "mixed", "--num-prompts", "8"])
    assert build_dataset(args, VOCAB) == build_dataset(args, VOCAB)


# ------------------------------------------------------------------------------ SSE parsing

def sse(*events: object) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def text(t: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": t, "finish_reason": finish}]}


def stream(body: bytes, status: int = 200) -> RequestRecord:
    client = httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(
        lambda request: httpx.Response(status, content=body)))
    r = RequestRecord(4, 3)

    async def go() -> None:
        async with client:
            await stream_completion(client, completion_payload(None, [300] * 4, 3), r)
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
    assert args.compare == list(DEFAULT_COMPARE) and args.labels == ["disagg", "colocated"]
    args = serving.parse_args(["--compare", "--prefill-workers 2", "--colocated --decode-workers 2"])
    assert args.compare == ["--prefill-workers 2", "--colocated --decode-workers 2"]
    assert args.labels == ["A", "B"]


def test_http_overhead_measures_one_server_without_a_plot():
    with pytest.raises(SystemExit):
        serving.parse_args(["--launch", "--http-overhead", "--plot", "overhead.png"])
    with pytest.raises(SystemExit):
        serving.parse_args(["--compare", "--http-overhead"])
    assert serving.parse_args(["--launch", "--http-overhead"]).http_overhead


def test_launch_defaults_do_not_override_given_flags():
    given = ["--model=/m", "--colocated"]
    assert with_defaults(given, {"--model": "x", "--host": "127.0.0.1", "--api-key": None}) == [
        "--model=/m", "--colocated", "--host", "127.0.0.1"]


def test_json_safe_spells_out_infinities():
    assert json_safe({"rate": math.inf, "xs": [1.0, math.nan]}) == {"rate": "inf", "xs": [1.0, "nan"]}


# ------------------------------------------------------------------------------ chat workloads

def words(messages: list[dict]) -> int:
    """A stand-in token counter: words plus a fixed template overhead."""
    return 10 + sum(len(m["content"].split()) for m in messages)


def prompts(requests) -> list:
    return [r.prompt_body() for r in requests]


def test_presets_set_their_defaults_and_explicit_flags_win():
    url = ["--url", "http://127.0.0.1:1"]
    short = serving.parse_args([*url, "--workload", "short-chats"])
    assert (short.num_prompts, short.long_fraction, short.max_concurrency, short.output_len) == (32, 0.0, 8, 64)
    mixed = serving.parse_args([*url, "--workload", "mixed"])
    assert (mixed.num_prompts, mixed.long_fraction, mixed.max_concurrency, mixed.long_len) == (24, 0.25, 8, 1500)
    given = serving.parse_args([*url, "--workload", "mixed", "--num-prompts", "5", "--max-concurrency", "2"])
    assert (given.num_prompts, given.max_concurrency) == (5, 2)
    plain = serving.parse_args([*url, "--dataset", "mixed"])  # the token-id datasets keep their defaults
    assert (plain.workload, plain.num_prompts, plain.long_fraction, plain.max_concurrency) == (None, 100, 0.2, None)
    assert serving.parse_args(["--launch", "--workload", "mixed"]).launch == ""  # pdserve's own defaults
    with pytest.raises(SystemExit):
        serving.parse_args([*url, "--dataset", "random", "--workload", "mixed"])


def test_help_renders(capsys):
    with pytest.raises(SystemExit) as exit_info:
        serving.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "short-chats: 32 chats, 0% long" in " ".join(capsys.readouterr().out.split())  # as wrapped


def test_short_chats_are_distinct_questions_in_a_seeded_order():
    requests = chat_dataset(np.random.default_rng([0, 0]), 32, 0.0, 1500, 64, words)
    assert len(requests) == 32 and {r.output_len for r in requests} == {64}
    assert len({json.dumps(p) for p in prompts(requests)}) == 32
    assert all(r.path == "/v1/chat/completions" and r.prompt_len == words(r.messages) for r in requests)
    again = chat_dataset(np.random.default_rng([0, 0]), 32, 0.0, 1500, 64, words)
    other = chat_dataset(np.random.default_rng([1, 0]), 32, 0.0, 1500, 64, words)
    assert prompts(again) == prompts(requests) and prompts(other) != prompts(requests)
    more = chat_dataset(np.random.default_rng([0, 0]), 100, 0.0, 1500, 64, words)
    assert len({json.dumps(p) for p in prompts(more)}) == 100  # past the pool, numbered rounds


def test_mixed_chats_have_a_quarter_long_prompts_just_under_the_target():
    requests = chat_dataset(np.random.default_rng([0, 0]), 24, 0.25, 1500, 64, words)
    long = [r for r in requests if r.prompt_len > 200]
    assert len(long) == 6
    # The largest whole number of sentences within the target: one more sentence (at most
    # ~20 words) would pass it.
    assert all(1480 <= r.prompt_len <= 1500 for r in long)
    assert len({json.dumps(r.messages) for r in long}) == 6
    warmups = {json.dumps(r.messages) for r in chat_warmups(3, words)}
    assert not warmups & {json.dumps(r.messages) for r in requests}


def test_chat_stream_counts_content_chunks():
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    content = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
    done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2}}
    r = stream(sse(role, content, content, done, usage, "[DONE]"))
    assert r.ok and len(r.chunk_times) == 2 and (r.output_tokens, r.server_prompt_tokens) == (2, 12)


def test_flavors_send_only_the_fields_each_server_takes():
    chat = ChatRequest([{"role": "user", "content": "hi"}], 5, 7)
    pdserve = request_payload(chat, "m", FLAVORS["pdserve"])
    vllm = request_payload(chat, "m", FLAVORS["vllm"])
    assert "min_tokens" not in pdserve and pdserve["ignore_eos"] is True
    assert vllm["min_tokens"] == 7 and vllm["ignore_eos"] is True and vllm["max_tokens"] == 7
    assert request_payload(chat, None, FLAVORS["openai"]) == {
        "messages": chat.messages, "max_tokens": 7, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True}}


def test_result_files_are_never_overwritten(tmp_path):
    first = write_result(tmp_path / "r.json", {"x": 1})
    second = write_result(tmp_path / "r.json", {"x": math.inf})
    assert (first.name, second.name) == ("r.json", "r-2.json")
    assert json.loads(first.read_text()) == {"x": 1} and json.loads(second.read_text()) == {"x": "inf"}


# ------------------------------------------------------------------------------ peer comparison

PEER_METRIC_NAMES = ["output throughput", "request throughput", "TTFT p50", "TTFT p90", "TTFT p99",
                     "TPOT p50", "TPOT p90", "TPOT p99", "ITL p50", "ITL p90", "ITL p99", "E2E p50", "E2E p99"]


def test_peer_ratios_are_pdserve_over_peer():
    slo = Slo(None, None)
    a = compute_metrics([record(ttft=0.1, gaps=[0.02] * 4)], 1.0, slo)
    b = compute_metrics([record(ttft=0.4, gaps=[0.05] * 4)], 2.0, slo)
    rows = {row["metric"]: row for row in peer_comparison(a, b)}
    assert list(rows) == PEER_METRIC_NAMES
    assert rows["output throughput"]["ratio"] == pytest.approx(2.0)  # 5 tokens in 1 s vs in 2 s
    assert rows["request throughput"]["ratio"] == pytest.approx(2.0)
    assert rows["TTFT p90"]["ratio"] == pytest.approx(0.25)
    assert rows["TPOT p99"]["ratio"] == pytest.approx(0.4) and rows["ITL p50"]["ratio"] == pytest.approx(0.4)
    assert rows["E2E p99"]["ratio"] == pytest.approx((0.1 + 0.08) / (0.4 + 0.2))
    assert rows["TTFT p50"]["better"] == "lower" and rows["output throughput"]["better"] == "higher"


# ------------------------------------------------------------------------------ fake servers

class FakeServer:
    """A tiny OpenAI-compatible streaming server on 127.0.0.1 in a thread: every request
    streams max_tokens one-word chunks `delay` s apart. It records each request body in
    arrival order and the most requests it ever had in flight; `strict` refuses unknown
    fields as pdserve does."""

    def __init__(self, model: str, delay: float, strict: bool = False) -> None:
        self.model, self.delay, self.strict = model, delay, strict
        self.bodies: list[dict] = []
        self.auth: set[str | None] = set()  # Authorization headers seen
        self.in_flight = self.peak = 0
        app = fastapi.FastAPI()
        app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": model, "object": "model"}]})
        for path in ("/v1/completions", "/v1/chat/completions"):
            app.post(path)(self.generate)
        self.app = app

    async def generate(self, request: fastapi.Request):
        body = await request.json()
        self.bodies.append(body)
        self.auth.add(request.headers.get("authorization"))
        if self.strict and "min_tokens" in body:
            return JSONResponse({"error": {"message": "min_tokens: extra"}}, status_code=400)
        chat = "messages" in body

        def chunk(content: str | None, finish: str | None = None) -> str:
            choice = ({"delta": {} if content is None else {"content": content}} if chat
                      else {"text": content or ""})
            return f"data: {json.dumps({'choices': [{'index': 0, **choice, 'finish_reason': finish}]})}\n\n"

        async def events():
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                for _ in range(body["max_tokens"]):
                    await asyncio.sleep(self.delay)
                    yield chunk("word ")
                yield chunk(None, "length")
                usage = {"prompt_tokens": 3, "completion_tokens": body["max_tokens"]}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"
            finally:
                self.in_flight -= 1
        return StreamingResponse(events(), media_type="text/event-stream")

    def __enter__(self):  # returns self, started
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the fake server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def closed_port() -> int:
    with socket.socket() as s:  # bound, never listening, then closed: connecting is refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """Runs serving.main with a word-counting stand-in for the model's tokenizer; returns
    (exit status, stdout, the result JSON)."""
    monkeypatch.setattr(command, "model_info", lambda model: ModelInfo(VOCAB, words))

    def run(capsys, *argv: str) -> tuple[int, str, dict]:
        path = tmp_path / "result.json"
        status = serving.main([*argv, "--result-json", str(path)])
        return status, capsys.readouterr().out, json.loads(path.read_text())
    return run


def test_peer_gets_the_same_requests_in_the_same_order(bench, capsys):
    with FakeServer("smollm2-135m-instruct", 0.002, strict=True) as ours, FakeServer("peer-model", 0.004) as peer:
        status, out, result = bench(capsys, "--url", ours.url, "--peer-url", peer.url, "--peer-name", "fakevllm",
                                    "--workload", "mixed", "--num-prompts", "8", "--long-len", "120",
                                    "--output-len", "4", "--max-concurrency", "1", "--warmup-requests", "2",
                                    "--api-key", "ours", "--peer-api-key", "theirs")
    assert status == 0
    assert (ours.auth, peer.auth) == ({"Bearer ours"}, {"Bearer theirs"})
    measured = [[b["messages"] for b in server.bodies[2:]] for server in (ours, peer)]
    assert len(measured[0]) == 8 and measured[0] == measured[1]  # concurrency 1: arrival order is send order
    assert [b["messages"] for b in ours.bodies[:2]] == [b["messages"] for b in peer.bodies[:2]]  # warm-ups
    assert all("min_tokens" not in b and b["model"] == "smollm2-135m-instruct" for b in ours.bodies)
    assert all(b["min_tokens"] == b["max_tokens"] and b["ignore_eos"] and b["model"] == "peer-model"
               for b in peer.bodies)
    assert [run["label"] for run in result["runs"]] == ["pdserve", "fakevllm"]
    assert all(run["metrics"]["completed"] == 8 and run["metrics"]["output_tokens"] == 32 for run in result["runs"])
    assert result["peer"] == {"name": "fakevllm", "url": peer.url, "model": "peer-model", "flavor": "vllm",
                              "ran": True, "problem": None}
    (ratios,) = result["peer_comparison"]
    ours_m, peer_m = (run["metrics"] for run in result["runs"])
    rows = {row["metric"]: row for row in ratios["ratios"]}
    assert list(rows) == PEER_METRIC_NAMES
    for name, key in (("output throughput", "output_throughput"), ("request throughput", "request_throughput")):
        assert (rows[name]["a"], rows[name]["b"]) == (ours_m[key], peer_m[key])
        assert rows[name]["ratio"] == pytest.approx(ours_m[key] / peer_m[key])
    for name, row in rows.items():
        if row["unit"] == "ms":
            stat, q = name.split()
            key = {"TTFT": "ttft_ms", "TPOT": "tpot_ms", "ITL": "itl_ms", "E2E": "e2el_ms"}[stat]
            assert (row["a"], row["b"]) == (ours_m[key][q], peer_m[key][q])
            assert row["ratio"] == pytest.approx(row["a"] / row["b"])
    assert rows["ITL p50"]["ratio"] < 1  # 2 ms chunks against 4 ms ones
    assert "pdserve vs fakevllm" in out and "ITL p99 (ms)" in out


def test_an_unreachable_peer_is_named_and_pdserve_reported_alone(bench, capsys):
    port = closed_port()
    with FakeServer("smollm2-135m-instruct", 0.001, strict=True) as ours:
        status, out, result = bench(capsys, "--url", ours.url, "--peer-url", f"http://127.0.0.1:{port}",
                                    "--workload", "short-chats", "--num-prompts", "4", "--output-len", "3")
    assert status == 0
    assert "not running" in out and "../shared/peers/vllm-cpu.sh setup" in out
    assert f"../shared/peers/vllm-cpu.sh serve {port}" in out and "pdserve alone" in out
    assert [run["label"] for run in result["runs"]] == ["pdserve"] and result["runs"][0]["metrics"]["completed"] == 4
    assert result["peer"]["ran"] is False and "not running" in result["peer"]["problem"]
    assert "peer_comparison" not in result


def test_max_concurrency_is_a_closed_loop():
    requests = chat_dataset(np.random.default_rng(0), 9, 0.0, 100, 3, words)
    with FakeServer("m", 0.01) as server:
        run = asyncio.run(run_load(server.url, requests, np.zeros(9), 3, None, 30.0, "test",
                                           warmups=chat_warmups(1, words)))
    assert server.peak == 3 and all(r.ok for r in run.records)
    sent = sorted(r.sent for r in run.records)
    ends = sorted(r.finished for r in run.records)
    # The fourth request goes when the first one ends, not before.
    assert sent[3] >= ends[0]
