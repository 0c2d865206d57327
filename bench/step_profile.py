"""Where one engine step's time goes, beside the step's matmul floor.

For decode batches of 1, 8 and 32 sequences and a mixed step (8 decoding sequences plus
a prefill chunk), the step time is split into matmul (every linear layer and the LM
head), attention (KV store included), the rest of the forward (embedding, norms, RoPE,
activations), sampling, scheduler and batch building, and what is left (output
assembly, bookkeeping). The floor is the step's own linear layers (same weights, same
layout and path, same row counts) timed alone in the same run: what a step costs if nothing but
its matmuls ran. Step/floor is the overhead factor to drive down.

The step time is measured as served (the decoder layers as one C++ call, or with
--compile the compiled layers); the split comes from a second, instrumented pass of the
same steps on the Python layers with the same kernels (timers around each part; neither
a fused nor a compiled forward can be timed from inside), so its parts add up to more
than the served step by the Python between the kernels, which the fused layers skip.

    python bench/step_profile.py [--threads N] [--context 128] [--steps 12] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from common import machine_line

import pdserve.engine.engine as engine_module
from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import DeviceConfig, SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.models.llama import Linear
from pdserve.runtime.sampling_params import SamplingParams

PARTS = ("matmul", "attention", "forward other", "sampling", "schedule+batch", "other")


class Scenario:
    """A steady state of the engine to time: `batch` sequences decoding at about
    `context` tokens, plus (mixed) one fresh prefill chunk of `chunk` tokens per step."""

    def __init__(self, name: str, batch: int, chunk: int = 0) -> None:
        self.name, self.batch, self.chunk = name, batch, chunk

    def engine(self, loaded, context: int, steps: int) -> EngineCore:
        config = SchedulerConfig(max_num_seqs=self.batch + 1, max_prefill_chunk=max(512, self.chunk),
                                 max_num_batched_tokens=2048)
        engine = EngineCore(loaded.runner, loaded.info, config, enable_prefix_caching=False)
        params = SamplingParams(max_tokens=4 * steps + 16, temperature=0.0, ignore_eos=True)
        vocab = loaded.runner.config.vocab_size
        for i in range(self.batch):
            engine.add_request(f"d{i}", [(7 * i + j) % vocab for j in range(context)], params)
        while any(r.is_prefilling for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        return engine

    def step(self, engine: EngineCore, index: int) -> None:
        """One step of this scenario (for mixed: with a new prefill chunk in it)."""
        if self.chunk:
            vocab = engine.runner.config.vocab_size
            engine.add_request(f"p{index}", [(13 * index + j) % vocab for j in range(self.chunk)],
                               SamplingParams(max_tokens=1, temperature=0.0))
        engine.step()
        if self.chunk:
            engine.finish_request(f"p{index}")

    def rows(self) -> tuple[int, int]:
        """(tokens through the layers, rows through the LM head) of one step."""
        return self.batch + self.chunk, self.batch + (1 if self.chunk else 0)


SCENARIOS = (Scenario("decode batch 1", 1), Scenario("decode batch 8", 8),
             Scenario("decode batch 32", 32), Scenario("mixed 8 + 256 prefill", 8, chunk=256))


def timed_steps(scenario: Scenario, engine: EngineCore, steps: int) -> list[float]:
    times = []
    for index in range(steps):
        started = time.perf_counter()
        scenario.step(engine, index)
        times.append(time.perf_counter() - started)
    return times


class Timers:
    """Wall time per part, gathered by wrapping callables (instance attributes only, so
    `remove` restores the originals)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._patched: list[tuple[object, str]] = []

    def wrap(self, owner: object, attribute: str, part: str) -> None:
        inner: Callable = getattr(owner, attribute)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - started

        setattr(owner, attribute, timed)
        self._patched.append((owner, attribute))

    def remove(self) -> None:
        for owner, attribute in self._patched:
            if owner is engine_module:
                continue
            delattr(owner, attribute)
        self._patched.clear()


def split(scenario: Scenario, engine: EngineCore, steps: int) -> dict[str, float]:
    """Milliseconds per step of each part, on the eager forward of the Python layers."""
    runner, model = engine.runner, engine.runner.model
    timers = Timers()
    build = engine_module.build_forward_batch
    timers.wrap(engine.scheduler, "schedule", "schedule+batch")
    timers.wrap(engine_module, "build_forward_batch", "schedule+batch")
    timers.wrap(runner, "execute", "forward")
    timers.wrap(engine, "sampler", "sampling")
    timers.wrap(model.kernels.attention, "forward", "attention")
    timers.wrap(model, "compute_logits", "matmul")
    for module in model.modules():
        if isinstance(module, Linear):
            timers.wrap(module, "forward", "matmul")
    fused, model.fused_layers = model.fused_layers, None
    try:
        with torch.compiler.set_stance("force_eager"):
            total = sum(timed_steps(scenario, engine, steps))
    finally:
        model.fused_layers = fused
        engine_module.build_forward_batch = build
        timers.remove()
    ms = {part: 1000 * seconds / steps for part, seconds in timers.seconds.items()}
    forward = ms.pop("forward")
    ms["forward other"] = forward - ms["matmul"] - ms["attention"]
    ms["other"] = 1000 * total / steps - forward - ms["sampling"] - ms["schedule+batch"]
    return ms


def matmul_floor(model: torch.nn.Module, tokens: int, head_rows: int, repeats: int = 5) -> float:
    """Milliseconds of the step's linear layers alone: every Linear on `tokens` rows and
    the LM head on `head_rows`, each through the model's own path (dense GEMM, or GGUF
    blocks for small batches), best of `repeats`."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    inputs = {m: torch.randn(tokens, m.weight.shape[1], dtype=m.weight.dtype) for m in linears}
    hidden = torch.randn(head_rows, model.config.hidden_size, dtype=model.config.dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            for m in linears:
                m(inputs[m])
            model.compute_logits(hidden)
            best = min(best, time.perf_counter() - started)
    return 1000 * best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", default="auto", help="torch threads (auto: the cores this process may use)")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens of each decoding sequence")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--compile", action="store_true", help="time the forward with compiled layers")
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0)) if args.threads == "auto" else int(args.threads)
    torch.set_num_threads(threads)
    loaded = load_model(args.model, device_config=DeviceConfig(device="cpu", compile=args.compile))
    print(machine_line(threads))
    print(f"{args.model}: {loaded.runner.describe()}; sequences at ~{args.context} tokens; "
          f"median of {args.steps} steps (split: mean over the same number of eager steps)")
    header = (f"{'scenario':24s} {'step':>7s} " + " ".join(f"{p:>14s}" for p in PARTS)
              + f" {'floor':>7s} {'step/floor':>10s}")
    print(header)
    for scenario in SCENARIOS:
        engine = scenario.engine(loaded, args.context, args.steps)
        timed_steps(scenario, engine, 2)  # warm-up: first-call dispatch, compiled shapes
        step_ms = 1000 * statistics.median(timed_steps(scenario, engine, args.steps))
        parts = split(scenario, engine, args.steps)
        floor = matmul_floor(loaded.runner.model, *scenario.rows())
        print(f"{scenario.name:24s} {step_ms:7.1f} " + " ".join(f"{parts[p]:14.1f}" for p in PARTS)
              + f" {floor:7.1f} {step_ms / floor:10.2f}x", flush=True)
    print("all times in ms per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
