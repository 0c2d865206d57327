"""Request migration end to end: `pdserve serve` on local Ray with 1 prefill and 2 decode
workers whose engines fail under running streams (`PDSERVE_FAULT_PLAN`): decode-0 crashes
after 15 steps, decode-1 hangs after 40 (replaced after --engine-hang-timeout). Every
stream goes on without an error, and its tokens equal a fault-free run's: greedy and
seeded sampling alike (seeded only without speculation: a verify step draws differently
from a plain one, and the new worker's drafts start afresh), usage counting the client's
prompt. With a self-draft speculating, greedy output is the same and the draft's KV is
rebuilt on the new worker. The KV goes over shm in one run (pages copied out of the pool)
and nixl in the other (pages read in place: the prefill worker holds them until the
transfer settles, also when the decode worker dies). Assertions read the public API and
/metrics, never timings.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
from serve_process import API_KEY, BLOCK, ServeProcess, busy_workers, wait_for, workers_idle

from pdserve import LLM, SamplingParams

FAULTS = "decode-0:crash@15,decode-1:hang@40"
MAX_TOKENS = 80


# Without speculation, and with a self-draft whose own KV the new worker rebuilds (greedy
# output is the same with speculation on; seeded sampling continues from the same seeds).
SPECULATION = {"plain": ("--kv-transport", "shm"),
               "draft": ("--kv-transport", "nixl", "--speculative", "draft", "--draft-layers", "1",
                         "--num-speculative-tokens", "3")}


@pytest.fixture(scope="module", params=list(SPECULATION))
def server(request, tiny_llama_dir):
    process = ServeProcess(str(tiny_llama_dir), "--prefill-workers", "1", "--decode-workers", "2",
                           "--router", "round_robin", "--local-prefill-tokens", "4",
                           "--engine-hang-timeout", "4", *SPECULATION[request.param],
                           env={"PDSERVE_FAULT_PLAN": FAULTS})
    process.speculation = request.param
    yield process
    process.stop_and_check()


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 131 + i * 17) % 250 + 60 for i in range(n)]


CASES = [  # (prompt, sampling): one greedy, one seeded sampled; round robin puts one on each worker
    (_prompt(3, 24), {"temperature": 0.0}),
    (_prompt(4, 30), {"temperature": 0.9, "seed": 1234}),
]


def test_streams_survive_a_crashed_and_a_hung_decode_worker_with_identical_output(server, tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), block_size=BLOCK, num_kv_blocks=512)
    expected = [llm.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **sampling))[0]
                for prompt, sampling in CASES]
    client = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)

    async def stream(prompt, sampling):
        chunks = await client.completions.create(
            model=server.model_name, prompt=prompt, max_tokens=MAX_TOKENS, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **sampling)
        text, usage = "", None
        async for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].text
            usage = chunk.usage or usage
        return text, usage

    async def both():
        return await asyncio.gather(*(stream(p, s) for p, s in CASES))

    results = asyncio.run(both())
    for (text, usage), want, (prompt, sampling) in zip(results, expected, CASES):
        if server.speculation == "plain" or sampling["temperature"] == 0:
            assert text == want.text
        assert usage.completion_tokens == MAX_TOKENS and usage.prompt_tokens == len(prompt)
    metrics = server.metrics()
    assert metrics.get('pdserve_request_migrations_total{reason="engine_died"}', 0) >= 1
    assert metrics.get('pdserve_request_migrations_total{reason="engine_hung"}', 0) >= 1
    assert metrics.get("pdserve_request_errors_total", 0) == 0
    # Both replacements serve and nothing is held anywhere.
    wait_for(lambda: server.metrics().get('pdserve_workers{role="decode",state="serving"}') == 2
             and workers_idle(server.metrics()), timeout=180, what="two healthy, idle decode workers",
             state=lambda: busy_workers(server.metrics()))
