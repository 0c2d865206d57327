"""Llama-family decoder over a paged KV cache: Llama 2/3, SmolLM2, Mistral, Qwen2.

The variants differ only in flags of `ModelConfig` (qkv bias, tied embeddings, RoPE
scaling, head_dim). Projections that read the same input are fused (q/k/v into one
matmul, gate/up into another); `load_weights` takes HF parameter names and fills the
fused slices.

Which kernels run (PyTorch references or Triton) is a `Kernels` strategy fixed at
construction; every module calls its functions and knows nothing of either family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.kernels.block_linear import block_linear, dequantize_blocks_ref
from pdserve.kernels.cpu_layer_ops import decoder_layers_cpu, rms_norm_cpu
from pdserve.kernels.rope import rope_cos_sin_cache
from pdserve.runtime.attention_backend import Kernels, reference_kernels
from pdserve.runtime.config import ModelConfig
from pdserve.runtime.forward_batch import ForwardBatch
from pdserve.runtime.kv_pool import KVPool
from pdserve.runtime.rotary import rope_inv_freq


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    # Uninitialised on purpose: every parameter is overwritten by load_weights, which
    # checks that none is left missing.
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


# Rows up to which a linear layer with GGUF blocks computes from them (fewer bytes to
# stream); beyond it the dense float32 GEMM is faster. SmolLM2's 30 layers and head on
# this project's 2-core machine, blocks vs dense, ms: 8 rows 23 vs 58, 16 rows 39 vs 61,
# 24 rows 53 vs 57, 32 rows 69 vs 68, 64 rows 215 vs 126 (2 threads; 1 thread alike).
BLOCK_LINEAR_MAX_ROWS = 24


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param(out_features, in_features, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None
        # The same weight as GGUF blocks (CPU), see `use_blocks`. A buffer, so compiled
        # layers take it as a graph input like the weight and share one graph.
        self.block_kind: str | None = None
        self.register_buffer("block_data", None, persistent=False)

    def use_blocks(self, blocks: WeightBlocks) -> None:
        """Compute batches of up to BLOCK_LINEAR_MAX_ROWS rows from `blocks`, which hold
        exactly this layer's weight (or a quantization of it)."""
        self.block_kind, self.block_data = blocks.kind, blocks.data

    def drop_dense(self) -> None:
        """Keep the blocks only: every batch then computes from them."""
        if self.block_kind is None:
            raise ValueError("a linear layer without blocks must keep its dense weight")
        self.weight = None

    @property
    def blocks(self) -> WeightBlocks | None:
        return None if self.block_kind is None else WeightBlocks(self.block_kind, self.block_data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block_kind is not None and (self.weight is None or x.shape[0] <= BLOCK_LINEAR_MAX_ROWS):
            y = block_linear(x, self.block_data, self.block_kind)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


class WeightBlocks(NamedTuple):
    """A weight [out, in] kept as GGUF blocks [out, in / 32, bytes] of one kind (see
    pdserve.kernels.block_linear): bit-identical to the dense weight, 4-6x fewer bytes."""

    kind: str
    data: torch.Tensor

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = block_linear(x, self.data, self.kind)
        return y if bias is None else y + bias


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, kernels: Kernels) -> None:
        super().__init__()
        self.weight = _param(size, dtype=dtype)
        self.eps = eps
        self.kernel = kernels.rms_norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.kernel(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, kernels: Kernels) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.rope = kernels.rope
        self.backend = kernels.attention
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, cfg.qkv_bias, cfg.dtype)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, cfg.o_bias, cfg.dtype)

    def project(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
        """q [T, H, D], k and v [T, KVH, D] of the normed hidden states `x`, RoPE applied."""
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rope(q, k, positions, cos_sin)
        return q, k, v

    def attend(self, q, k, v, batch: ForwardBatch, pool: KVPool) -> torch.Tensor:
        """Store this layer's new K/V in the pool and attend over it: [T, H * D]."""
        return self.backend.forward(q, k, v, pool.layer(self.layer_index), batch, self.scale).reshape(-1, self.q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias, cfg.dtype)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, cfg.dtype)
        self.silu_mul = kernels.silu_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, kernels: Kernels) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, kernels)
        self.self_attn = Attention(cfg, layer_index, kernels)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, kernels)
        self.mlp = MLP(cfg, kernels)

    def forward(self, x, residual, batch: ForwardBatch, pool: KVPool, cos_sin):
        """(output, residual stream) of this layer; writes its K/V for `batch` to `pool`.

        Three parts: `before_attention` and `after_attention` are pure tensor functions
        (what `compile_layers` compiles); the attention between them writes the pool and
        runs its own kernels, so it stays out of any compiled graph."""
        q, k, v, residual = self.before_attention(x, residual, batch.positions, cos_sin)
        out = self.self_attn.attend(q, k, v, batch, pool)
        return self.after_attention(out, residual)

    def before_attention(self, x, residual, positions, cos_sin):
        h, residual = self.input_layernorm(x, residual)
        q, k, v = self.self_attn.project(h, positions, cos_sin)
        return q, k, v, residual

    def after_attention(self, attention_out, residual):
        h, residual = self.post_attention_layernorm(self.self_attn.o_proj(attention_out), residual)
        return self.mlp(h), residual


