"""What a serving benchmark run sends, and when: seeded datasets of token-id prompts
(`random`, `shared-prefix`, `mixed`) for /v1/completions, their warm-up prompts and the
arrival schedule; plus `BenchError`, the error that ends a run. (The chat workloads are in
chat.py.)

The datasets and the schedule are pure functions of their arguments and a numpy Generator:
the same flags and --seed give the same requests on the same schedule.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# Special tokens and single bytes sit at the bottom of the vocabulary: prompts use the
# ordinary pieces above them, as real text would.
FIRST_TOKEN_ID = 300
OVERHEAD_PROMPT_LEN = 16  # the warm-up's and --http-overhead's prompts


class BenchError(Exception):
    """A run that cannot go on; the message says what was wrong and what to do."""


class BenchRequest(NamedTuple):
    """One completion request: a prompt of token ids and its output length."""

    prompt_ids: list[int]
    output_len: int

    path = "/v1/completions"

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def prompt_body(self) -> dict:
        return {"prompt": self.prompt_ids}


def draw_tokens(rng: np.random.Generator, vocab_size: int, n: int) -> list[int]:
    return rng.integers(FIRST_TOKEN_ID, vocab_size, size=n).tolist()


def uniform_lengths(rng: np.random.Generator, length: int, range_ratio: float, n: int) -> np.ndarray:
    """n integers uniform in [floor(length*(1-r)), ceil(length*(1+r))], never below 1."""
    low = max(1, math.floor(length * (1 - range_ratio)))
    high = max(low, math.ceil(length * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def random_dataset(rng: np.random.Generator, vocab_size: int, num_prompts: int, input_len: int,
                   output_len: int, range_ratio: float) -> list[BenchRequest]:
    inputs = uniform_lengths(rng, input_len, range_ratio, num_prompts)
    outputs = uniform_lengths(rng, output_len, range_ratio, num_prompts)
    return [BenchRequest(draw_tokens(rng, vocab_size, int(i)), int(o)) for i, o in zip(inputs, outputs)]


def shared_prefix_dataset(rng: np.random.Generator, vocab_size: int, num_prompts: int, prefix_len: int,
                          suffix_len: int, num_groups: int, output_len: int) -> list[BenchRequest]:
    """Request i belongs to group i % num_groups, so the groups interleave in arrival order."""
    prefixes = [draw_tokens(rng, vocab_size, prefix_len) for _ in range(num_groups)]
    return [BenchRequest(prefixes[i % num_groups] + draw_tokens(rng, vocab_size, suffix_len), output_len)
            for i in range(num_prompts)]


def mixed_dataset(rng: np.random.Generator, vocab_size: int, num_prompts: int, long_fraction: float,
                  long_len: int, short_min_len: int, short_max_len: int,
                  output_len: int) -> list[BenchRequest]:
    """Exactly round(num_prompts * long_fraction) long prompts, at seeded random positions."""
    is_long = np.zeros(num_prompts, dtype=bool)
    is_long[rng.choice(num_prompts, round(num_prompts * long_fraction), replace=False)] = True
    lengths = np.where(is_long, long_len, rng.integers(short_min_len, short_max_len + 1, size=num_prompts))
    return [BenchRequest(draw_tokens(rng, vocab_size, int(n)), output_len) for n in lengths]


def build_dataset(args: argparse.Namespace, vocab_size: int) -> list[BenchRequest]:
    rng = np.random.default_rng([args.seed, 0])  # the arrivals draw from their own stream
    n = args.num_prompts
    if args.dataset == "random":
        return random_dataset(rng, vocab_size, n, args.random_input_len, args.output_len,
                              args.random_range_ratio)
    if args.dataset == "shared-prefix":
        return shared_prefix_dataset(rng, vocab_size, n, args.prefix_len, args.suffix_len, args.num_groups,
                                     args.output_len)
    return mixed_dataset(rng, vocab_size, n, args.long_fraction, args.long_len, args.short_min_len,
                         args.short_max_len, args.output_len)


def token_warmups(n: int, output_len: int = 4) -> list[BenchRequest]:
    """n short prompts of consecutive ids, for the warm-up (the datasets draw theirs at random)."""
    return [BenchRequest(list(range(FIRST_TOKEN_ID + i * OVERHEAD_PROMPT_LEN,
                                    FIRST_TOKEN_ID + (i + 1) * OVERHEAD_PROMPT_LEN)), output_len)
            for i in range(n)]


def arrival_offsets(num: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds after the start at which each request is due; the first at 0. The gaps are
    gamma distributed with shape `burstiness` and mean 1/rate: 1 is a Poisson process,
    below 1 burstier, above 1 more regular. An infinite rate sends everything at once."""
    if math.isinf(rate):
        return np.zeros(num)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def describe_workload(args: argparse.Namespace, requests: Sequence[BenchRequest]) -> str:
    """One line: the workload's name, prompt and output lengths, and how requests arrive.
    Works for every request type with `prompt_len` and `output_len` (chats too)."""
    lengths = [r.prompt_len for r in requests]
    outputs = [r.output_len for r in requests]
    if math.isinf(args.request_rate):
        arrivals = (f"closed loop, {args.max_concurrency} in flight (the next sent as one ends)"
                    if args.max_concurrency else "all at once, no concurrency limit")
    else:
        kind = "Poisson" if args.burstiness == 1 else f"gamma (burstiness {args.burstiness:g})"
        arrivals = f"{kind} at {args.request_rate:g} req/s, max concurrency {args.max_concurrency or 'none'}"
    return (f"{getattr(args, 'workload', None) or args.dataset}: {len(requests)} prompts of "
            f"{min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}), "
            f"{min(outputs)}-{max(outputs)} output tokens; arrivals {arrivals}")
