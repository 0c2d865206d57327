"""HF transformers as the correctness oracle: greedy continuations and logits."""

from __future__ import annotations

import torch


@torch.no_grad()
def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy `generate` on one prompt alone; EOS does not stop it."""
    out = hf_model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
    )
    tokens = out[0, len(prompt_ids):].tolist()
    assert len(tokens) == max_new_tokens
    return tokens


@torch.no_grad()
def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] float32 logits of one sequence."""
    return hf_model(torch.tensor([ids])).logits[0].float()


def explain_divergence(hf_model, prompt_ids, ours: list[int], theirs: list[int]) -> str:
    """Describe where two greedy continuations first differ, and whether the oracle's
    own top-2 logits were a near-tie there (then either choice is right)."""
    step = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    logits = hf_logits(hf_model, prompt_ids + theirs[:step])[-1]
    top2 = logits.topk(2)
    gap = float(top2.values[0] - top2.values[1])
    verdict = "a NEAR-TIE (gap below fp32 noise)" if gap < 1e-4 else "NOT a tie: a real bug"
    return (f"greedy tokens diverge at step {step}: ours {ours[step]} vs transformers "
            f"{theirs[step]}; transformers' top-2 logit gap there is {gap:.2e}, {verdict}")
