"""The serving benchmark's HTTP client: streamed `/v1/completions` requests, each one
timed into a `RequestRecord`, and `run_load`, which sends a workload on its schedule
through an optional concurrency gate after one warm-up request.

A request that fails (HTTP error, error event, broken stream) is recorded as failed; only
a failed warm-up ends the run (`BenchError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from typing import NamedTuple

import httpx
import numpy as np
from serving_stats import RequestRecord
from serving_workload import FIRST_TOKEN_ID, OVERHEAD_PROMPT_LEN, BenchError, BenchRequest


def completion_payload(model: str | None, prompt_ids: list[int], max_tokens: int) -> dict:
    # return_token_ids: a token whose text the server holds back (part of a UTF-8
    # character) still arrives as a chunk, so ITL sees every token.
    payload = {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    return payload if model is None else {"model": model, **payload}


async def stream_completion(client: httpx.AsyncClient, payload: dict, record: RequestRecord) -> None:
    """Send one streamed completion and fill `record` in; failures go to `record.error`."""
    record.sent = time.perf_counter()
    ended = False
    try:
        async with client.stream("POST", "/v1/completions", json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {body[:300]}"
                return
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    ended = True
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = f"error event: {json.dumps(event['error'])[:300]}"
                    return
                choices = event.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("token_ids")):
                    record.chunk_times.append(now)
                if choices and choices[0].get("finish_reason"):
                    ended = True
                if usage := event.get("usage"):
                    record.usage_tokens = usage.get("completion_tokens")
                    record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        record.finished = time.perf_counter()
        if not ended:
            record.error = "the stream ended without a finish reason or [DONE]"
        elif not record.chunk_times:
            record.error = "the stream carried no tokens"
    except (httpx.HTTPError, httpx.StreamError, ValueError, TypeError, AttributeError) as exc:
        # A broken response (transport, malformed SSE or JSON) fails this request, not the run.
        record.error = f"{type(exc).__name__}: {exc}"


def make_client(base_url: str, api_key: str | None, timeout: float) -> httpx.AsyncClient:
    # trust_env=False: a proxy from the environment must not sit between us and 127.0.0.1.
    return httpx.AsyncClient(
        base_url=base_url, timeout=httpx.Timeout(timeout), trust_env=False,
        headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def served_model(client: httpx.AsyncClient) -> str | None:
    """The first model of /v1/models, or None (the request then names no model)."""
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
        response = await client.get("/v1/models")
        if response.status_code == 200:
            return response.json()["data"][0]["id"]
    return None


async def warm_up(client: httpx.AsyncClient, model: str | None, base_url: str) -> None:
    """One small request outside the measurement; it must succeed before anything is timed."""
    prompt = list(range(FIRST_TOKEN_ID, FIRST_TOKEN_ID + OVERHEAD_PROMPT_LEN))
    record = RequestRecord(len(prompt), 4)
    await stream_completion(client, completion_payload(model, prompt, 4), record)
    if not record.ok:
        raise BenchError(f"the warm-up request to {base_url}/v1/completions failed: {record.error}. "
                         "Check that the server is up and serves an OpenAI-compatible completions API.")


class Progress:
    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.every = max(1, total // 10)

    def tick(self) -> None:
        self.done += 1
        if self.done % self.every == 0 or self.done == self.total:
            print(f"  {self.label}: {self.done}/{self.total} requests done", file=sys.stderr, flush=True)


class LoadRun(NamedTuple):
    records: list[RequestRecord]
    started: float  # time.perf_counter() when the first request was due
    duration_s: float  # until the last stream ended


async def run_load(base_url: str, requests: Sequence[BenchRequest], offsets: np.ndarray,
                   max_concurrency: int | None, api_key: str | None, timeout: float,
                   label: str) -> LoadRun:
    """Send each request at its offset, then through the concurrency gate, after one
    warm-up request."""
    async with make_client(base_url, api_key, timeout) as client:
        model = await served_model(client)
        await warm_up(client, model, base_url)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
        progress = Progress(label, len(requests))
        records = [RequestRecord(len(r.prompt_ids), r.output_len, float(due)) for r, due in
                   zip(requests, offsets)]

        async def one(request: BenchRequest, record: RequestRecord) -> None:
            await asyncio.sleep(max(0.0, started + record.due - time.perf_counter()))
            async with gate:
                await stream_completion(client, completion_payload(model, request.prompt_ids,
                                                                   request.output_len), record)
            progress.tick()

        started = time.perf_counter()
        await asyncio.gather(*(one(r, rec) for r, rec in zip(requests, records)))
        return LoadRun(records, started, time.perf_counter() - started)
