"""The serving benchmark's HTTP client: streamed completions and chat completions, each
one timed into a `RequestRecord`, and `run_load`, which sends a workload on its schedule
through an optional concurrency gate after a few warm-up requests.

A request is a `BenchRequest` (token ids, /v1/completions) or a `ChatRequest` (messages,
/v1/chat/completions): anything with `path`, `prompt_body()` and `output_len`. Every request
is streamed, greedy, asks for the usage in its last chunk, and carries the extra fields of
the server's flavour (flavors.py): the vLLM-named extensions that make it produce exactly
`max_tokens` tokens where the server has them.

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

from pdserve.cluster.benchmark.flavors import Extras, pdserve_extras
from pdserve.cluster.benchmark.stats import RequestRecord
from pdserve.cluster.benchmark.workload import BenchError, BenchRequest, token_warmups


def request_payload(request, model: str | None, extras: Extras = pdserve_extras) -> dict:
    """The streamed, greedy body of `request` for a server of the given flavour; `model`
    None leaves the model out (the server's own)."""
    payload = {**request.prompt_body(), "max_tokens": request.output_len, "temperature": 0.0,
               **extras(request.output_len), "stream": True, "stream_options": {"include_usage": True}}
    return payload if model is None else {"model": model, **payload}


def completion_payload(model: str | None, prompt_ids: list[int], max_tokens: int) -> dict:
    return request_payload(BenchRequest(prompt_ids, max_tokens), model)


def has_tokens(choice: dict) -> bool:
    """Whether a streamed choice carries output: completion text, chat content or token ids."""
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content") or choice.get("token_ids"))


async def stream_completion(client: httpx.AsyncClient, payload: dict, record: RequestRecord,
                            path: str = "/v1/completions") -> None:
    """POST one streamed request to `path` and fill `record` in; failures go to `record.error`."""
    record.sent = time.perf_counter()
    ended = False
    try:
        async with client.stream("POST", path, json=payload) as response:
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
                if choices and has_tokens(choices[0]):
                    record.chunk_times.append(now)
                if choices and choices[0].get("finish_reason"):
                    ended = True
                if usage := event.get("usage"):
                    record.usage_tokens = usage.get("completion_tokens")
                    record.server_prompt_tokens = usage.get("prompt_tokens")
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
    """The first model of /v1/models, or None (the request then names no model). Raises
    BenchError when nothing accepts a connection at the client's address."""
    try:
        response = await client.get("/v1/models")
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        url = str(client.base_url).rstrip("/")
        raise BenchError(f"cannot connect to {url} ({type(exc).__name__}: {exc}): is the server running "
                         "there? Start it, or point --url at one that is.") from exc
    except httpx.HTTPError:
        return None
    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
        if response.status_code == 200:
            return response.json()["data"][0]["id"]
    return None


async def send(client: httpx.AsyncClient, request, model: str | None, extras: Extras,
               record: RequestRecord) -> None:
    await stream_completion(client, request_payload(request, model, extras), record, request.path)


async def warm_up(client: httpx.AsyncClient, model: str | None, base_url: str, requests: Sequence,
                  extras: Extras) -> None:
    """The warm-up, outside the measurement: the first request alone (it must succeed, which
    shows the server is up and speaks the API), then the others together."""
    records = [RequestRecord(r.prompt_len, r.output_len) for r in requests]
    for group in (range(1), range(1, len(requests))):
        await asyncio.gather(*(send(client, requests[i], model, extras, records[i]) for i in group))
        for i in group:
            if not records[i].ok:
                raise BenchError(f"the warm-up request to {base_url}{requests[i].path} failed: "
                                 f"{records[i].error}. Check that the server is up and serves an "
                                 "OpenAI-compatible API.")


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


async def run_load(base_url: str, requests: Sequence, offsets: np.ndarray,
                   max_concurrency: int | None, api_key: str | None, timeout: float,
                   label: str, *, extras: Extras = pdserve_extras, warmups: Sequence | None = None) -> LoadRun:
    """Warm up with `warmups` (default: one short token-id prompt), then send each request at
    its offset, through the concurrency gate (FIFO: with every offset 0 this is a closed loop
    that starts the next request as soon as one ends). Records are in request order."""
    async with make_client(base_url, api_key, timeout) as client:
        model = await served_model(client)
        await warm_up(client, model, base_url, token_warmups(1) if warmups is None else warmups, extras)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
        progress = Progress(label, len(requests))
        records = [RequestRecord(r.prompt_len, r.output_len, float(due)) for r, due in zip(requests, offsets)]

        async def one(request, record: RequestRecord) -> None:
            await asyncio.sleep(max(0.0, started + record.due - time.perf_counter()))
            async with gate:
                await send(client, request, model, extras, record)
            progress.tick()

        started = time.perf_counter()
        await asyncio.gather(*(one(r, rec) for r, rec in zip(requests, records)))
        return LoadRun(records, started, time.perf_counter() - started)
