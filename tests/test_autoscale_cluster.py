"""Autoscaling end to end on local Ray: `pdserve serve --autoscale` with the tiny model.

A burst of long prompts queues prompt tokens on the prefill worker and adds a second
one; a burst of concurrent short chats (prefilled on the decode worker, which runs at
most 4 at a time) queues requests there and adds a decode worker. Both scale back down
while light traffic keeps flowing: every request completes in full and no KV is left
held. Assertions read /metrics (decisions and worker counts), never timings.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from serve_process import API_KEY, ServeProcess, wait_for, workers_idle

SCALING = ["--autoscale", "--min-prefill", "1", "--max-prefill", "2", "--min-decode", "1", "--max-decode", "2",
           "--autoscale-prefill-tokens", "400", "--autoscale-decode-waiting", "2", "--autoscale-window", "1",
           "--autoscale-up-cooldown", "1", "--autoscale-down-delay", "8", "--autoscale-down-cooldown", "2"]
LIMITS = ["--kv-cache-memory", "32", "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-prefill-chunk", "32",
          "--local-prefill-tokens", "16"]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    process = ServeProcess(str(tiny_llama_dir), "--prefill-workers", "1", "--decode-workers", "1",
                           *SCALING, *LIMITS)
    yield process
    process.stop_and_check()


def _serving(server: ServeProcess, role: str) -> int:
    return int(server.metrics().get(f'pdserve_workers{{role="{role}",state="serving"}}', 0))


def _decisions(server: ServeProcess, role: str, direction: str) -> int:
    return int(server.metrics().get(
        f'pdserve_autoscaler_decisions_total{{direction="{direction}",role="{role}"}}', 0))


async def _burst(server: ServeProcess, prompts: list[list[int]], max_tokens: int) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(timeout=600) as client:
        return await asyncio.gather(*(client.post(
            f"{server.http_url}/v1/completions", headers=headers,
            json={"model": server.model_name, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                  "ignore_eos": True}) for p in prompts))


def _complete(responses: list[httpx.Response], max_tokens: int) -> None:
    assert [r.status_code for r in responses] == [200] * len(responses)
    assert all(r.json()["usage"]["completion_tokens"] == max_tokens for r in responses)


def _saw(server: ServeProcess, role: str, count: int, during) -> bool:
    """Run `during` (a coroutine) while polling /metrics; True if `count` serving workers
    of `role` were seen at some poll."""
    seen = False

    async def watch(task: asyncio.Task) -> None:
        nonlocal seen
        while not task.done():
            seen = seen or await asyncio.to_thread(_serving, server, role) >= count
            await asyncio.sleep(0.2)

    async def both():
        task = asyncio.ensure_future(during)
        await asyncio.gather(task, watch(task))
        return task.result()

    return seen, asyncio.run(both())


def test_long_prompt_burst_adds_a_prefill_worker(server):
    prompts = [[(i * 7 + j) % 250 + 60 for j in range(500)] for i in range(60)]
    seen, responses = _saw(server, "prefill", 2, _burst(server, prompts, 2))
    _complete(responses, 2)
    assert _decisions(server, "prefill", "up") >= 1
    seen = seen or wait_for(lambda: _serving(server, "prefill") == 2, timeout=60, what="a second prefill worker")
    assert seen


def test_concurrent_short_chats_add_a_decode_worker(server):
    prompts = [[(i * 13 + j) % 250 + 60 for j in range(8)] for i in range(40)]
    seen, responses = _saw(server, "decode", 2, _burst(server, prompts, 60))
    _complete(responses, 60)
    assert _decisions(server, "decode", "up") >= 1
    seen = seen or wait_for(lambda: _serving(server, "decode") == 2, timeout=60, what="a second decode worker")
    assert seen


def test_scale_down_during_traffic_loses_no_request_and_leaks_no_kv(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    deadline = time.monotonic() + 180
    served = 0
    with httpx.Client(timeout=120) as client:
        while (_serving(server, "prefill"), _serving(server, "decode")) != (1, 1) or served < 5:
            assert time.monotonic() < deadline, "the cluster did not scale back down"
            response = client.post(f"{server.http_url}/v1/completions", headers=headers, json={
                "model": server.model_name, "prompt": [(served * 5 + j) % 250 + 60 for j in range(40)],
                "max_tokens": 8, "temperature": 0, "ignore_eos": True})
            assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 8
            served += 1
    assert _decisions(server, "prefill", "down") >= 1 and _decisions(server, "decode", "down") >= 1
    wait_for(lambda: workers_idle(server.metrics()), what="no KV held after the scale-down")
