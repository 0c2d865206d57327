"""GGUF files (llama.cpp's format): metadata -> ModelConfig, tensors -> HF names, float32.

Quantized tensors are dequantized with `gguf.quants.dequantize` (numpy) one at a time; the
135M SmolLM2 Q4_1 file takes about a second in total. Tensors in a block format the CPU
kernels compute from (`iter_blocks`) are handed over as the file's bytes, never dequantized.

Memory: `GGUFReader` parses the metadata into ~160 MB of Python objects for SmolLM2 (its
49k-token vocabulary and merges, a numpy view per string), so `load_gguf` keeps only a
table of the tensors (`GgufTensor`: type, shape, offset) and lets the reader go. Tensor
bytes are then read with plain file reads into fresh buffers rather than through a memory
map: mapped file pages count as the process's resident memory for as long as the mapping
lives, ~the file's size after one pass over it.

Two layout facts matter:

* GGUF lists a tensor's dims innermost first (ggml order); the numpy arrays the reader and
  `dequantize` return are already in row-major order, i.e. HF's `[out_features, in_features]`.
* llama.cpp's converter permutes the rows of Llama's q/k projections (see `permute_qk`);
  `unpermute_qk` undoes it. Qwen2 files are written unpermuted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

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
_BLOCK_KINDS = {GGMLQuantizationType.Q4_0: "q4_0", GGMLQuantizationType.Q4_1: "q4_1",
                GGMLQuantizationType.Q8_0: "q8_0"}
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


class GgufTensor(NamedTuple):
    """Where one tensor of a GGUF file lives and how to read it (the reader's table, kept
    without the reader)."""

    name: str  # GGUF name, e.g. blk.0.attn_q.weight
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # HF (row-major) order: [out_features, in_features] for matrices
    array_dtype: np.dtype  # the file's scalar type, or uint8 for block formats
    array_shape: tuple[int, ...]  # rows x bytes per row for block formats
    offset: int  # absolute file offset of the data
    nbytes: int

    @classmethod
    def of(cls, tensor: Any) -> GgufTensor:
        """From a `gguf.ReaderTensor` (whose data is a view of the reader's memory map)."""
        return cls(tensor.name, tensor.tensor_type, tuple(int(d) for d in reversed(tensor.shape)),
                   tensor.data.dtype, tuple(tensor.data.shape), int(tensor.data_offset),
                   int(tensor.data.nbytes))


class GgufWeights:
    """A GGUF file's tensors under HF names, read one at a time with file reads."""

    def __init__(self, path: Path, tensors: list[GgufTensor], qk_heads: tuple[int, int] | None) -> None:
        self._path = path
        self._tensors = tensors
        self._qk_heads = qk_heads  # (num_heads, num_kv_heads) when q/k rows are permuted

    def _read(self, file: Any, tensor: GgufTensor) -> np.ndarray:
        """The tensor's bytes as the array the reader's memory map would give (a fresh copy)."""
        data = np.empty(tensor.nbytes, dtype=np.uint8)
        file.seek(tensor.offset)
        view, done = memoryview(data), 0
        while done < tensor.nbytes:
            got = file.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{self._path}: tensor {tensor.name} ends past the end of the "
                                      "file; it is truncated. Re-download it.")
            done += got
        return data.view(tensor.array_dtype).reshape(tensor.array_shape)

    def _in_hf_row_order(self, name: str, array: np.ndarray) -> np.ndarray:
        if self._qk_heads is not None and ".attn_q." in name:
            return unpermute_qk(array, self._qk_heads[0])
        if self._qk_heads is not None and ".attn_k." in name:
            return unpermute_qk(array, self._qk_heads[1])
        return array

    def _each(self, wanted) -> Iterator[tuple[GgufTensor, np.ndarray]]:
        with self._path.open("rb", buffering=0) as file:
            for tensor in self._tensors:
                if wanted(tensor):
                    yield tensor, self._read(file, tensor)

    def iter_weights(self, dtype: torch.dtype,
                     skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        for tensor, data in self._each(lambda t: hf_name(t.name) not in skip):
            try:
                array = dequantize(data, tensor.qtype).reshape(tensor.shape)
            except (ValueError, NotImplementedError) as e:
                raise CheckpointError(f"{self._path}: cannot read tensor {tensor.name} "
                                      f"({tensor.qtype.name}): {e}") from e
            del data
            dense = [torch.from_numpy(np.ascontiguousarray(self._in_hf_row_order(tensor.name, array),
                                                           dtype=np.float32)).to(dtype)]
            del array
            # Hand over the only reference: a consumer that lets the tensor go before asking
            # for the next one (int8 quantizing at load) then never holds two at once.
            yield hf_name(tensor.name), dense.pop()

    def iter_blocks(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """The matrices stored in a block format of `_BLOCK_KINDS`, as the file's blocks
        [out, in / 32, block bytes] (uint8), q/k rows put back in HF order like
        `iter_weights` does. Each is read straight from the file into its own buffer."""
        def wanted(tensor: GgufTensor) -> bool:
            return tensor.qtype in _BLOCK_KINDS and len(tensor.shape) == 2

        for tensor, data in self._each(wanted):
            rows, cols = tensor.shape
            array = self._in_hf_row_order(tensor.name, data.reshape(rows, cols // 32, -1))
            yield hf_name(tensor.name), _BLOCK_KINDS[tensor.qtype], torch.from_numpy(np.ascontiguousarray(array))


def load_gguf(path: Path) -> Checkpoint:
    """Parse a GGUF's metadata and tensor table; no tensor data is read, and the reader
    (with its memory map) is not kept."""
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
    weights = GgufWeights(path, [GgufTensor.of(t) for t in reader.tensors],
                          (config.num_heads, config.num_kv_heads) if permuted else None)
    return Checkpoint(config=config, tokenizer=tokenizer, eos_token_ids=frozenset(eos),
                      bos_token_id=_value(reader, "tokenizer.ggml.bos_token_id"),
                      source=str(path.resolve()), weights=weights)