# HF name suffix -> (fused parameter suffix, which slice). Slices index the fused output
# dimension in the order q, k, v and gate, up.
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def _fused_parts(module_name: str) -> int:
    """How many checkpoint tensors make up the weight of the linear layer `module_name`."""
    return 3 if module_name.endswith("qkv_proj") else 2 if module_name.endswith("gate_up_proj") else 1


def _hf_weight_names(module_name: str) -> list[str]:
    """The checkpoint (HF) names of the weight tensors of the linear layer `module_name`
    (e.g. layers.0.self_attn.qkv_proj -> the layer's q_proj, k_proj and v_proj weights)."""
    names = [f"model.{module_name.removesuffix(fused)}{hf}.weight"
             for hf, (fused, _) in _FUSED.items() if module_name.endswith(f".{fused}")]
    return names or [f"model.{module_name}.weight"]


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.kernels = kernels or reference_kernels()
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.kernels) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, self.kernels)
        self.lm_head = None if cfg.tie_word_embeddings else _param(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype)
        self.head_blocks: WeightBlocks | None = None  # the LM head in blocks (block_linear: C++ or Triton)
        self.embed_blocks: WeightBlocks | None = None  # the embedding in blocks (CPU: no dense copy)
        self.fused_layers = None  # the layers as one C++ call, see fuse_layers
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer(
            "cos_sin_cache", rope_cos_sin_cache(inv_freq, cfg.max_position_embeddings), persistent=False
        )

    def forward(self, batch: ForwardBatch, pool: KVPool, on_layer_done=None) -> torch.Tensor:
        """Hidden states [T, hidden] of every token in `batch`; writes their K/V to `pool`.
        `on_layer_done(i)`, if given, is called as soon as layer i's K/V are in the pool
        (later layers never write them again), so they can be shipped while the rest of
        the forward runs."""
        self.kernels.attention.prepare(batch)
        if self.embed_tokens is None:  # blocks only: rebuild the rows asked for, exactly
            x = dequantize_blocks_ref(self.embed_blocks.data[batch.input_ids], self.embed_blocks.kind)
        else:
            x = F.embedding(batch.input_ids, self.embed_tokens)
        residual = None
        if self.fused_layers is not None:
            query_start, seq_lens = self.kernels.attention.lengths(batch)

            def fused(x, residual, first, last):
                return self.fused_layers.forward(x, residual, first, last, pool.kv, batch.positions,
                                                 self.cos_sin_cache, batch.slot_mapping, batch.block_tables,
                                                 query_start, seq_lens, pool.scales)

            if on_layer_done is None:
                x, residual = fused(x, residual, 0, len(self.layers))
            else:
                for index in range(len(self.layers)):
                    x, residual = fused(x, residual, index, index + 1)
                    on_layer_done(index)
        else:
            for index, layer in enumerate(self.layers):
                x, residual = layer(x, residual, batch, pool, self.cos_sin_cache)
                if on_layer_done is not None:
                    on_layer_done(index)
        x, _ = self.norm(x, residual)
        return x

    def fuse_layers(self) -> None:
        """Run the decoder layers as one C++ call per forward (`decoder_layers_cpu`): the
        same kernels in the same order as the Python layers, so bit-identical, without
        the Python between them (~5 ms a step at batch 8 on SmolLM2's 30 layers). Needs
        the "cpu" kernel family (eager, float32). Call last, after every weight and block
        is in place: the C++ side holds the tensors it is given."""
        if self.kernels.name != "cpu" or self.kernels.rms_norm is not rms_norm_cpu:
            raise ValueError("fused layers need the eager 'cpu' kernel family")

        def linear(module: Linear) -> tuple:
            return module.weight, module.bias, module.block_data, module.block_kind

        cfg = self.config
        layers = [(layer.input_layernorm.weight, linear(layer.self_attn.qkv_proj), linear(layer.self_attn.o_proj),
                   layer.post_attention_layernorm.weight, linear(layer.mlp.gate_up_proj), linear(layer.mlp.down_proj))
                  for layer in self.layers]
        self.fused_layers = decoder_layers_cpu(layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                               cfg.rms_norm_eps, cfg.head_dim ** -0.5, BLOCK_LINEAR_MAX_ROWS)

    def store_weights_input_major(self) -> None:
        """Re-lay every matmul weight (and the LM head, tied or not) out as [in, out] in
        memory, keeping its [out, in] shape as a transposed view, so F.linear runs as a
        plain GEMM. For the CPU: MKL's fp32 GEMM is about 2x faster with this layout for
        4-64 rows (the decode batches) and the same for prefill-sized inputs (measured with
        bench/step_profile.py's matmul floor). Embedding lookups from the tied head then
        read strided rows, a few ms per 512-token chunk. Call once, after load_weights."""
        for param in self.parameters():
            if param.dim() == 2:
                param.data = param.data.t().contiguous().t()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        if self.head_blocks is not None and (head is None or hidden.shape[0] <= BLOCK_LINEAR_MAX_ROWS):
            return self.head_blocks.linear(hidden)
        return F.linear(hidden, head).float()

    def quantize_weights(self, kind: str, quantize: Callable[[torch.Tensor], torch.Tensor],
                         quantizable: Callable[[torch.Tensor], bool]) -> int:
        """Give every linear layer, the embedding and the LM head blocks of `kind` made
        from their dense weights by `quantize` (a weight [out, in] -> blocks [out, in / 32,
        bytes]); weights that are not `quantizable` stay dense only. After `load_weights`,
        instead of `load_blocks`. Returns how many layers (head included) got blocks."""
        count = 0
        for module in self.modules():
            if isinstance(module, Linear) and quantizable(module.weight):
                module.use_blocks(WeightBlocks(kind, quantize(module.weight)))
                count += 1
        if quantizable(self.embed_tokens):
            self.embed_blocks = WeightBlocks(kind, quantize(self.embed_tokens))
        if self.config.tie_word_embeddings:
            self.head_blocks = self.embed_blocks
        elif quantizable(self.lm_head):
            self.head_blocks = WeightBlocks(kind, quantize(self.lm_head))
        return count + int(self.head_blocks is not None)

    def blocks_to(self, device: torch.device | str) -> None:
        """Move every block tensor (linear layers, embedding, LM head) to `device`."""
        for module in self.modules():
            if isinstance(module, Linear) and module.block_kind is not None:
                module.block_data = module.block_data.to(device)
        tied = self.head_blocks is self.embed_blocks
        if self.embed_blocks is not None:
            self.embed_blocks = WeightBlocks(self.embed_blocks.kind, self.embed_blocks.data.to(device))
        if tied:
            self.head_blocks = self.embed_blocks
        elif self.head_blocks is not None:
            self.head_blocks = WeightBlocks(self.head_blocks.kind, self.head_blocks.data.to(device))

    def drop_dense_weights(self) -> frozenset[str]:
        """Free the dense copy of every weight that has blocks (the blocks then serve every
        batch size). After `load_blocks` or `quantize_weights`, before `fuse_layers`; may
        come before `load_weights`, which then must not be given the returned HF names
        (the checkpoint tensors the blocks now stand for)."""
        dropped = []
        for name, module in self.named_modules():
            if isinstance(module, Linear) and module.block_kind is not None:
                module.drop_dense()
                dropped += _hf_weight_names(name)
        if self.embed_blocks is not None:
            self.embed_tokens = None
            dropped.append("model.embed_tokens.weight")
        if self.lm_head is not None and self.head_blocks is not None:
            self.lm_head = None
            dropped.append("lm_head.weight")
        return frozenset(dropped)

    def load_blocks(self, blocks: Iterable[tuple[str, str, torch.Tensor]]) -> int:
        """Give linear layers (and the LM head) their GGUF blocks, from HF-named
        `(name, kind, blocks)`; before or after `load_weights`. A fused layer takes blocks
        only when all its parts come as blocks of one kind, stacked in its row order, as
        soon as its last part arrives (so at most one layer's parts wait at a time for a
        file stored layer by layer). Returns how many layers (head included) now compute
        from blocks. CPU float32 only."""
        assembler = _BlockAssembler(self)
        for hf_name, kind, data in blocks:
            assembler.add(hf_name, kind, data)
        return assembler.count + int(self.head_blocks is not None)

    def load_weights_quantized(self, weights: Iterable[tuple[str, torch.Tensor]], kind: str,
                               quantize: Callable[[torch.Tensor], torch.Tensor],
                               quantizable: Callable[[torch.Tensor], bool]) -> int:
        """`load_weights`, `quantize_weights` and `drop_dense_weights` in one pass over
        `weights`: each checkpoint tensor of a weight that gets blocks (every `quantizable`
        linear layer, the embedding, the LM head) is quantized by `quantize` as it is read
        and let go, and the dense parameter it would fill is never written (it is freed
        first). So at most one such tensor exists in float at a time, besides the blocks
        made so far, never the whole dense model. The blocks are those `quantize_weights`
        makes from the loaded weights, byte for byte: quantizing is per row, so q, k and v
        (gate and up) quantized apart and stacked are the fused weight quantized whole.
        Everything else is loaded as `load_weights` does, with its checks. Returns how many
        layers (head included) got blocks; with none, the model is loaded dense."""
        params = dict(self.named_parameters())
        held = {f"{name}.weight" for name, module in self.named_modules()
                if isinstance(module, Linear) and quantizable(module.weight)}
        held |= {name for name in ("embed_tokens", "lm_head")
                 if params.get(name) is not None and quantizable(params[name])}
        if not held:
            self.load_weights(weights)
            return 0
        shapes = {name: tuple(params[name].shape) for name in held}
        del params  # the dense parameters below go now, before any tensor is read
        for name, module in self.named_modules():
            if f"{name}.weight" in held:
                module.weight = None
        self.embed_tokens = None if "embed_tokens" in held else self.embed_tokens
        self.lm_head = None if "lm_head" in held else self.lm_head
        assembler = _BlockAssembler(self)
        dtype, sizes = self.config.dtype, self._slice_sizes()
        quantized: set[str] = set()

        def dense() -> Iterator[tuple[str, torch.Tensor]]:
            """The tensors left to `load_weights`; quantizes the others on the way."""
            for hf_name, tensor in weights:
                target, part = self._parameter_of(hf_name)
                if target not in held:
                    yield hf_name, tensor
                    continue
                if hf_name in quantized:
                    raise ValueError(f"checkpoint tensor {hf_name!r} comes twice")
                quantized.add(hf_name)
                expected = shapes[target]
                if part is not None:
                    expected = (sizes[part[0]][part[1]], *expected[1:])
                if tuple(tensor.shape) != expected:
                    raise ValueError(
                        f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {expected}; the config does not match the weights"
                    )
                blocks = quantize(tensor.to(dtype))
                del tensor  # before the next tensor is read
                assembler.add(hf_name, kind, blocks)

        self.load_weights(dense())
        missing = [f"{name}.weight" for name, module in self.named_modules() if f"{name}.weight" in held
                   and module.block_kind is None]
        missing += [name for name, blocks in (("embed_tokens", self.embed_blocks), ("lm_head", self.head_blocks))
                    if name in held and blocks is None]
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(sorted(missing)[:8])}")
        return assembler.count + int(self.head_blocks is not None)

    def _slice_sizes(self) -> dict[str, list[int]]:
        """Rows of each part of the fused layers, in the order of `_FUSED`."""
        return {
            "self_attn.qkv_proj": [self.config.q_size, self.config.kv_size, self.config.kv_size],
            "mlp.gate_up_proj": [self.config.intermediate_size] * 2,
        }

    @staticmethod
    def _parameter_of(hf_name: str) -> tuple[str, tuple[str, int] | None]:
        """The parameter a checkpoint tensor fills, and which part of it for a fused layer
        (e.g. model.layers.0.self_attn.k_proj.weight -> layers.0.self_attn.qkv_proj.weight,
        part 1 of the qkv_proj)."""
        name = hf_name.removeprefix("model.")
        for hf_suffix, (fused, index) in _FUSED.items():
            marker = f".{hf_suffix}."
            if marker in name:
                return name.replace(marker, f".{fused}."), (fused, index)
        return {"embed_tokens.weight": "embed_tokens", "lm_head.weight": "lm_head"}.get(name, name), None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the (fused) parameters; every parameter must be set
        exactly once and every tensor must be used, or ValueError names the culprit."""
        params = dict(self.named_parameters())
        slice_sizes = self._slice_sizes()
        filled: dict[str, int] = {}
        for hf_name, tensor in weights:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue  # derived from the config, not a weight
            if hf_name.removeprefix("model.") == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints store the copy anyway
            target, part = self._parameter_of(hf_name)
            if target not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {self.config.architecture}")
            param = params[target]
            dest = param.data
            if part is not None:
                sizes = slice_sizes[part[0]]
                dest = dest.narrow(0, sum(sizes[: part[1]]), sizes[part[1]])
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(
                    f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dest.shape)}; the config does not match the weights"
                )
            dest.copy_(tensor.to(dest.dtype))
            filled[target] = filled.get(target, 0) + 1
        expected_counts = {n: (3 if "qkv_proj.weight" in n or "qkv_proj.bias" in n else
                               2 if "gate_up_proj" in n else 1) for n in params}
        missing = [n for n, count in expected_counts.items() if filled.get(n, 0) != count]
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(sorted(missing)[:8])}")


class _BlockAssembler:
    """Hands HF-named blocks to a model's linear layers, embedding and LM head, as
    `load_blocks` describes: a fused layer takes them once all its parts have come."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.parts: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}  # fused layers still waiting
        self.count = 0  # linear layers given blocks

    def add(self, hf_name: str, kind: str, data: torch.Tensor) -> None:
        model = self.model
        name = hf_name.removeprefix("model.").removesuffix(".weight")
        if name in ("embed_tokens", "lm_head"):
            blocks = WeightBlocks(kind, data)
            if name == "embed_tokens":
                model.embed_blocks = blocks
            if (name == "lm_head") != model.config.tie_word_embeddings:
                model.head_blocks = blocks  # tied: the embedding's own (see blocks_to)
            return
        index = 0
        for hf_suffix, (fused, part) in _FUSED.items():
            if name.endswith(f".{hf_suffix}"):
                name, index = name.removesuffix(hf_suffix) + fused, part
                break
        pieces = self.parts.setdefault(name, {})
        pieces[index] = (kind, data)
        linear = self.modules.get(name)
        if not isinstance(linear, Linear) or len(pieces) != _fused_parts(name):
            return
        del self.parts[name]
        kinds = {kind for kind, _ in pieces.values()}
        if len(kinds) != 1:
            return
        data = torch.cat([pieces[i][1] for i in range(len(pieces))]) if len(pieces) > 1 else pieces[0][1]
        out_features, in_features = linear.out_features, linear.in_features
        if data.shape[0] != out_features or data.shape[1] * 32 != in_features:
            raise ValueError(f"GGUF blocks for {name} have shape {tuple(data.shape)}, which does not "
                             f"match its weight {(out_features, in_features)}")
        linear.use_blocks(WeightBlocks(kinds.pop(), data))
        self.count += 1
