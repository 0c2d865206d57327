"""What the KV cache's scale granularity costs and buys: perplexity of SmolLM2 (the
transformers oracle, float32 weights from the GGUF) over tests/data/perplexity_text.txt
with its keys (after RoPE) and values quantized to int8 or fp8 e4m3 at three
granularities, and the pool capacity each format gives against float32 at the same
memory.

    row        one float16 scale per (token, kv-head) row of head_dim values: pdserve's
               format (kernels/kv_quant.py), computed with its reference
    page-head  one scale per (page of --page-size tokens, kv-head)
    page       one scale per page, across kv-heads

The text is one forward, so each page's scale sees the whole page: the best case for the
page formats (a decode worker filling a page a token at a time would have to rescale the
page's stored rows when a larger row arrives, rounding them twice).

Which values land next to a rounding boundary is chance: scaling K and V by 1 +- 1e-6
before they are stored moves fp8's perplexity by ~0.1%. Each format is scored at
--nudges such scalings and reported as mean and range, so a difference between formats
can be told from that noise.

    python bench/kv_scale_granularity.py [--tokens 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch
from common import load_transformers_smollm2, machine_line, smollm2_gguf

from pdserve.kernels.kv_quant import dequantize_kv_ref, quantize_kv_ref
from pdserve.runtime.perplexity import perplexity_from_logits

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "perplexity_text.txt"
GRANULARITIES = ("row", "page-head", "page")
DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def fake_quantize(x: torch.Tensor, dtype: torch.dtype, granularity: str, page_size: int) -> torch.Tensor:
    """x [tokens, kv_heads, head_dim] float32, stored and read back at `granularity`: each
    group of values that shares a scale goes through pdserve's row quantizer as one row."""
    if granularity == "row":
        return dequantize_kv_ref(*quantize_kv_ref(x, dtype))
    tokens, heads, dim = x.shape
    pad = -tokens % page_size
    pages = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).view(-1, page_size, heads, dim)
    # one group per page-head: [pages, heads, page_size * dim]; one per page: [pages, 1, ...]
    groups = pages.transpose(1, 2).reshape(pages.shape[0], heads if granularity == "page-head" else 1, -1)
    back = dequantize_kv_ref(*quantize_kv_ref(groups, dtype))
    back = back.reshape(pages.shape[0], heads, page_size, dim).transpose(1, 2)
    return back.reshape(-1, heads, dim)[:tokens]


def bytes_per_row(granularity: str, head_dim: int, heads: int, page_size: int) -> float:
    """Stored bytes per (token, kv-head) row: 1-byte values plus its share of a 2-byte scale."""
    per_scale = {"row": 1, "page-head": page_size, "page": page_size * heads}[granularity]
    return head_dim + 2 / per_scale


class KVQuantizer:
    """Patches the oracle's attention so every layer's keys (after RoPE) and values are
    replaced by their quantized-and-read-back values before attention reads them."""

    def __init__(self, model, dtype: torch.dtype | None, granularity: str, page_size: int, nudge: float = 0.0):
        from transformers.models.llama import modeling_llama

        self.module, self.rope = modeling_llama, modeling_llama.apply_rotary_pos_emb
        self.model, self.dtype, self.granularity, self.page_size = model, dtype, granularity, page_size
        self.nudge = nudge  # K and V scaled by 1 + nudge before they are quantized
        self.hooks, self.quantized = [], 0

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:  # [batch=1, heads, tokens, dim]
        self.quantized += 1
        return fake_quantize(x[0].transpose(0, 1) * (1 + self.nudge), self.dtype, self.granularity,
                             self.page_size).transpose(0, 1)[None]

    def __enter__(self):
        if self.dtype is None:
            return self

        def rope(q, k, cos, sin, *args, **kwargs):
            q, k = self.rope(q, k, cos, sin, *args, **kwargs)
            return q, self._quantize(k)

        def values(module, inputs, out):  # v_proj's [1, tokens, heads * dim]
            heads = self.model.config.num_key_value_heads
            v = out.view(out.shape[0], out.shape[1], heads, -1).transpose(1, 2)
            return self._quantize(v).transpose(1, 2).reshape(out.shape)

        self.module.apply_rotary_pos_emb = rope
        self.hooks = [layer.self_attn.v_proj.register_forward_hook(values) for layer in self.model.model.layers]
        return self

    def __exit__(self, *exc):
        self.module.apply_rotary_pos_emb = self.rope
        for hook in self.hooks:
            hook.remove()
        if exc[0] is None and self.dtype is not None and self.quantized != 2 * len(self.hooks):
            raise RuntimeError(f"quantized {self.quantized} K/V tensors, not 2 per layer: the oracle's "
                               "attention no longer calls what this bench patches")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the text scored")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page (pdserve's default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nudges", type=float, nargs="+", default=[0.0, 1e-6, -1e-6],
                        help="relative scalings of K and V each format is scored at")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    model = load_transformers_smollm2()
    from transformers import AutoTokenizer

    gguf = Path(smollm2_gguf())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokens = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)[:args.tokens]
    config = model.config
    heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads

    def score(dtype, granularity, nudge=0.0) -> float:
        with KVQuantizer(model, dtype, granularity, args.page_size, nudge), torch.inference_mode():
            logits = model(torch.tensor([tokens])).logits[0]
        return perplexity_from_logits(logits, tokens)

    base = score(None, "row")
    print(f"{len(tokens)} tokens, {heads} kv-heads x {head_dim}, pages of {args.page_size} tokens; "
          f"each quantized format at nudges {args.nudges}")
    print(f"{'KV cache':<16s} {'perplexity':>10s} {'vs float32 (range)':>26s} {'bytes/row':>9s} {'capacity':>9s}")
    print(f"{'float32':<16s} {base:10.3f} {'1.0000':>26s} {4 * head_dim:9.2f} {1.0:8.2f}x")
    for name, dtype in DTYPES.items():
        for granularity in GRANULARITIES:
            ratios = [score(dtype, granularity, nudge) / base for nudge in args.nudges]
            size = bytes_per_row(granularity, head_dim, heads, args.page_size)
            spread = f"{statistics.mean(ratios):.4f} ({min(ratios):.4f}-{max(ratios):.4f})"
            print(f"{name + ' ' + granularity:<16s} {statistics.mean(ratios) * base:10.3f} {spread:>26s} "
                  f"{size:9.2f} {4 * head_dim / size:8.2f}x")
    return 0 if math.isfinite(base) else 1


if __name__ == "__main__":
    raise SystemExit(main())
