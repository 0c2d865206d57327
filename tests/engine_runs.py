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
