"""The cluster notices what goes wrong inside it: `pdserve serve` on local Ray with two
prefill and two decode workers started together, and faults injected into the decode
workers' engine threads (`PDSERVE_FAULT_PLAN`, see pdserve.cluster.workers.faults).

- Start-up: all four (prefill, decode) pairs are linked, whatever order the workers came
  up in (`pdserve_kv_links`), and prompts go to the prefill workers for both decode workers.
- Liveness: decode-0's engine hangs and decode-1's crashes after 40 steps. The controller
  sees each (heartbeat age past --engine-hang-timeout; a dead loop), replaces the worker,
  the streams they held end with an error (none hangs: migration is off here, see
  test_migration.py for streams that move on), the replacements get linked, and the
  cluster serves the greedy reference output again.
Assertions read the public API and /metrics, never timings.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from serve_process import API_KEY, BLOCK, ServeProcess, wait_for

from pdserve import LLM, SamplingParams

FAULTS = "decode-0:hang@40,decode-1:crash@40"


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    process = ServeProcess(str(tiny_llama_dir), "--prefill-workers", "2", "--decode-workers", "2",
                           "--router", "round_robin", "--local-prefill-tokens", "4",
                           "--engine-hang-timeout", "4", "--max-migrations", "0", env={"PDSERVE_FAULT_PLAN": FAULTS})
    yield process
    process.stop_and_check()


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 131 + i * 17) % 250 + 60 for i in range(n)]


def _links(server: ServeProcess) -> dict[str, float]:
    return {state: server.metrics().get(f'pdserve_kv_links{{state="{state}"}}', -1.0)
            for state in ("up", "linking", "down")}


def _remote_routes(metrics: dict[str, float]) -> dict[str, float]:
    found = {}
    for key, value in metrics.items():
        match = re.fullmatch(r'pdserve_routes_total\{decode_worker="([^"]+)",prefill="remote"\}', key)
        if match:
            found[match.group(1)] = value
    return found


def test_every_pair_is_linked_and_used_after_a_concurrent_start(server):
    assert _links(server) == {"up": 4.0, "linking": 0.0, "down": 0.0}
    client = server.client()
    for i in range(2):  # round robin: one per decode worker, each prefilled remotely
        done = client.completions.create(model=server.model_name, prompt=_prompt(i, 30), max_tokens=2,
                                         temperature=0)
        assert done.usage.completion_tokens == 2
    assert set(_remote_routes(server.metrics())) == {"decode-0", "decode-1"}
    metrics = server.metrics()
    assert metrics["pdserve_controller_errors_total"] == 0
    rejected = [k for k in metrics if k.startswith("pdserve_kv_rejected_frames_total{")]
    assert len(rejected) >= 2 * 10, "counted per reason"
    assert not {k: metrics[k] for k in rejected if metrics[k]}, "nothing rejected yet"


async def _stream(server: ServeProcess, prompt: list[int]) -> tuple[int, list[str]]:
    """Tokens received and error events of one long stream."""
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "stream": True}
    tokens, errors = 0, []
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(timeout=120) as client, client.stream(
            "POST", f"{server.http_url}/v1/completions", json=body, headers=headers) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                errors.append(event["error"]["message"])
            else:
                tokens += 1
    return tokens, errors


def test_a_hung_and_a_crashed_engine_are_replaced_and_their_streams_end(server, tiny_llama_dir):
    async def both():
        return await asyncio.gather(_stream(server, _prompt(7, 20)), _stream(server, _prompt(8, 20)))

    results = asyncio.run(both())
    reasons = set()
    for tokens, errors in results:
        assert 0 < tokens < 300, "the stream stopped where its worker did"
        assert len(errors) == 1 and "was lost under this request" in errors[0], errors
        reasons.add(re.search(r"\((engine_\w+)\)", errors[0]).group(1))
    assert reasons == {"engine_hung", "engine_died"}, "each loss says why"
    wait_for(lambda: server.metrics().get("pdserve_workers_replaced_total", 0) == 2, timeout=120,
             what="both decode workers replaced")
    wait_for(lambda: server.metrics().get('pdserve_workers{role="decode",state="serving"}') == 2 and
             _links(server) == {"up": 4.0, "linking": 0.0, "down": 0.0}, timeout=240,
             what="two new decode workers, linked to both prefill workers")
    log = "".join(server.lines)
    assert "no progress" in log and "InjectedCrash" in log, "each replacement says why"
    llm = LLM(str(tiny_llama_dir), block_size=BLOCK, num_kv_blocks=256)
    prompt = _prompt(9, 30)
    expected = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    client = server.client()
    for _ in range(2):  # both new decode workers
        done = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
        assert done.choices[0].text == expected.text
