"""GGUF files (llama.cpp's format): metadata -> ModelConfig, tensors -> HF names, float32.

Quantized tensors are dequantized with `gguf.quants.dequantize` (numpy) one at a time; the
135M SmolLM2 Q4_1 file takes about a second in total. Two layout facts matter:

* GGUF lists a tensor's dims innermost first (ggml order); the numpy arrays the reader and
  `dequantize` return are already in row-major order, i.e. HF's `[out_features, in_features]`.
* llama.cpp's converter permutes the rows of Llama's q/k projections (see `permute_qk`);
  `unpermute_qk` undoes it. Qwen2 files are written unpermuted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from pdserve.runtime.config import SUPPORTED_ARCHITECTURES, ConfigError, ModelConfig, RopeScaling
from pdserve.runtime.tokenizer import Tokenizer, TokenizerError
from pdserve.runtime.weights.checkpoint import Checkpoint, CheckpointError

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# GGML block formats the CPU kernels compute from (pdserve.kernels.block_linear).
_BLOCK_KINDS = {GGMLQuantizationType.Q4_1: "q4_1", GGMLQuantizationType.Q8_0: "q8_0"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """HF parameter name for a GGUF tensor name, or None if it is not one we know."""
    match = _LAYER_RE.fullmatch(gguf_name)
    if match:
        layer, kind, suffix = match.groups()
        part = _PER_LAYER.get(kind)
        return None if part is None else f"model.layers.{layer}.{part}.{suffix}"
    stem, _, suffix = gguf_name.rpartition(".")
    return f"{_TOP_LEVEL[stem]}.{suffix}" if stem in _TOP_LEVEL else None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: within each head, interleave the two rotary halves' rows."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`: rows (h, i, r) in GGUF order go back to (h, r, i)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _float32(value: Any) -> float:
    """GGUF stores floats as float32; recover the decimal the converter was given (1e-5,
    not 9.99999975e-06) by taking float32's shortest round-tripping representation."""
    return float(str(np.float32(value)))


def model_config_from_gguf(reader: GGUFReader, source: str) -> ModelConfig:
    """Build a ModelConfig from `general.architecture` and the `{arch}.*` metadata."""
    arch = _value(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ConfigError(
            f"{source}: GGUF architecture {arch!r} is not supported; supported GGUF "
            f"architectures: {', '.join(_ARCHITECTURES)} (runtime architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def need(key: str) -> Any:
        value = _value(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(
                f"{source} lacks GGUF metadata {arch}.{key}; the file is incomplete")
        return value

    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ConfigError(f"{source}: per-frequency RoPE factors (rope_freqs, Llama 3.1 style) "
                          "are not supported from GGUF; load the HuggingFace directory instead")
    unknown = sorted(n for n in names if hf_name(n) is None)
    if unknown:
        raise CheckpointError(f"{source}: unexpected tensors {unknown[:5]} for a {arch} model; "
                              "pdserve reads plain llama/qwen2 decoders only")
    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = _value(reader, f"{arch}.attention.key_length") or hidden // heads
    rope_dim = _value(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and rope_dim != head_dim:
        raise ConfigError(f"{source}: partial rotary embeddings (rope dims {rope_dim} of head_dim "
                          f"{head_dim}) are not supported")
    tokens = _value(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise CheckpointError(f"{source} has no tokenizer.ggml.tokens; it cannot be served")
    scaling = _value(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ConfigError(f"{source}: GGUF rope scaling {scaling!r} is not supported; supported: "
                          "none, linear")
    rope_scaling = RopeScaling() if scaling == "none" else RopeScaling(
        kind="linear", factor=_float32(need("rope.scaling.factor")))
    return ModelConfig(
        architecture=_ARCHITECTURES[arch],
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_layers=need("block_count"),
        num_heads=heads,
        num_kv_heads=_value(reader, f"{arch}.attention.head_count_kv") or heads,
        head_dim=head_dim,
        max_position_embeddings=need("context_length"),
        rms_norm_eps=_float32(need("attention.layer_norm_rms_epsilon")),
        rope_theta=_float32(_value(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
    )


class GgufWeights:
    """Dequantizes a GGUF's tensors one at a time under HF names. Holds the file's memmap."""

    def __init__(self, reader: GGUFReader, source: str, qk_heads: tuple[int, int] | None) -> None:
        self._reader = reader
        self._source = source
        self._qk_heads = qk_heads  # (num_heads, num_kv_heads) when q/k rows are permuted

    def iter_weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        for tensor in self._reader.tensors:
            name = hf_name(tensor.name)
            try:
                array = dequantize(tensor.data, tensor.tensor_type)
                array = array.reshape(tuple(int(d) for d in reversed(tensor.shape)))
            except (ValueError, NotImplementedError) as e:
                raise CheckpointError(f"{self._source}: cannot read tensor {tensor.name} "
                                      f"({tensor.tensor_type.name}): {e}") from e
            if self._qk_heads is not None and ".attn_q." in tensor.name:
                array = unpermute_qk(array, self._qk_heads[0])
            elif self._qk_heads is not None and ".attn_k." in tensor.name:
                array = unpermute_qk(array, self._qk_heads[1])
            if not array.flags.writeable:  # F32 tensors are read-only views of the memmap
                array = array.copy()
            yield name, torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(dtype)


    def iter_blocks(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """The Q4_1 and Q8_0 matrices as raw blocks [out, in / 32, block bytes] (uint8),
        q/k rows put back in HF order like `iter_weights` does."""
        for tensor in self._reader.tensors:
            kind = _BLOCK_KINDS.get(tensor.tensor_type)
            if kind is None or len(tensor.shape) != 2:
                continue
            rows = int(tensor.shape[1])
            array = np.asarray(tensor.data).reshape(rows, int(tensor.shape[0]) // 32, -1)
            if self._qk_heads is not None and ".attn_q." in tensor.name:
                array = unpermute_qk(array, self._qk_heads[0])
            elif self._qk_heads is not None and ".attn_k." in tensor.name:
                array = unpermute_qk(array, self._qk_heads[1])
            yield hf_name(tensor.name), kind, torch.from_numpy(np.array(array))  # a writable copy


def load_gguf(path: Path) -> Checkpoint:
    """Parse a GGUF's metadata and tensor table (tensor data stays memory-mapped)."""
    source = str(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on bad input; all mean the same
        raise CheckpointError(f"{source} is not a readable GGUF file; it is corrupt or "
                              f"truncated ({type(e).__name__}: {e}). Re-download it.") from e
    config = model_config_from_gguf(reader, source)
    try:
        tokenizer = Tokenizer.from_gguf(reader)
    except TokenizerError as e:
        raise CheckpointError(f"{source}: {e}") from e
    eos = {_value(reader, f"tokenizer.ggml.{key}") for key in
           ("eos_token_id", "eot_token_id", "eom_token_id")} - {None}
    permuted = config.architecture == "LlamaForCausalLM"
    weights = GgufWeights(reader, source,
                          (config.num_heads, config.num_kv_heads) if permuted else None)
    return Checkpoint(config=config, tokenizer=tokenizer, eos_token_ids=frozenset(eos),
                      bos_token_id=_value(reader, "tokenizer.ggml.bos_token_id"),
                      source=str(path.resolve()), weights=weights)
