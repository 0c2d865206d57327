"""A cancellation storm: 1,000 streams against `pdserve serve` (1 prefill + 2 decode
workers, a self-draft speculating on the decode workers), each cut at a random point -
before the gateway answers, before its prompt reaches a worker, during its KV transfer,
after some tokens (mid-decode, mid-speculation) - while decode-0's engine crashes under
the load (`PDSERVE_FAULT_PLAN`), so that some streams are cut mid-migration. Afterwards
every pool is back to baseline (prefill, decode and draft KV), no KV ticket is left, the
gateway holds no request, and the counters agree with what the clients did.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from serve_process import API_KEY, ServeProcess, busy_workers, wait_for, workers_idle

NUM_STREAMS = 1000
CONCURRENCY = 40
FAULTS = "decode-0:crash@150"


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    process = ServeProcess(str(tiny_llama_dir), "--prefill-workers", "1", "--decode-workers", "2",
                           "--router", "round_robin", "--local-prefill-tokens", "8",
                           "--speculative", "draft", "--draft-layers", "1", "--num-speculative-tokens", "3",
                           "--max-in-flight", "4000", "--max-queued-requests", "4000",
                           env={"PDSERVE_FAULT_PLAN": FAULTS})
    yield process
    process.stop_and_check()


def _sum(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def test_a_thousand_cancelled_streams_leave_nothing_behind(server):
    rng = random.Random(2026)
    plans = []
    for _ in range(NUM_STREAMS):
        prompt = [rng.randrange(60, 300) for _ in range(rng.randint(2, 60))]
        # ("cancel", seconds): the client gives up after a short wait, whatever arrived;
        # ("read", n): it reads n chunks and hangs up (unless the stream ended first).
        plan = ("cancel", rng.uniform(0.0, 0.05)) if rng.random() < 0.4 else ("read", rng.randint(1, 30))
        sampling = {"temperature": 0.0} if rng.random() < 0.5 else {"temperature": 0.8, "seed": rng.randrange(1000)}
        plans.append((prompt, plan, sampling))
    cut_after_tokens = 0

    async def one(client: httpx.AsyncClient, prompt, plan, sampling) -> None:
        nonlocal cut_after_tokens
        body = {"model": server.model_name, "prompt": prompt, "max_tokens": 200, "ignore_eos": True,
                "stream": True, **sampling}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            chunks = 0
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    assert '"error"' not in line, line
                    chunks += 1  # a chunk carries one token or more (held-back text, drafts)
                    if chunks == plan[1] and '"finish_reason":null' in line:
                        cut_after_tokens += 1
                        return  # leaving the block closes the connection mid-stream

    async def storm() -> None:
        limit = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(base_url=server.http_url, timeout=120,
                                     headers={"Authorization": f"Bearer {API_KEY}"},
                                     limits=httpx.Limits(max_connections=None)) as client:
            async def guarded(prompt, plan, sampling) -> None:
                async with limit:
                    task = asyncio.ensure_future(one(client, prompt, plan, sampling))
                    if plan[0] == "cancel":
                        await asyncio.wait({task}, timeout=plan[1])
                        task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass

            await asyncio.gather(*(guarded(*p) for p in plans))

    asyncio.run(storm())

    def settled() -> dict[str, float] | None:
        metrics = server.metrics()
        clean = (workers_idle(metrics) and _sum(metrics, "pdserve_worker_kv_tickets_live") == 0
                 and _sum(metrics, "pdserve_worker_draft_kv_blocks") == 0
                 and metrics.get("pdserve_requests_in_flight") == 0
                 and metrics.get('pdserve_workers{role="decode",state="serving"}') == 2)
        return metrics if clean else None

    def still() -> dict[str, float]:
        metrics = server.metrics()
        return {**busy_workers(metrics), **{k: v for k, v in metrics.items() if v and k.startswith((
            "pdserve_worker_kv_tickets_live", "pdserve_worker_draft_kv_blocks", "pdserve_requests_in_flight",
            'pdserve_workers{role="decode"'))}}

    metrics = wait_for(settled, timeout=180, what="every pool at baseline, no ticket, nothing in flight",
                       state=still)
    assert metrics.get('pdserve_workers_replaced_total', 0) >= 1, "the injected crash happened under the storm"
    aborted = metrics.get('pdserve_requests_finished_total{finish_reason="abort"}', 0)
    assert aborted >= cut_after_tokens, "every stream cut after its first token counts as aborted"
    finished = _sum(metrics, "pdserve_requests_finished_total")
    assert finished <= NUM_STREAMS and metrics.get("pdserve_request_errors_total", 0) == 0
    # And the cluster still answers.
    done = server.client().completions.create(model=server.model_name, prompt=[61, 62, 63], max_tokens=5,
                                              extra_body={"ignore_eos": True})  # sampled: EOS may come early
    assert done.usage.completion_tokens == 5
