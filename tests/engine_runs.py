"""Driving an `EngineCore` to completion in tests."""

from __future__ import annotations

import torch

from pdserve.engine.engine import EngineCore
from pdserve.runtime.sampling_params import SamplingParams


def run_to_completion(engine: EngineCore,
                      requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    """Add every request (id -> (prompt ids, params)), step until all finish; each
    request's output token ids."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    outputs: dict[str, list[int]] = {r: [] for r in requests}
    with torch.inference_mode():
        while engine.has_unfinished:
            for chunk in engine.step():
                outputs[chunk.request_id].extend(chunk.token_ids)
    return outputs


CHAT_QUESTIONS = ("What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
                  "What is 12 times 12?")


def greedy_chat_answers(loaded, questions=CHAT_QUESTIONS, max_tokens: int = 24) -> dict[str, list[int]]:
    """Each question as a chat turn, greedy, batched in one engine without a prefix cache
    over `loaded` (a LoadedModel): request index (as text) -> output token ids."""
    from pdserve.runtime.config import SchedulerConfig

    engine = EngineCore(loaded.runner, loaded.info, SchedulerConfig(), enable_prefix_caching=False)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return run_to_completion(engine, {str(i): (loaded.tokenizer.encode_chat([{"role": "user", "content": q}]), params)
                                      for i, q in enumerate(questions)})
