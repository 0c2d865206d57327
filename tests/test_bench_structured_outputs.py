"""The structured-outputs benchmark's pure parts: its schemas and prompts, the statistics on
given timings, SSE parsing (httpx.MockTransport, no server), the results files and the
command line. No clock and no model."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest

from pdserve.runtime.structured_output import StructuredOutput

_BENCH = Path(__file__).resolve().parent.parent / "bench"
# The bench imports its neighbours (json_schemas, serving_*) as top-level modules, as a
# script run from bench/ does; appended, so that bench/ shadows no module of the test run.
sys.path.append(str(_BENCH))
_SPEC = importlib.util.spec_from_file_location("bench_structured_outputs", _BENCH / "structured_outputs.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench
_SPEC.loader.exec_module(bench)
json_schemas = importlib.import_module("json_schemas")  # the one the bench imported

SERVED = [entry.schema for entry in json_schemas.SUBJECT_SCHEMAS]
ALL_SCHEMAS = [*SERVED, json_schemas.wide_schema(0), json_schemas.wide_schema(1)]


# ------------------------------------------------------------------------------ schemas

@pytest.mark.parametrize("schema", ALL_SCHEMAS, ids=lambda s: s.get("title") or ",".join(s["properties"])[:30])
def test_every_schema_is_valid_json_schema_and_served(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    StructuredOutput.json_schema(schema).check()  # strict: any unsupported keyword raises
    assert jsonschema.Draft202012Validator(schema).is_valid(json_schemas.example_instance(schema))


def test_served_schemas_are_distinct():
    names = [entry.name for entry in json_schemas.SUBJECT_SCHEMAS]
    assert len(set(names)) == len(names) == 16
    assert len({json.dumps(s, sort_keys=True) for s in SERVED}) == len(SERVED)
    assert all(len(entry.subjects) == 4 for entry in json_schemas.SUBJECT_SCHEMAS)


def unbounded_parts(schema: dict, path: str = "$") -> list[str]:
    """Where `schema` lets an output run on: a string without maxLength, an array without
    maxItems, a number without multipleOf, an object open to other or optional properties."""
    if "enum" in schema:
        return []
    kind, found = schema["type"], []
    if kind == "string" and "maxLength" not in schema:
        found.append(path)
    if kind == "number" and "multipleOf" not in schema:
        found.append(path)
    if kind == "array":
        found += [path] if "maxItems" not in schema else []
        found += unbounded_parts(schema["items"], path + "[]")
    if kind == "object":
        if schema.get("additionalProperties") is not False or schema.get("required") != list(schema["properties"]):
            found.append(path)
        for name, sub in schema["properties"].items():
            found += unbounded_parts(sub, f"{path}.{name}")
    return found


def test_served_schemas_are_bounded_so_that_outputs_close():
    assert {entry.name: unbounded_parts(entry.schema) for entry in json_schemas.SUBJECT_SCHEMAS} == {
        entry.name: [] for entry in json_schemas.SUBJECT_SCHEMAS}
    assert unbounded_parts({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
                            "additionalProperties": False}) == ["$.a"]


def test_wide_schema_has_fifty_properties_of_every_kind():
    schema = json_schemas.wide_schema()
    properties = schema["properties"]
    assert len(properties) == 50 and schema["required"] == list(properties)
    kinds = {("enum" if "enum" in p else p["type"]) for p in properties.values()}
    assert kinds == {"string", "integer", "number", "boolean", "enum", "array", "object"}
    assert all("maxLength" in p for p in properties.values() if p.get("type") == "string" and "enum" not in p)
    assert all("maxItems" in p for p in properties.values() if p["type"] == "array")
    assert all({"minimum", "maximum"} <= set(p) for p in properties.values() if p["type"] in ("integer", "number"))


def test_wide_schema_variants_differ_in_one_name_and_in_their_cache_key():
    variants = [json_schemas.wide_schema(v) for v in range(4)]
    assert len({StructuredOutput.json_schema(s).key for s in variants}) == 4
    first, second = (list(s["properties"]) for s in variants[:2])
    assert [a == b for a, b in zip(first, second)] == [False] + [True] * 49
    assert json_schemas.wide_schema(0) == json_schemas.wide_schema()


def test_example_instance_takes_the_smallest_obvious_values():
    schema = json_schemas.record(a=json_schemas.text(5), b=json_schemas.integer(3, 9),
                                 c=json_schemas.one_of("x", "y"), d=json_schemas.list_of({"type": "boolean"}, 2))
    assert json_schemas.example_instance(schema) == {"a": "a", "b": 3, "c": "x", "d": [True]}
    with pytest.raises(ValueError, match="null"):
        json_schemas.example_instance({"type": "null"})


def test_prompts_cycle_the_schemas_and_never_repeat():
    prompts = json_schemas.json_prompts(130)
    assert [p.schema_name for p in prompts[:17]] == [e.name for e in json_schemas.SUBJECT_SCHEMAS] + ["person"]
    texts = [p.messages[0]["content"] for p in prompts]
    assert len(set(texts)) == 130
    assert "Marie Curie" in texts[0] and "Ada Lovelace" in texts[16] and texts[64].startswith("(2) ")
    assert all(p.schema is json_schemas.SUBJECT_SCHEMAS[i % 16].schema for i, p in enumerate(prompts))
    assert "name, born, occupation, known_for" in texts[0]


# ------------------------------------------------------------------------------ statistics

def chat(tokens: int, first: float = 1.0, last: float = 2.0, content: str = "", finish: str = "stop",
         error: str | None = None, cached: int | None = None) -> bench.ChatRecord:
    """A request sent at t=0.5 whose first token came at `first` and last at `last`."""
    return bench.ChatRecord("person", sent=0.5, first_token=first, last_token=last, usage_tokens=tokens,
                            cached_tokens=cached, content=content, finish_reason=finish, error=error)


def test_tpot_spreads_first_to_last_token_over_the_gaps():
    r = chat(11, first=1.0, last=2.0)
    assert r.ttft == pytest.approx(0.5) and r.tpot == pytest.approx(0.1)
    assert chat(8, first=1.0, last=1.7).tpot == pytest.approx(0.1)  # MIN_TPOT_TOKENS counts
    assert chat(7).tpot is None
    assert chat(20, error="HTTP 500: boom").tpot is None
    assert bench.ChatRecord("x", seen_tokens=3).tokens == 3  # no usage: what was seen


PERSON = json_schemas.SUBJECT_SCHEMAS[0]
VALID = json.dumps({"name": "Ada", "born": 1815, "occupation": "mathematician", "known_for": ["notes"]})


def test_pass_stats_on_made_up_timings():
    prompts = json_schemas.json_prompts(16)[:1] * 5
    records = [chat(11, 1.0, 2.0, VALID, cached=10),  # TPOT 100 ms
               chat(21, 1.5, 3.5, VALID, cached=30),  # TPOT 100 ms, TTFT 1 s
               chat(9, 1.0, 3.4, VALID[:-1], finish="length"),  # TPOT 300 ms; cut, so invalid
               chat(5, 1.0, 1.4, '{"name": 1}'),  # too short for TPOT; invalid
               chat(30, error="HTTP 500: boom")]
    s = bench.pass_stats(records, prompts)
    assert (s.completed, s.failed, s.tokens, s.tpot_requests) == (4, 1, 46, 3)
    assert s.tpot_median == pytest.approx(0.1) and s.tpot_mean == pytest.approx(0.5 / 3)
    assert s.ttft_median == pytest.approx(0.5) and s.cached_tokens_mean == pytest.approx(20)
    assert (s.valid, s.cut_by_max_tokens, s.valid_share) == (2, 1, 0.5)
    empty = bench.pass_stats([chat(30, error="refused")], prompts[:1])
    assert (empty.tpot_median, empty.ttft_median, empty.valid_share) == (None, None, None)


def test_is_valid_needs_the_text_to_parse_and_match():
    assert bench.is_valid(VALID, PERSON.schema)
    assert not bench.is_valid("```json\n" + VALID + "\n```", PERSON.schema)  # fenced: does not parse as is
    assert not bench.is_valid(json.dumps({"name": "Ada"}), PERSON.schema)


def stats(tpot_median: float | None, tpot_mean: float | None = None, valid: int = 4,
          completed: int = 4) -> bench.PassStats:
    return bench.PassStats(completed=completed, failed=0, tokens=100, tpot_requests=completed,
                           tpot_median=tpot_median, tpot_mean=tpot_mean, ttft_median=0.2, cached_tokens_mean=None,
                           valid=valid, cut_by_max_tokens=0)


def test_tpot_ratio_is_json_schema_over_unconstrained_with_its_target():
    r = bench.tpot_ratios(stats(0.115, 0.12), stats(0.1, 0.1))
    assert r["tpot_median"] == pytest.approx(1.15) and r["tpot_mean"] == pytest.approx(1.2)
    assert r["tpot_target_met"] is True and r["all_valid"] is True  # 1.15 itself meets "<= 1.15"
    assert bench.tpot_ratios(stats(0.12), stats(0.1))["tpot_target_met"] is False
    assert bench.tpot_ratios(stats(0.1, valid=3), stats(0.1))["all_valid"] is False
    assert bench.tpot_ratios(stats(0.1, completed=0, valid=0), stats(0.1))["all_valid"] is False
    unmeasured = bench.tpot_ratios(stats(None), stats(0.1))
    assert unmeasured["tpot_median"] is None and unmeasured["tpot_target_met"] is None


def test_the_two_passes_differ_in_response_format_and_fixed_length_only():
    prompt = json_schemas.json_prompts(1)[0]
    plain = bench.request_body(prompt, False, 37, "m", bench.FLAVORS["pdserve"])
    constrained = bench.request_body(prompt, True, 37, "m", bench.FLAVORS["pdserve"])
    assert constrained.pop("response_format") == {"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON.schema, "strict": True}}
    assert plain.pop("ignore_eos") is True  # the unconstrained reply is as long as the JSON one
    assert constrained == plain
    assert plain["temperature"] == 0.0 and plain["stream"] and plain["max_tokens"] == 37
    assert "model" not in bench.request_body(prompt, False, 128, None, {})


def test_report_lines_show_both_passes_and_the_verdicts():
    records = [chat(11, 1.0, 2.0, VALID)]
    prompts = json_schemas.json_prompts(1)
    one = {"stats": {**bench.asdict(bench.pass_stats(records, prompts)), "valid_share": 1.0}, "errors": []}
    server = {"label": "pdserve", "passes": {"unconstrained": one, "json_schema": one},
              "ratios": bench.tpot_ratios(bench.pass_stats(records, prompts), bench.pass_stats(records, prompts))}
    lines = bench.server_lines(server)
    assert lines[0].split()[:3] == ["pdserve", "unconstrained", "1/0"]
    assert "TPOT p50 1.00x" in lines[-1] and "target <= 1.15: met" in lines[-1] and "valid 1/1" in lines[-1]


# ------------------------------------------------------------------------------ SSE parsing

def sse(*events: object) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def delta(content: str, token_ids: list[int] | None = None, finish: str | None = None) -> dict:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
    return {"choices": [choice if token_ids is None else {**choice, "token_ids": token_ids}]}


def stream(body: bytes, status: int = 200) -> bench.ChatRecord:
    client = httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(
        lambda request: httpx.Response(status, content=body)))
    record = bench.ChatRecord("person")

    async def go() -> None:
        async with client:
            await bench.stream_chat(client, {"messages": []}, record)
    asyncio.run(go())
    return record


def test_stream_reads_content_tokens_and_usage():
    usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4,
                                      "prompt_tokens_details": {"cached_tokens": 8}}}
    role = {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
    r = stream(sse(role, delta('{"a"', [5, 6]), delta("", [7]), delta(":1}", [8], "stop"), usage, "[DONE]"))
    assert r.ok and r.content == '{"a":1}' and r.finish_reason == "stop"
    assert (r.tokens, r.seen_tokens, r.cached_tokens) == (4, 4, 8)
    assert r.sent <= r.first_token < r.last_token
    no_usage = stream(sse(delta("a"), delta("b", finish="length"), "[DONE]"))
    assert no_usage.ok and no_usage.tokens == 2  # a chunk without token ids counts as one


def test_stream_failures_are_recorded():
    assert stream(b'{"error": "no"}', status=400).error.startswith("HTTP 400")
    assert stream(sse(delta("a"), {"error": {"message": "worker died"}})).error.startswith("error event")
    assert "without a finish" in stream(sse(delta("a"), "[DONE]")).error
    assert "no tokens" in stream(sse(delta("", finish="stop"), "[DONE]")).error
    assert stream(b"data: {not json\n\n").error.startswith("JSONDecodeError")


# ------------------------------------------------------------------------------ results and command line

def test_results_never_overwrite_and_share_one_stem(tmp_path):
    report = bench.Report()
    report.lines = ["line one", "line two"]
    first = bench.write_results(tmp_path, report, {"x": float("inf")})
    (tmp_path / "structured_outputs-2.txt").write_text("someone else's")
    second = bench.write_results(tmp_path, report, {"x": 1})
    assert (first.name, second.name) == ("structured_outputs", "structured_outputs-3")
    assert json.loads(first.with_suffix(".json").read_text()) == {"x": "inf"}  # strict JSON
    assert second.with_suffix(".txt").read_text() == "line one\nline two\n"
    assert (tmp_path / "structured_outputs-2.txt").read_text() == "someone else's"


def test_defaults_launch_pdserve_at_concurrency_eight():
    args = bench.parse_args([])
    assert (args.concurrency, args.max_tokens, args.requests, args.only) == (8, 128, 32, None)
    assert (args.base_url, args.server_args, args.peer_url, args.peer_flavor) == (None, "", None, "vllm")
    args = bench.parse_args(["--requests", "8", "--max-tokens", "24", "--server-args=--colocated",
                             "--peer-url", "http://127.0.0.1:8100", "--only", "serving"])
    assert (args.requests, args.max_tokens, args.server_args, args.only) == (8, 24, "--colocated", "serving")


@pytest.mark.parametrize("argv, message", [
    (["--max-tokens", "7"], "at least 8"),
    (["--compile-variants", "1"], "at least 2"),
    (["--requests", "0"], "positive"),
    (["--base-url", "http://127.0.0.1:8000", "--server-args=--colocated"], "launched server"),
    (["--only", "decode"], "invalid choice"),
])
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
