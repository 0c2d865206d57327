"""Chat workloads (--workload): seeded lists of `ChatRequest`s for /v1/chat/completions.

The named presets are the loads the project measures against its peer:

    short-chats  32 short chat questions (about 35-100 prompt tokens after the chat
                 template), 64 output tokens each, closed loop at concurrency 8
    mixed        24 chats, a quarter of them (at seeded positions) about --long-len
                 (1,500) tokens of notes and a task, the rest short questions; the same
                 output length and concurrency

Prompt lengths are counted by a given `count_tokens(messages) -> int` (the run passes the
model's tokenizer and chat template; tests pass anything), and a long prompt is the largest
whole number of note sentences whose templated length stays within the target. Every random
draw happens before any counting, so a workload is a pure function of its arguments: the
same flags and --seed give the same prompts in the same order, whatever the counter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from pdserve.cluster.benchmark.prompts import (
    NOTE_TASKS,
    NOTES_INTRO,
    PREDICATES,
    QUESTIONS,
    SUBJECTS,
    WARMUP_QUESTIONS,
)

CountTokens = Callable[[list[dict]], int]
SENTENCES_PER_PARAGRAPH = 6
MIN_SENTENCE_TOKENS = 5  # no note sentence is shorter: bounds how many a target can need


class ChatRequest(NamedTuple):
    """One chat request: a single user message, its templated length and its output length."""

    messages: list[dict]
    prompt_len: int
    output_len: int

    path = "/v1/chat/completions"

    def prompt_body(self) -> dict:
        return {"messages": self.messages}


class Preset(NamedTuple):
    """What a named workload fixes unless a flag says otherwise."""

    num_prompts: int
    long_fraction: float
    max_concurrency: int
    output_len: int = 64


PRESETS = {"short-chats": Preset(32, 0.0, 8), "mixed": Preset(24, 0.25, 8)}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def short_questions(rng: np.random.Generator, n: int) -> list[str]:
    """n questions in a seeded order; past the pool, later rounds are numbered so that no two
    prompts are the same (a repeated prompt would be a prefix-cache hit, not a chat)."""
    order = rng.permutation(len(QUESTIONS))
    return [QUESTIONS[order[i % len(QUESTIONS)]] if i < len(QUESTIONS)
            else f"({i // len(QUESTIONS) + 1}) {QUESTIONS[order[i % len(QUESTIONS)]]}" for i in range(n)]


def note_sentences(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct subject-predicate sentences while the 576 pairs last, then another round."""
    pairs = len(SUBJECTS) * len(PREDICATES)
    order = np.concatenate([rng.permutation(pairs) for _ in range(math.ceil(n / pairs))])[:n]
    return [f"{SUBJECTS[i // len(PREDICATES)]} {PREDICATES[i % len(PREDICATES)]}" for i in order.tolist()]


def notes_prompt(sentences: Sequence[str], task: str) -> str:
    paragraphs = [" ".join(sentences[i:i + SENTENCES_PER_PARAGRAPH])
                  for i in range(0, len(sentences), SENTENCES_PER_PARAGRAPH)]
    return "\n\n".join([NOTES_INTRO, *paragraphs, task])


def long_chat(sentences: Sequence[str], task: str, target: int, count: CountTokens,
              output_len: int) -> ChatRequest:
    """The longest prefix of `sentences` (at least one) whose prompt is at most `target` tokens;
    a binary search, since the length grows with every sentence."""
    low, high = 1, len(sentences)
    while low < high:
        mid = (low + high + 1) // 2
        if count(user(notes_prompt(sentences[:mid], task))) <= target:
            low = mid
        else:
            high = mid - 1
    messages = user(notes_prompt(sentences[:low], task))
    return ChatRequest(messages, count(messages), output_len)


def chat_dataset(rng: np.random.Generator, num_prompts: int, long_fraction: float, long_len: int,
                 output_len: int, count: CountTokens) -> list[ChatRequest]:
    """Exactly round(num_prompts * long_fraction) long prompts at seeded positions, the rest
    short questions, each asking for `output_len` tokens."""
    num_long = round(num_prompts * long_fraction)
    is_long = np.zeros(num_prompts, dtype=bool)
    is_long[rng.choice(num_prompts, num_long, replace=False)] = True
    questions = iter(short_questions(rng, num_prompts - num_long))
    max_sentences = long_len // MIN_SENTENCE_TOKENS + 1
    notes = iter([(note_sentences(rng, max_sentences), NOTE_TASKS[rng.integers(len(NOTE_TASKS))])
                  for _ in range(num_long)])
    requests = []
    for long in is_long.tolist():
        if long:
            sentences, task = next(notes)
            requests.append(long_chat(sentences, task, long_len, count, output_len))
        else:
            messages = user(next(questions))
            requests.append(ChatRequest(messages, count(messages), output_len))
    return requests


def chat_warmups(n: int, count: CountTokens, output_len: int = 16) -> list[ChatRequest]:
    """n short chats that share no prompt with any workload, for the warm-up."""
    picked = [WARMUP_QUESTIONS[i % len(WARMUP_QUESTIONS)] for i in range(n)]
    return [ChatRequest(user(q), count(user(q)), output_len) for q in picked]
