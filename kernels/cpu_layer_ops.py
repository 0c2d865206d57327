"""The small per-layer operations of a decoder, in C++ for the CPU (csrc/layer_ops_cpu.cpp).

Each function has the contract of its PyTorch reference for float32 tensors; at decode
batch sizes the references spend more in per-op overhead than in arithmetic (RMSNorm is
eight ATen ops, RoPE about fifteen), these are one pass each:

    rms_norm_cpu    rms_norm_ref (kernels/rmsnorm.py)
    rope_cpu        rope_ref (kernels/rope.py)
    silu_mul_cpu    silu_mul_ref (kernels/activation.py)
    store_kv_cpu    store_kv_ref (kernels/kv_store.py)

`decoder_layers_cpu` chains them (with block_linear and paged_attention) into a whole
decoder's layers, one call per forward (csrc/decoder_layers_cpu.cpp).

They call the extension directly (no torch custom op), so torch.compile cannot trace
them: compiled layers keep the references, which inductor fuses itself. They raise
RuntimeError where the CPU kernels are not built (see `cpu_kernels_available`).
"""

from __future__ import annotations

import torch

from pdserve.kernels.cpu_extension import built_cpu_extension


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm_ref`'s contract; x (and residual) [rows, N] float32 with contiguous rows."""
    return built_cpu_extension().rms_norm(x, weight, eps, residual)


def rope_cpu(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
             cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_ref`'s contract; q and k may be views of a fused QKV output (contiguous head
    dimension); returns contiguous tensors."""
    return built_cpu_extension().rope(q, k, positions, cos_sin_cache)


def silu_mul_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu_mul_ref`'s contract; gate_up [T, 2I] float32 with contiguous rows."""
    return built_cpu_extension().silu_mul(gate_up)


def store_kv_cpu(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
    """`store_kv_ref`'s contract: token t's k/v go to flat slot slot_mapping[t] (-1 skips);
    quantized, bit-identical to the reference, when the cache comes with scales."""
    built_cpu_extension().store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def decoder_layers_cpu(layers: list[tuple], num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                       scale: float, max_block_rows: int):
    """The C++ `DecoderLayers` over a Llama-family model's layers, given per layer as
    (input_norm, qkv, o, post_attention_norm, gate_up, down) with each linear layer as
    (weight, bias or None, GGUF blocks or None, block kind or None); see
    runtime/models/llama.py (`LlamaForCausalLM.fuse_layers`). It holds these tensors, not
    copies. `forward(x, residual, first, last, kv, positions, cos_sin, slot_mapping,
    block_tables, query_start, seq_lens, scales)` runs layers [first, last) and returns (x,
    residual), bit-identical to the Python layers on these kernels (scales: a quantized
    pool's, else None)."""
    return built_cpu_extension().DecoderLayers(layers, num_heads, num_kv_heads, head_dim, eps, scale,
                                               max_block_rows)
