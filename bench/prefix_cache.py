"""Shared-prefix workload: pdserve with the radix prefix cache on vs off, same run.

8 groups x 16 prompts; the prompts of a group share a 1,024-token system prompt and end
in their own 64-token question; 32 greedy output tokens each. Prompts are submitted group
after group with --concurrency in flight. Reported: TTFT (p50/p90), output throughput,
and the prefix hit rate against the theoretical maximum (every prompt but the first of
each group finds the whole system prompt cached).

The cache-off run recomputes every system prompt, which on a CPU takes minutes, so by
default it runs on the first --off-groups groups (same per-group workload, same
concurrency); its TTFT and throughput are per-request statistics of that subset.

    python bench/prefix_cache.py [--groups 8] [--per-group 16] [--off-groups 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from common import machine_line, progress_printer, run_engine

from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--per-group", type=int, default=16)
    parser.add_argument("--system-len", type=int, default=1024)
    parser.add_argument("--question-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--off-groups", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m-instruct")
    vocab = loaded.runner.config.vocab_size
    block_size = loaded.info.block_size
    g = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(args.groups):
        system = torch.randint(100, vocab, (args.system_len,), generator=g).tolist()
        prompts += [system + torch.randint(100, vocab, (args.question_len,), generator=g).tolist()
                    for _ in range(args.per_group)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    config = SchedulerConfig(max_num_seqs=args.concurrency, max_num_batched_tokens=2048,
                             max_prefill_chunk=512)

    print(machine_line(args.threads))
    print(f"{args.groups} groups x {args.per_group} prompts: {args.system_len}-token shared system "
          f"prompt + {args.question_len}-token question, {args.output_len} output tokens, "
          f"concurrency {args.concurrency}", flush=True)
    on = run_engine(EngineCore(loaded.runner, loaded.info, config, enable_prefix_caching=True),
                    prompts, params, args.concurrency, progress_printer("cache on", args.per_group))
    off_prompts = prompts[:args.off_groups * args.per_group]
    off = run_engine(EngineCore(loaded.runner, loaded.info, config, enable_prefix_caching=False),
                     off_prompts, params, args.concurrency, progress_printer("cache off", args.per_group))

    cached = sum(t.num_cached_tokens for t in on.timings.values())
    best = args.groups * (args.per_group - 1) * (args.system_len // block_size * block_size)
    ttft_on, ttft_off = statistics.median(on.ttfts()), statistics.median(off.ttfts())
    print(f"cache on  ({len(prompts)} requests):  {on.summary()}")
    print(f"cache off ({len(off_prompts)} requests):  {off.summary()}")
    print(f"prefix hit tokens {cached} of theoretical max {best}: {100 * cached / best:.1f}%")
    print(f"TTFT p50 ratio off/on: {ttft_off / ttft_on:.1f}x lower with the cache")
    print(f"throughput ratio on/off: {on.output_throughput / off.output_throughput:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
