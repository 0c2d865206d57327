"""Speculative decoding on an input-grounded task: the same engine with and without it.

Each request asks SmolLM2 to repeat a 512-token passage with a few words changed (the
kind of task where prompt lookup pays: the answer is mostly in the prompt), 128 greedy
output tokens. Runs at concurrency 1 and 16, speculation off and on (n-gram prompt
lookup), in this process, one after the other on the same loaded model, and prints TPOT
and output tok/s with the ratios and the mean accepted length.

    python bench/speculative.py [--requests-c1 4] [--requests-c16 32] [--k 5] [--draft-layers 8]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import machine_line, progress_printer, run_engine, smollm2_gguf

from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import SchedulerConfig, SpeculativeConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams

PASSAGE = (
    "The lighthouse on the northern cape was built in the spring of a wet year, when the "
    "village still argued about whether ships would ever come so far. The keeper, a quiet "
    "man named Tomas, climbed the one hundred and twelve steps every evening at dusk. He "
    "trimmed the wick, polished the great lens with a soft cloth, and wrote three lines in "
    "a leather book: the weather, the ships he had seen, and one thing he had learned that "
    "day. Some days the thing was small, such as how gulls turn their heads into the wind "
    "before a storm. Other days it was larger, such as how long a letter takes to reach the "
    "city, or how the tide in autumn comes higher than the tide in spring. Over the years "
    "the book filled, and then a second book, and then a third. Children from the village "
    "came to read them on Sundays, sitting on the cold stone floor with their knees pulled "
    "up, and Tomas would make tea on the small iron stove and answer their questions about "
    "the sea. When the first steamship finally rounded the cape on a clear night in "
    "October, its captain saw the light long before he saw the land, and he wrote in his "
    "own log that the light was the steadiest he had ever known. The village heard of this "
    "a month later and argued no more. Tomas kept the light for forty years. When he grew "
    "too old for the steps, a girl who had read all of his books on those Sunday afternoons "
    "took his place, and on her first evening she wrote three lines in a new leather book. "
    "The first line said that the wind was from the west and the sea was calm. The second "
    "line said that two fishing boats had come home late, their lanterns swinging, and that "
    "one of them had waved. The third line took her longer. She sat by the lens for an hour "
    "while the light turned above her, and she watched the beam sweep across the water and "
    "the rocks and the sleeping roofs of the village, again and again, never tiring. At last "
    "she wrote that a light is not kept by one person but by everyone who reads what the "
    "last keeper wrote, and she closed the book, and went down the one hundred and twelve "
    "steps to make tea on the small iron stove, as Tomas had done for forty years."
)
EDITS = (("lighthouse", "watchtower"), ("Tomas", "Anselm"), ("tea", "coffee"), ("October", "March"))


def prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` chat prompts, each asking for the passage back with one word swapped."""
    out = []
    for i in range(count):
        old, new = EDITS[i % len(EDITS)]
        message = (f"Repeat the following passage exactly, but replace every '{old}' with '{new}'. "
                   f"Write only the passage.\n\n{PASSAGE}")
        out.append(tokenizer.encode_chat([{"role": "user", "content": message}]))
    return out


def measure(loaded, speculative, batch: list[list[int]], concurrency: int, label: str):
    engine = EngineCore(loaded.runner, loaded.info, SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048),
                        enable_prefix_caching=False, speculative=speculative)
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    with torch.inference_mode():
        run = run_engine(engine, batch, params, concurrency, progress_printer(label, max(1, len(batch) // 4)))
    tpot = statistics.median(run.tpots())
    print(f"{label:>22}: {run.output_throughput:6.1f} output tok/s | TPOT p50 {1000 * tpot:6.1f} ms", flush=True)
    return run, tpot, engine.speculator


def report(label: str, off, tpot_off: float, on, tpot_on: float, speculator) -> None:
    rates = [a / p if p else 0.0 for p, a in zip(speculator.proposed_at, speculator.accepted_at)]
    print(f"  {label}: TPOT speedup {tpot_off / tpot_on:.2f}x, output tok/s "
          f"{on.output_throughput / off.output_throughput:.2f}x; mean accepted length "
          f"{speculator.mean_accepted_length:.2f} tokens/step; acceptance by position "
          f"{', '.join(f'{r:.2f}' for r in rates)}; proposed {speculator.proposed}, "
          f"accepted {speculator.accepted}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-c1", type=int, default=4)
    parser.add_argument("--requests-c16", type=int, default=32)
    parser.add_argument("--k", type=int, default=5, help="num speculative tokens")
    parser.add_argument("--draft-layers", type=int, default=0,
                        help="also run a self-draft of the model's first N layers (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    loaded = load_model(smollm2_gguf())
    spec = SpeculativeConfig(num_tokens=args.k, max_batch_size=8)
    all_prompts = prompts(loaded.tokenizer, max(args.requests_c1, args.requests_c16))
    print(f"prompt: {len(all_prompts[0])} tokens (passage + instruction); 128 greedy output tokens; "
          f"n-gram k={args.k}, speculation off above {spec.max_batch_size} decoding requests")
    for concurrency, count in ((1, args.requests_c1), (16, args.requests_c16)):
        if count == 0:
            continue
        batch = all_prompts[:count]
        off, tpot_off, _ = measure(loaded, None, batch, concurrency, f"c={concurrency} no speculation")
        on, tpot_on, speculator = measure(loaded, spec, batch, concurrency, f"c={concurrency} n-gram")
        report(f"concurrency {concurrency} n-gram", off, tpot_off, on, tpot_on, speculator)
        if args.draft_layers:
            self_draft = SpeculativeConfig(method="draft", num_tokens=args.k, max_batch_size=8,
                                           draft_layers=args.draft_layers)
            label = f"c={concurrency} self-draft {args.draft_layers}L"
            on, tpot_on, speculator = measure(loaded, self_draft, batch, concurrency, label)
            report(f"concurrency {concurrency} self-draft (layers 0-{args.draft_layers - 1})", off, tpot_off, on,
                   tpot_on, speculator)
    print("targets: TPOT >= 2.5x at concurrency 1, >= 0.95x (no slowdown) at concurrency 16")


if __name__ == "__main__":
    main()
