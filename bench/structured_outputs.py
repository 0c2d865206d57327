"""Structured outputs: what a grammar costs, in compile time and in decode speed.

1. Grammar compile, in this process, on the model's tokenizer: a 50-property JSON schema
   (bench/json_schemas.py) through `GrammarCompiler.compile(StructuredOutput.json_schema(s))`
   -- the first compile, the median of later cold ones (each a fresh variant of the schema,
   so none is a cache hit), a cache hit, a matcher's first mask, its mask at a mid-object
   position, and the masks of a batch of 8 such matchers (the grammar's part alone, and
   `apply_grammar_masks` as the sampler runs it), with --threads torch threads (1: a
   worker's share of a 2-core machine).
2. TPOT at concurrency 8: `pdserve serve` (default 1 prefill + 1 decode worker; --server-args
   adds flags, --base-url uses a running server instead) gets the same chats twice, streamed
   and greedy: unconstrained, then each with response_format json_schema (16 bounded
   schemas, one per prompt), each chat asking for exactly as many tokens as its JSON reply
   has (found by an unmeasured json_schema pass first, with --max-tokens; the unconstrained
   pass sets ignore_eos). So both passes decode the same lengths with the same arrivals,
   prefills and cached prompts, and differ by the grammar alone (with free lengths the JSON replies
   are shorter, so prompts arrive more often per decoded token, and their prefills, which
   share the machine's cores, slow the decode steps: that measured the workload, not the
   grammar). TPOT per request is (last token - first token) / (tokens - 1), counted over
   requests with at least 8 tokens; the ratio json_schema / unconstrained of the median TPOT
   has the target <= 1.15, and every json_schema output must parse and validate
   (jsonschema).
   `valid` counts outputs that parse as they are and match their schema; `cut` those that
   max_tokens ended (finish_reason "length"), which cannot be valid JSON.
3. --peer-url: the same two passes against another OpenAI server (vLLM's CPU backend from
   ../shared/peers/vllm-cpu.sh serve PORT), after pdserve has stopped, and its ratio.

The tables go to stdout and to bench/results/structured_outputs.txt, everything measured
(per request too) to bench/results/structured_outputs.json; existing results are never
overwritten (the next free NAME-2, NAME-3 ... is taken). Progress goes to stderr.

    python bench/structured_outputs.py
    python bench/structured_outputs.py --requests 8 --max-tokens 24 --result-dir /tmp/so
    python bench/structured_outputs.py --base-url http://127.0.0.1:8000 --peer-url http://127.0.0.1:8100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import jsonschema
import torch
from json_schemas import JsonPrompt, example_instance, json_prompts, wide_schema
from serving import RESULTS_DIR, probe_peer

from pdserve.cluster.benchmark.client import Progress, has_tokens, make_client, served_model
from pdserve.cluster.benchmark.launch import default_serve_command, launched_server
from pdserve.cluster.benchmark.peer import PeerStatus
from pdserve.cluster.benchmark.report import fmt, fmt_ratio, json_safe, ratio
from pdserve.cluster.benchmark.workload import BenchError
from pdserve.runtime.structured_output import (
    GrammarCompiler,
    GrammarMatcher,
    StructuredOutput,
    apply_grammar_masks,
    new_bitmask,
)
from pdserve.runtime.tokenizer import Tokenizer
from pdserve.runtime.weights.checkpoint import DEFAULT_MODEL, load_checkpoint

MIN_TPOT_TOKENS = 8  # a request counts for TPOT from this many output tokens
TPOT_RATIO_TARGET = 1.15  # json_schema / unconstrained, median TPOT
# The measured passes, after an unmeasured json_schema pass that finds each reply's length
# (and leaves every prompt in the prefix cache): the unconstrained pass asks each chat for
# exactly that many tokens (ignore_eos), so both decode the same lengths with the same
# arrivals and cached prompts; only the grammar differs.
PASSES = ("unconstrained", "json_schema")
# Extra body fields per server flavour. return_token_ids: a token whose text is held back
# (part of a UTF-8 character) still arrives as a chunk, so the last token's time is exact.
FLAVORS = {"pdserve": {"return_token_ids": True}, "vllm": {"return_token_ids": True}, "openai": {}}


# ---------------------------------------------------------------- grammar compile

def timed(fn: Callable[..., object], *args: object) -> float:
    """Seconds that fn(*args) took."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def mid_object(compiler: GrammarCompiler, tokenizer: Tokenizer, schema: dict) -> tuple[GrammarMatcher, int]:
    """A fresh matcher of `schema` past the first half of the tokens of a valid instance
    (compact JSON, as the grammar demands), and how many tokens that is."""
    matcher = compiler.matcher(StructuredOutput.json_schema(schema))
    ids = tokenizer.encode(json.dumps(example_instance(schema), separators=(",", ":")))
    if not matcher.accept_all(ids[:len(ids) // 2]):
        raise BenchError(f"the grammar refused the tokens of a valid instance: {matcher.error}")
    return matcher, len(ids) // 2


def compile_timings(model: str, variants: int, threads: int, batch: int = 8) -> dict:
    """Seconds (see the module docstring, part 1); needs `variants` >= 2. `threads` torch
    threads for the batch's masking, as a worker has (on a busy machine more threads than
    free cores make it many times slower). Every mask is timed at a position its matcher
    has not computed before: a matcher keeps the mask of its current position."""
    torch.set_num_threads(threads)
    checkpoint = load_checkpoint(model)
    tokenizer = checkpoint.tokenizer
    compiler = GrammarCompiler(tokenizer, checkpoint.config.vocab_size, checkpoint.eos_token_ids)
    schemas = [wide_schema(v) for v in range(variants)]
    def compile_schema(schema: dict) -> None:
        compiler.compile(StructuredOutput.json_schema(schema))

    def fill_rows(rows: list[GrammarMatcher]) -> None:
        for i, matcher in enumerate(rows):
            matcher.fill_mask(batch_bitmask, i)

    def batch_at_mid(rep: int) -> list[GrammarMatcher]:
        return [mid_object(compiler, tokenizer, schemas[(rep + i) % variants])[0] for i in range(batch)]

    cold = [timed(compile_schema, s) for s in schemas]
    hits = [timed(compile_schema, schemas[0]) for _ in range(variants)]
    bitmask = new_bitmask(1, compiler.vocab_size)
    # The first mask of a fresh grammar is what a request's first token waits for.
    fresh = [compiler.matcher(StructuredOutput.json_schema(s)) for s in schemas]
    first_masks = [timed(m.fill_mask, bitmask, 0) for m in fresh]
    mids = [mid_object(compiler, tokenizer, s) for s in schemas]
    mid_masks = [timed(m.fill_mask, bitmask, 0) for m, _ in mids]
    batch_bitmask, logits = new_bitmask(batch, compiler.vocab_size), torch.zeros(batch, compiler.vocab_size)
    batch_fills = [timed(fill_rows, batch_at_mid(rep)) for rep in range(variants)]
    batch_masks = [timed(apply_grammar_masks, logits, batch_at_mid(rep)) for rep in range(variants)]
    return {"model": model, "threads": threads, "cpus": os.cpu_count(), "vocab_size": compiler.vocab_size,
            "properties": len(schemas[0]["properties"]), "variants": variants,
            "first_compile_s": cold[0], "cold_compile_median_s": statistics.median(cold[1:]), "cold_compiles_s": cold,
            "cache_hit_median_s": statistics.median(hits),
            "first_mask_s": first_masks[0], "first_mask_median_s": statistics.median(first_masks[1:]),
            "mid_position_tokens": mids[0][1], "mid_mask_median_s": statistics.median(mid_masks),
            "batch": batch, "batch_fill_median_s": statistics.median(batch_fills),
            "batch_masks_median_s": statistics.median(batch_masks)}


def compile_lines(c: dict) -> list[str]:
    rows = (("first compile (cold)", "first_compile_s"),
            (f"cold compile, median of {c['variants'] - 1} fresh variants", "cold_compile_median_s"),
            ("cache hit (median)", "cache_hit_median_s"),
            ("first mask of the first grammar", "first_mask_s"),
            ("first mask of a fresh grammar (median)", "first_mask_median_s"),
            (f"mask after {c['mid_position_tokens']} tokens, mid-object (median)", "mid_mask_median_s"),
            (f"{c['batch']} masks, mid-object: grammar only (median)", "batch_fill_median_s"),
            (f"{c['batch']} masks, mid-object: apply_grammar_masks (median)", "batch_masks_median_s"))
    title = (f"grammar compile: {c['properties']}-property JSON schema, tokenizer of {c['model']} "
             f"({c['vocab_size']} tokens); {c['cpus']} cpus, {c['threads']} torch thread(s)")
    return [title, *(f"  {label:<54}{1000 * c[key]:9.3f} ms" for label, key in rows)]


# ---------------------------------------------------------------- one request

@dataclass
class ChatRecord:
    """One streamed chat as the client saw it; times are time.perf_counter() seconds."""

    schema_name: str
    sent: float = 0.0
    first_token: float | None = None
    last_token: float | None = None
    usage_tokens: int | None = None  # completion_tokens of the final usage
    seen_tokens: int = 0  # token ids seen (a chunk without them counts as one)
    cached_tokens: int | None = None
    content: str = ""
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.first_token is not None

    @property
    def tokens(self) -> int:
        """From the usage; the tokens seen when the server sent none."""
        return self.seen_tokens if self.usage_tokens is None else self.usage_tokens

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def tpot(self) -> float | None:
        """None below MIN_TPOT_TOKENS tokens (too few gaps to say anything)."""
        if not self.ok or self.tokens < MIN_TPOT_TOKENS:
            return None
        return (self.last_token - self.first_token) / (self.tokens - 1)


def request_body(prompt: JsonPrompt, constrained: bool, max_tokens: int, model: str | None,
                 extras: dict) -> dict:
    """The two passes' bodies differ in response_format, and in the unconstrained pass's
    fixed length (max_tokens: the JSON reply's length, ignore_eos)."""
    body = {"messages": prompt.messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **extras}
    if not constrained:
        body["ignore_eos"] = True
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": prompt.schema_name, "schema": prompt.schema, "strict": True}}
    return body if model is None else {"model": model, **body}


def take_event(record: ChatRecord, event: dict, now: float) -> None:
    """Fold one SSE event, which arrived at `now`, into `record`."""
    if "error" in event:
        record.error = f"error event: {json.dumps(event['error'])[:300]}"
        return
    for choice in event.get("choices") or []:
        if has_tokens(choice):
            if record.first_token is None:
                record.first_token = now
            record.last_token = now
            record.seen_tokens += len(choice.get("token_ids") or []) or 1
        record.content += (choice.get("delta") or {}).get("content") or ""
        record.finish_reason = choice.get("finish_reason") or record.finish_reason
    if usage := event.get("usage"):
        record.usage_tokens = usage.get("completion_tokens")
        record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")


async def stream_chat(client: httpx.AsyncClient, body: dict, record: ChatRecord) -> None:
    """POST one streamed chat and fill `record` in; a failure goes to `record.error`."""
    record.sent = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
                return
            async for line in response.aiter_lines():
                now = time.perf_counter()
                data = line[len("data:"):].strip() if line.startswith("data:") else None
                if data is None or data == "[DONE]":
                    continue
                take_event(record, json.loads(data), now)
                if record.error:
                    return
    except (httpx.HTTPError, httpx.StreamError, ValueError, TypeError, AttributeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return
    if record.finish_reason is None:
        record.error = "the stream ended without a finish reason"
    elif record.first_token is None:
        record.error = "the stream carried no tokens"


# ---------------------------------------------------------------- a pass and its statistics

async def run_pass(client: httpx.AsyncClient, model: str | None, prompts: Sequence[JsonPrompt],
                   constrained: bool, args: argparse.Namespace, extras: dict, label: str,
                   lengths: Sequence[int] | None = None) -> list[ChatRecord]:
    """Every prompt once, at most `args.concurrency` in flight (a closed loop); prompt i
    asks for lengths[i] tokens when given (else --max-tokens)."""
    gate = asyncio.Semaphore(args.concurrency)
    progress = Progress(label, len(prompts))
    records = [ChatRecord(p.schema_name) for p in prompts]

    async def one(i: int, prompt: JsonPrompt, record: ChatRecord) -> None:
        max_tokens = lengths[i] if lengths else args.max_tokens
        async with gate:
            await stream_chat(client, request_body(prompt, constrained, max_tokens, model, extras), record)
        progress.tick()

    await asyncio.gather(*(one(i, p, r) for i, (p, r) in enumerate(zip(prompts, records))))
    return records


def is_valid(content: str, schema: dict) -> bool:
    """The text parses as JSON as it is and matches `schema` (draft 2020-12)."""
    try:
        value = json.loads(content)
    except ValueError:
        return False
    return jsonschema.Draft202012Validator(schema).is_valid(value)


@dataclass(frozen=True)
class PassStats:
    """One pass; times in seconds, None when nothing was measured."""

    completed: int
    failed: int
    tokens: int
    tpot_requests: int  # completed with >= MIN_TPOT_TOKENS tokens
    tpot_median: float | None
    tpot_mean: float | None
    ttft_median: float | None
    cached_tokens_mean: float | None
    valid: int  # completed outputs that parse and match their prompt's schema
    cut_by_max_tokens: int  # completed with finish_reason "length"

    @property
    def valid_share(self) -> float | None:
        return self.valid / self.completed if self.completed else None


def pass_stats(records: Sequence[ChatRecord], prompts: Sequence[JsonPrompt]) -> PassStats:
    done = [(r, p) for r, p in zip(records, prompts) if r.ok]
    tpots = [r.tpot for r, _ in done if r.tpot is not None]
    cached = [r.cached_tokens for r, _ in done if r.cached_tokens is not None]
    return PassStats(
        completed=len(done), failed=len(records) - len(done), tokens=sum(r.tokens for r, _ in done),
        tpot_requests=len(tpots), tpot_median=statistics.median(tpots) if tpots else None,
        tpot_mean=statistics.fmean(tpots) if tpots else None,
        ttft_median=statistics.median([r.ttft for r, _ in done]) if done else None,
        cached_tokens_mean=statistics.fmean(cached) if cached else None,
        valid=sum(is_valid(r.content, p.schema) for r, p in done),
        cut_by_max_tokens=sum(r.finish_reason == "length" for r, _ in done))


def tpot_ratios(constrained: PassStats, unconstrained: PassStats) -> dict:
    """json_schema / unconstrained TPOT (median and mean) and the verdicts on both targets."""
    median = ratio(constrained.tpot_median, unconstrained.tpot_median)
    return {"tpot_median": median, "tpot_mean": ratio(constrained.tpot_mean, unconstrained.tpot_mean),
            "ttft_median": ratio(constrained.ttft_median, unconstrained.ttft_median),
            "tpot_target_met": None if median is None else median <= TPOT_RATIO_TARGET,
            "all_valid": constrained.completed > 0 and constrained.valid == constrained.completed}


def record_json(record: ChatRecord, started: float) -> dict:
    """`record` with its times as seconds from `started`, plus its TTFT and TPOT in ms."""
    out = asdict(record)
    for name in ("sent", "first_token", "last_token"):
        out[name] = None if out[name] is None else out[name] - started
    out.update(tokens=record.tokens, ttft_ms=None if record.ttft is None else 1000 * record.ttft,
               tpot_ms=None if record.tpot is None else 1000 * record.tpot)
    return out


# ---------------------------------------------------------------- a server: warm-up and both passes

WARMUP_PROMPT = [{"role": "user", "content": "Name one colour as a JSON object with the field colour."}]


async def warm_up(client: httpx.AsyncClient, model: str | None, base_url: str, extras: dict) -> None:
    """One short chat unconstrained and one as any JSON object (it warms the grammar engine
    but compiles none of the measured schemas); both must succeed."""
    prompt = JsonPrompt(WARMUP_PROMPT, "warmup", {"type": "object"})
    for constrained in (False, True):
        record = ChatRecord("warmup")
        body = request_body(prompt, False, MIN_TPOT_TOKENS, model, extras)
        if constrained:
            body["response_format"] = {"type": "json_object"}
        await stream_chat(client, body, record)
        if not record.ok:
            raise BenchError(f"the warm-up chat to {base_url} ({'json_object' if constrained else 'unconstrained'}) "
                             f"failed: {record.error}. Is it an OpenAI server with structured outputs?")


async def both_passes(base_url: str, api_key: str | None, prompts: Sequence[JsonPrompt],
                      args: argparse.Namespace, extras: dict, label: str) -> dict:
    """Warm up; a json_schema pass for each reply's length; then the unconstrained and the
    json_schema pass over the same prompts and lengths;
    the server's entry of the result (statistics, ratios, every request)."""
    async with make_client(base_url, api_key, args.request_timeout) as client:
        model = await served_model(client)
        await warm_up(client, model, base_url, extras)
        started = time.perf_counter()
        sized = await run_pass(client, model, prompts, True, args, extras, f"{label} lengths")
        lengths = [r.tokens or args.max_tokens for r in sized]
        records = {name: await run_pass(client, model, prompts, name == "json_schema", args, extras,
                                        f"{label} {name}", lengths) for name in PASSES}
    stats = {name: pass_stats(records[name], prompts) for name in PASSES}
    return {"label": label, "base_url": base_url, "model": model,
            "ratios": tpot_ratios(stats["json_schema"], stats["unconstrained"]),
            "passes": {name: {"stats": {**asdict(stats[name]), "valid_share": stats[name].valid_share},
                              "errors": sorted({r.error for r in records[name] if r.error})[:3],
                              "requests": [record_json(r, started) for r in records[name]]}
                       for name in PASSES}}


def measure_pdserve(args: argparse.Namespace, prompts: Sequence[JsonPrompt]) -> dict:
    def run(base_url: str) -> dict:
        return asyncio.run(both_passes(base_url, args.api_key, prompts, args, FLAVORS["pdserve"], "pdserve"))

    if args.base_url:
        return run(args.base_url.rstrip("/"))
    with launched_server(args, args.server_args) as base_url:
        return run(base_url)


def measure_peer(args: argparse.Namespace, peer: PeerStatus, prompts: Sequence[JsonPrompt]) -> tuple[dict | None, str | None]:
    """The peer's passes, or None and why not; pdserve's numbers stand either way."""
    if not peer.available:
        return None, peer.problem
    try:
        return asyncio.run(both_passes(peer.url, args.peer_api_key, prompts, args, FLAVORS[args.peer_flavor],
                                       args.peer_name)), None
    except BenchError as exc:
        return None, (f"The peer {peer.name!r} answered /v1/models but its run failed: {exc} (A refused field "
                      f"means another --peer-flavor: {', '.join(sorted(FLAVORS))}.) Reporting pdserve alone.")


# ---------------------------------------------------------------- report

def ms(seconds: float | None) -> str:
    return fmt(None if seconds is None else 1000 * seconds, ".1f")


def server_lines(server: dict, width: int = 10) -> list[str]:
    """Its two passes as table rows (the label `width` wide), its failures and its verdicts."""
    lines = []
    for name in PASSES:
        s = server["passes"][name]["stats"]
        lines.append(f"{server['label']:<{width}}{name:<15}{s['completed']:>5}/{s['failed']:<4}{s['tokens']:>8}"
                     f"{fmt(s['cached_tokens_mean']):>8}{ms(s['ttft_median']):>10}{ms(s['tpot_median']):>10}"
                     f"{ms(s['tpot_mean']):>10}{s['valid']:>7}/{s['completed']:<4}{s['cut_by_max_tokens']:>5}")
        lines += [f"  failure: {error}" for error in server["passes"][name]["errors"]]
    r, valid = server["ratios"], server["passes"]["json_schema"]["stats"]
    verdict = "n/a" if r["tpot_target_met"] is None else "met" if r["tpot_target_met"] else "MISSED"
    lines.append(f"{server['label']}: json_schema/unconstrained TPOT p50 {fmt_ratio(r['tpot_median'])}, mean "
                 f"{fmt_ratio(r['tpot_mean'])} (target <= {TPOT_RATIO_TARGET}: {verdict}); TTFT p50 "
                 f"{fmt_ratio(r['ttft_median'])}; json_schema outputs valid {valid['valid']}/{valid['completed']} "
                 f"(target all: {'met' if r['all_valid'] else 'MISSED'})")
    return lines


def serving_lines(args: argparse.Namespace, servers: Sequence[dict]) -> list[str]:
    title = (f"TPOT at concurrency {args.concurrency}: {args.requests} chats asking for JSON, max_tokens "
             f"{args.max_tokens}, greedy, streamed; TPOT over requests with >= {MIN_TPOT_TOKENS} tokens")
    width = max(10, *(len(s["label"]) + 2 for s in servers))
    header = (f"{'server':<{width}}{'pass':<15}{'ok/failed':>10}{'tokens':>8}{'cached':>8}{'TTFT p50':>10}"
              f"{'TPOT p50':>10}{'TPOT mean':>10}{'valid':>12}{'cut':>5}   (ms; cached: mean prompt tokens)")
    lines = [title, header]
    for server in servers:
        lines += server_lines(server, width)
    if len(servers) == 2:
        a, b = (s["passes"]["json_schema"]["stats"]["tpot_median"] for s in servers)
        lines.append(f"json_schema TPOT p50 {servers[0]['label']}/{servers[1]['label']}: {fmt_ratio(ratio(a, b))}")
    return lines


class Report:
    """Lines printed as they come and kept for the .txt result."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, lines: Sequence[str]) -> None:
        print("\n".join(lines), flush=True)
        self.lines += lines


def free_stem(directory: Path, name: str) -> Path:
    """directory/name, or name-2, name-3, ...: the first stem with neither a .txt nor a .json."""
    stem, n = directory / name, 1
    while stem.with_suffix(".txt").exists() or stem.with_suffix(".json").exists():
        n += 1
        stem = directory / f"{name}-{n}"
    return stem


def write_results(directory: Path, report: Report, result: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stem = free_stem(directory, "structured_outputs")
    # "x": should another run claim the name between the check and the write, fail loudly.
    with stem.with_suffix(".json").open("x") as f:
        f.write(json.dumps(json_safe(result), indent=1, allow_nan=False))
    with stem.with_suffix(".txt").open("x") as f:
        f.write("\n".join(report.lines) + "\n")
    return stem


# ---------------------------------------------------------------- command line

def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", choices=("compile", "serving"), help="run one part (default: both)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="its tokenizer for the compile part; passed to "
                   "the launched server")
    p.add_argument("--compile-variants", type=positive_int, default=8, help="cold compiles (at least 2)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads of the compile part "
                   "(a worker's share of the cores)")
    p.add_argument("--requests", type=positive_int, default=32, help="chats per pass")
    p.add_argument("--max-tokens", type=positive_int, default=128)
    p.add_argument("--concurrency", type=positive_int, default=8)
    p.add_argument("--base-url", help="a running pdserve (default: launch one)")
    p.add_argument("--server-args", default="", help="extra `pdserve serve` flags for the launched server, "
                   "one quoted string")
    p.add_argument("--api-key", help="sent as a bearer token; passed to the launched server")
    p.add_argument("--serve-command", default=default_serve_command(), help="what launches the server")
    p.add_argument("--server-timeout", type=float, default=300.0, help="s to wait for /health")
    p.add_argument("--server-stop-timeout", type=float, default=30.0, help="s from SIGINT to SIGKILL")
    p.add_argument("--request-timeout", type=float, default=600.0, help="s per request")
    p.add_argument("--peer-url", help="another OpenAI server, e.g. http://127.0.0.1:8100")
    p.add_argument("--peer-name", default="peer", help="its label in the output")
    p.add_argument("--peer-flavor", choices=sorted(FLAVORS), default="vllm", help="its extra body fields")
    p.add_argument("--peer-api-key", help="sent to the peer as a bearer token")
    p.add_argument("--result-dir", type=Path, default=RESULTS_DIR, help="where the .txt and .json go")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compile_variants < 2:
        parser.error("--compile-variants must be at least 2 (the first compile is reported apart)")
    if args.max_tokens < MIN_TPOT_TOKENS:
        parser.error(f"--max-tokens must be at least {MIN_TPOT_TOKENS}: TPOT counts requests with that many tokens")
    if args.base_url and args.server_args:
        parser.error("--server-args configures a launched server; it cannot apply to --base-url")
    return args


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the `with` that stops a launched server


def run(args: argparse.Namespace, report: Report) -> dict:
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "cpus": os.cpu_count()}
    if args.only != "serving":
        result["compile"] = compile_timings(args.model, args.compile_variants, args.threads)
        report.add(compile_lines(result["compile"]))
    if args.only != "compile":
        prompts = json_prompts(args.requests)
        # Looked at before pdserve runs, so that a missing peer is known at once.
        peer = probe_peer(args.peer_name, args.peer_url.rstrip("/"), args.peer_api_key) if args.peer_url else None
        if peer is not None:
            print(peer.problem or f"peer {peer.name!r}: {peer.url}, model {peer.model!r} (runs after pdserve)",
                  flush=True)
        servers = [measure_pdserve(args, prompts)]
        if peer is not None:
            peer_run, problem = measure_peer(args, peer, prompts)
            result["peer"] = {"url": peer.url, "ran": peer_run is not None, "problem": problem}
            servers += [peer_run] if peer_run is not None else []
        report.add(serving_lines(args, servers) + ([problem] if peer is not None and problem else []))
        result["servers"] = servers
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    report = Report()
    try:
        result = run(args, report)
    except BenchError as exc:
        print(f"structured_outputs.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("structured_outputs.py: interrupted", file=sys.stderr)
        return 130
    stem = write_results(args.result_dir, report, result)
    print(f"wrote {stem}.txt and {stem}.json")
    failed = sum(p["stats"]["failed"] for p in result.get("servers", [{}])[0].get("passes", {}).values())
    if failed:
        print(f"structured_outputs.py: {failed} pdserve request(s) failed (see above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
