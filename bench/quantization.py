"""Weights held quantized (`--quantization`): memory, decode speed and perplexity per mode, and
llama.cpp on the same GGUF file in the same run (`llama-cpp-python`, a bench extra: `pip
install llama-cpp-python`, ~7 minutes to build here).

Each configuration runs in a fresh process pinned to the same cores with the same thread
count: SmolLM2-135M-Instruct from the embedded Q4_1 GGUF,

    none    dense float32 weights (dequantized from the file)
    auto    the default: the file's blocks for small batches, dense for large
    gguf    the file's blocks only (no dense copy)
    int8    int8 (Q8_0) blocks made at load from the dense weights
    llama.cpp   the same file as stored

and reports the process's resident memory after loading, one stream's decode rate (tokens
after the first, greedy, past EOS), the output rate of 8 streams at once (llama.cpp: the
same 8 requests one after another, as its Python binding serves them), perplexity over
tests/data/perplexity_text.txt and, against llama.cpp, how many of the first 32 greedy
tokens agree on a set of chat prompts.

    python bench/quantization.py [--threads 2] [--tokens 128] [--modes none auto gguf int8]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

from common import machine_line, smollm2_gguf

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "perplexity_text.txt"
PERPLEXITY_TOKENS = 1024
PROMPTS = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "Explain how tides work to a ten-year-old.", "List five uses for a paperclip.",
           "What is the difference between weather and climate?", "Describe the taste of bread.",
           "Give three tips for learning a new language.", "Why is the sky blue?",
           "Write a haiku about autumn."]
AGREEMENT_TOKENS = 32


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _pin(threads: int) -> None:
    import torch

    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)


def _pdserve(mode: str, threads: int, tokens: int, results) -> None:
    _pin(threads)
    import torch

    from pdserve.engine.engine import EngineCore
    from pdserve.runtime.config import CacheConfig, DeviceConfig, SchedulerConfig
    from pdserve.runtime.loader import load_model
    from pdserve.runtime.sampling_params import SamplingParams

    baseline = _rss_mib()  # the interpreter, torch and pdserve imported; nothing loaded
    started = time.perf_counter()
    loaded = load_model(smollm2_gguf(), cache=CacheConfig(num_blocks=256),
                        device_config=DeviceConfig(device="cpu", quantization=mode))
    load_s = time.perf_counter() - started
    rss = _rss_mib()
    pool = loaded.runner.pool.kv
    kv_mib = pool.numel() * pool.element_size() / 2**20
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]

    def run(batch: list[list[int]], max_tokens: int, ignore_eos: bool = True):
        engine = EngineCore(loaded.runner, loaded.info, SchedulerConfig(), enable_prefix_caching=False)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        for index, prompt in enumerate(batch):
            engine.add_request(str(index), prompt, params)
        stamps, out = [], {}
        while engine.has_unfinished:
            for delta in engine.step():
                stamps.append(time.perf_counter())
                out.setdefault(int(delta.request_id), []).extend(delta.token_ids)
        return stamps, out

    run(prompts[:1], 8)  # warm-up
    single = []
    for _ in range(3):
        stamps, _ = run(prompts[:1], tokens)
        single.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    started = time.perf_counter()
    _, out = run(prompts, tokens)
    concurrent = sum(len(ids) for ids in out.values()) / (time.perf_counter() - started)
    _, greedy = run(prompts, AGREEMENT_TOKENS, ignore_eos=False)
    results.put({"mode": mode, "describe": loaded.runner.describe(), "load_s": load_s, "rss_mib": rss,
                 "baseline_mib": baseline, "kv_mib": kv_mib,
                 "weight_mib": loaded.runner.weight_bytes() / 2**20, "single": statistics.median(single),
                 "concurrent8": concurrent, "perplexity": _pdserve_perplexity(loaded, torch),
                 "greedy": [greedy[i] for i in range(len(prompts))]})


def _text_tokens(tokenizer) -> list[int]:
    return tokenizer.encode(TEXT.read_text(), add_special_tokens=False)[:PERPLEXITY_TOKENS]


def _pdserve_perplexity(loaded, torch) -> float:
    from pdserve.runtime.forward_batch import ForwardBatch, SeqChunk

    tokens = _text_tokens(loaded.tokenizer)
    runner = loaded.runner
    blocks = list(range(-(-len(tokens) // runner.pool.block_size)))
    batch = ForwardBatch.build([SeqChunk(tokens, 0, blocks, True, len(tokens))], runner.pool.block_size, "cpu")
    with torch.inference_mode():
        logits = runner.model.compute_logits(runner.model(batch, runner.pool))
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    picked = logprobs[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
    return math.exp(-picked.mean().item())


def _llama_cpp(threads: int, tokens: int, results) -> None:
    _pin(threads)
    import numpy as np
    from llama_cpp import Llama

    from pdserve.runtime.weights.checkpoint import load_checkpoint

    tokenizer = load_checkpoint(smollm2_gguf()).tokenizer  # the same token ids on both sides
    started = time.perf_counter()
    llm = Llama(model_path=smollm2_gguf(), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)
    load_s = time.perf_counter() - started
    rss = _rss_mib()
    prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]

    def greedy(prompt: list[int], count: int, stop_at_eos: bool) -> tuple[list[int], list[float]]:
        llm.reset()
        llm.eval(prompt)
        out, stamps = [], []
        for _ in range(count):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(token)
            stamps.append(time.perf_counter())
            if stop_at_eos and token == llm.token_eos():
                break
            llm.eval([token])
        return out, stamps

    greedy(prompts[0], 8, False)  # warm-up
    single = []
    for _ in range(3):
        _, stamps = greedy(prompts[0], tokens, False)
        single.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    started = time.perf_counter()
    made = sum(len(greedy(p, tokens, False)[0]) for p in prompts)
    sequential = made / (time.perf_counter() - started)
    text = _text_tokens(tokenizer)
    llm.reset()
    llm.eval(text)
    logits = np.asarray(llm.scores[:len(text) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    perplexity = math.exp(-logprobs[np.arange(len(text) - 1), text[1:]].mean())
    results.put({"mode": "llama.cpp", "describe": "llama-cpp-python, the file as stored", "load_s": load_s,
                 "rss_mib": rss, "weight_mib": os.path.getsize(smollm2_gguf()) / 2**20,
                 "single": statistics.median(single), "concurrent8": sequential, "perplexity": perplexity,
                 "greedy": [greedy(p, AGREEMENT_TOKENS, True)[0] for p in prompts]})


def _in_child(target, *args) -> dict | None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, results))
    child.start()
    try:
        return results.get(timeout=1800)
    except Exception as exc:  # noqa: BLE001 - report and go on with the other configurations
        print(f"  {args[0] if args else target.__name__} failed: {exc}", file=sys.stderr)
        return None
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, float]:
    """Prompts whose greedy tokens agree in full (up to AGREEMENT_TOKENS or EOS), and the
    mean length of the agreeing prefix."""
    prefixes = []
    for a, b in zip(ours, theirs):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefixes.append(n)
    full = sum(n == min(len(a), len(b)) for n, a, b in zip(prefixes, ours, theirs))
    return full, statistics.mean(prefixes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--modes", nargs="+", default=["none", "auto", "gguf", "int8"])
    parser.add_argument("--no-llama-cpp", action="store_true")
    args = parser.parse_args()
    print(machine_line(args.threads))
    rows = [row for mode in args.modes if (row := _in_child(_pdserve, mode, args.threads, args.tokens))]
    peer = None
    if not args.no_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
            peer = _in_child(_llama_cpp, args.threads, args.tokens)
        except ImportError:
            print("llama.cpp peer: not installed (pip install llama-cpp-python); left out")
    if peer:
        rows.append(peer)
    print(f"{'config':10s} {'RSS MiB':>8s} {'weights MiB':>11s} {'1 stream tok/s':>15s} "
          f"{'8 streams tok/s':>16s} {'perplexity':>10s}  how")
    for row in rows:
        print(f"{row['mode']:10s} {row['rss_mib']:8.0f} {row['weight_mib']:11.0f} {row['single']:15.1f} "
              f"{row['concurrent8']:16.1f} {row['perplexity']:10.3f}  {row['describe']}")
    by_mode = {row["mode"]: row for row in rows}
    if "none" in by_mode:
        none = by_mode["none"]
        for mode in ("gguf", "int8"):
            if mode in by_mode:
                row = by_mode[mode]
                # The floor: what the process held before loading anything, its KV pool and
                # the weights themselves, over float32's RSS.
                floor = (row["baseline_mib"] + row["kv_mib"] + row["weight_mib"]) / none["rss_mib"]
                print(f"RSS {mode} / none: {row['rss_mib'] / none['rss_mib']:.2f}x (floor {floor:.2f}x: "
                      f"{row['baseline_mib']:.0f} MiB before loading, KV pool {row['kv_mib']:.0f} MiB, weights "
                      f"{row['weight_mib']:.0f} MiB); perplexity {mode} / none: "
                      f"{row['perplexity'] / none['perplexity']:.4f}")
    if peer:
        for mode in ("auto", "gguf", "int8"):
            if mode in by_mode:
                row = by_mode[mode]
                full, mean_prefix = _agreement(row["greedy"], peer["greedy"])
                print(f"{mode} vs llama.cpp: 1 stream {row['single'] / peer['single']:.2f}x, 8 streams vs 8 "
                      f"sequential {row['concurrent8'] / peer['concurrent8']:.2f}x, perplexity "
                      f"{row['perplexity'] / peer['perplexity']:.4f}x, greedy tokens agree on {full}/{len(PROMPTS)} "
                      f"prompts (mean agreeing prefix {mean_prefix:.1f} of {AGREEMENT_TOKENS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
