"""Offline throughput: pdserve's continuous batching vs transformers, same run, same model.

256 requests of 128 random prompt tokens and 128 greedy output tokens (EOS ignored) go
through pdserve's engine with 32 in flight. The peers run the same prompts with
transformers `generate` in float32 on the same threads:
  - sequential: one request at a time (on the first --hf-sequential requests; a rate);
  - static batch: --concurrency prompts per `generate` call, left-padded (on the first
    --hf-static-batches batches; a rate).
If llama-cpp-python is installed it runs sequentially as a third peer on the same GGUF.

    python bench/throughput.py [--num-requests 256] [--concurrency 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import torch
from common import (
    load_transformers_smollm2,
    machine_line,
    progress_printer,
    run_engine,
    smollm2_gguf,
)

from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams


@torch.no_grad()
def transformers_rate(model, prompts: list[list[int]], output_len: int, batch_size: int) -> float:
    """Output tokens per second of `generate` over `prompts`, `batch_size` at a time."""
    started = time.perf_counter()
    produced = 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        produced += (out.shape[1] - width) * len(batch)
        print(f"  transformers batch {batch_size}: {start + len(batch)}/{len(prompts)} done", flush=True)
    return produced / (time.perf_counter() - started)


def llama_cpp_rate(prompts: list[list[int]], output_len: int, threads: int) -> float | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    llm = Llama(model_path=smollm2_gguf(), n_ctx=1024, n_threads=threads, verbose=False)
    started = time.perf_counter()
    produced = 0
    for prompt in prompts:
        llm.reset()
        for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0)):
            if i + 1 == output_len:
                break
        produced += output_len
    return produced / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--hf-sequential", type=int, default=4, help="requests timed one by one")
    parser.add_argument("--hf-static-batches", type=int, default=1, help="static batches timed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m-instruct")
    vocab = loaded.runner.config.vocab_size
    g = torch.Generator().manual_seed(0)
    # Ids above the special tokens: plain text pieces, as a real prompt would be.
    prompts = [torch.randint(100, vocab, (args.input_len,), generator=g).tolist()
               for _ in range(args.num_requests)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    print(machine_line(args.threads))
    print(f"{args.num_requests} requests x {args.input_len} in / {args.output_len} out, "
          f"concurrency {args.concurrency}, greedy", flush=True)
    engine = EngineCore(loaded.runner, loaded.info,
                        SchedulerConfig(max_num_seqs=args.concurrency, max_num_batched_tokens=2048,
                                        max_prefill_chunk=512),
                        enable_prefix_caching=False)  # random prompts share nothing anyway
    run = run_engine(engine, prompts, params, args.concurrency, progress_printer("pdserve", 32))

    hf = load_transformers_smollm2()
    sequential = transformers_rate(hf, prompts[:args.hf_sequential], args.output_len, 1)
    static = transformers_rate(
        hf, prompts[:args.hf_static_batches * args.concurrency], args.output_len, args.concurrency)
    llama_cpp = llama_cpp_rate(prompts[:args.hf_sequential], args.output_len, args.threads)

    ours = run.output_throughput
    print(f"pdserve (continuous batching)   {run.summary()}")
    print(f"transformers sequential         {sequential:7.1f} output tok/s")
    print(f"transformers static batch {args.concurrency:<4}  {static:7.1f} output tok/s")
    print(f"ratio vs transformers sequential:   {ours / sequential:.2f}x")
    print(f"ratio vs transformers static batch: {ours / static:.2f}x")
    if llama_cpp is None:
        print("llama-cpp-python: not installed, peer skipped")
    else:
        print(f"llama.cpp sequential            {llama_cpp:7.1f} output tok/s; "
              f"ratio {ours / llama_cpp:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
