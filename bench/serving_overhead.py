"""--http-overhead: the TTFT of a short prompt through the gateway (HTTP, streamed) against
the same model's `AsyncEngine` in this process, one request at a time, so that the
difference is what the gateway adds.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from pdserve.cluster.benchmark.client import completion_payload, make_client, served_model, stream_completion
from pdserve.cluster.benchmark.launch import target
from pdserve.cluster.benchmark.stats import RequestRecord
from pdserve.cluster.benchmark.workload import OVERHEAD_PROMPT_LEN, BenchError, draw_tokens


async def gateway_ttfts(args: argparse.Namespace, base_url: str, prompts: list[list[int]]) -> list[float]:
    async with make_client(base_url, args.api_key, args.request_timeout) as client:
        model = await served_model(client)
        ttfts = []
        for prompt in prompts:
            record = RequestRecord(len(prompt), 1)
            await stream_completion(client, completion_payload(model, prompt, 1), record)
            if not record.ok:
                raise BenchError(f"a request to {base_url}/v1/completions failed: {record.error}")
            ttfts.append(record.ttft)
        return ttfts


def engine_ttfts(model: str, prompts: list[list[int]]) -> list[float]:
    """TTFT of each prompt, one at a time, through an AsyncEngine in this process."""
    import torch

    from pdserve.engine.async_engine import AsyncEngine
    from pdserve.engine.engine import EngineCore
    from pdserve.runtime.loader import load_model
    from pdserve.runtime.sampling_params import SamplingParams

    torch.set_num_threads(1)
    loaded = load_model(model)
    engine = AsyncEngine(EngineCore(loaded.runner, loaded.info))
    params = SamplingParams(max_tokens=1, temperature=0.0)

    async def one(prompt: list[int]) -> float:
        started, first = time.perf_counter(), None
        async for chunk in engine.generate(prompt, params):
            if chunk.token_ids and first is None:
                first = time.perf_counter()
        if first is None:
            raise BenchError("the in-process engine finished a request without a token")
        return first - started

    async def all_in_order() -> list[float]:
        return [await one(prompt) for prompt in prompts]

    try:
        return asyncio.run(all_in_order())
    finally:
        engine.shutdown()


def http_overhead(args: argparse.Namespace, vocab_size: int, server_args: str | None) -> dict:
    rng = np.random.default_rng([args.seed, 2])
    # One more prompt than measured: the first of each side warms it up and is dropped.
    prompts = [draw_tokens(rng, vocab_size, OVERHEAD_PROMPT_LEN) for _ in range(args.overhead_requests + 1)]
    with target(args, server_args) as base_url:  # stopped before the engine loads: no contention
        gateway = asyncio.run(gateway_ttfts(args, base_url, prompts))[1:]
    engine = engine_ttfts(args.model, prompts)[1:]
    g, e = 1000 * float(np.median(gateway)), 1000 * float(np.median(engine))
    print(f"TTFT of a {OVERHEAD_PROMPT_LEN}-token prompt, max_tokens 1, median of "
          f"{args.overhead_requests} sequential requests:")
    print(f"  through the gateway (HTTP)   {g:8.2f} ms")
    print(f"  in-process AsyncEngine       {e:8.2f} ms")
    print(f"  gateway overhead             {g - e:+8.2f} ms ({g / e:.2f}x)")
    return {"gateway_ttft_ms": [1000 * t for t in gateway], "engine_ttft_ms": [1000 * t for t in engine],
            "gateway_median_ms": g, "engine_median_ms": e, "overhead_ms": g - e, "ratio": g / e}
