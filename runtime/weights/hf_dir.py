"""HuggingFace model directories: config.json, tokenizer files and safetensors weights."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pdserve.runtime.config import SUPPORTED_ARCHITECTURES, ConfigError, ModelConfig, RopeScaling
from pdserve.runtime.tokenizer import Tokenizer, TokenizerError
from pdserve.runtime.weights.checkpoint import ACCEPTED_FORMS, Checkpoint, CheckpointError

logger = logging.getLogger(__name__)

_ARCHITECTURE_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# Buffers some older checkpoints saved alongside the parameters; recomputed by the runtime.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def model_config_from_hf(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a HF `config.json` dict (transformers 4.x or 5.x layout) into a ModelConfig."""
    model_type = cfg.get("model_type")
    declared = (cfg.get("architectures") or [None])[0]
    architecture = declared or _ARCHITECTURE_BY_MODEL_TYPE.get(model_type)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{source}: architecture {architecture!r} (model_type {model_type!r}) is not "
            f"supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise CheckpointError(
                f"{source} has no {key!r}; is it a complete {architecture} config?")
        return cfg[key]

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    max_positions = need("max_position_embeddings")
    # transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x `rope_scaling`.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    rope_scaling = RopeScaling() if kind == "default" else RopeScaling(
        kind=kind,
        factor=float(rope.get("factor", 1.0)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
    )
    window = _sliding_window(cfg, architecture)
    if window is not None and window < max_positions:
        # With the context capped at the window, sliding-window attention sees every token,
        # so full attention computes exactly the same thing.
        logger.warning("%s: sliding_window=%d < max_position_embeddings=%d; capping the context "
                       "length to %d tokens", source, window, max_positions, window)
        max_positions = window
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        architecture=architecture,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=architecture == "Qwen2ForCausalLM" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )


def _sliding_window(cfg: dict[str, Any], architecture: str) -> int | None:
    window = cfg.get("sliding_window")
    if architecture == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
        return None  # Qwen2 writes a window but only uses it with use_sliding_window
    return int(window) if window else None


def load_hf_dir(path: Path) -> Checkpoint:
    """Read config, tokenizer and safetensors headers of a HF directory; tensors stay on disk."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json, so it is not a HuggingFace model "
                              f"directory. Accepted: {ACCEPTED_FORMS}")
    cfg = _read_json(config_file)
    config = model_config_from_hf(cfg, str(config_file))
    try:
        tokenizer = Tokenizer.from_hf_dir(path)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from e
    weights = SafetensorsWeights.open(path, tied=config.tie_word_embeddings)

    generation = path / "generation_config.json"
    gen_cfg = _read_json(generation) if generation.is_file() else {}
    eos: set[int] = set()
    for declared in (gen_cfg.get("eos_token_id"), cfg.get("eos_token_id"), tokenizer.eos_token_id):
        if declared is not None:
            eos.update(declared if isinstance(declared, list) else [declared])
    bos = next((b for b in (gen_cfg.get("bos_token_id"), cfg.get("bos_token_id"),
                            tokenizer.bos_token_id) if b is not None), None)
    return Checkpoint(config=config, tokenizer=tokenizer, eos_token_ids=frozenset(eos),
                      bos_token_id=bos, source=str(path.resolve()), weights=weights)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} is not readable JSON ({e}); is the download complete?") from e


class SafetensorsWeights:
    """Tensors of `model.safetensors` or of the shards a `.index.json` lists, read lazily."""

    def __init__(self, files: dict[Path, list[str]]) -> None:
        self._files = files  # shard -> parameter names to yield from it, in file order

    @classmethod
    def open(cls, path: Path, tied: bool) -> SafetensorsWeights:
        """Find the weight files and validate their headers (cheap; no tensor data is read)."""
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            shards = sorted({path / name for name in weight_map.values()})
        elif single.is_file():
            shards = [single]
        else:
            raise CheckpointError(
                f"{path} has no model.safetensors or model.safetensors.index.json; pdserve reads "
                "safetensors only (convert .bin weights with transformers' save_pretrained)"
            )
        files: dict[Path, list[str]] = {}
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(
                    f"{shard} is listed in {index.name} but missing; re-download it")
            try:
                with safe_open(str(shard), framework="pt") as f:
                    names = list(f.keys())
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{shard} is corrupt or truncated ({e}); re-download it") from e
            files[shard] = [n for n in names if not n.endswith(_IGNORED_SUFFIXES)
                            and not (tied and n == "lm_head.weight")]
        all_names = {n for names in files.values() for n in names}
        if not tied and "lm_head.weight" not in all_names:
            raise CheckpointError(f"{path}: tie_word_embeddings is false but no lm_head.weight "
                                  "tensor was found; the checkpoint is incomplete")
        return cls(files)

    def iter_weights(self, dtype: torch.dtype,
                     skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        for shard, names in self._files.items():
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for name in names:
                        if name not in skip:
                            yield name, f.get_tensor(name).to(dtype)
            except SafetensorError as e:
                raise CheckpointError(f"{shard} is corrupt ({e}); re-download it") from e

    def iter_blocks(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """Safetensors hold dense tensors only: no blocks."""
        return iter(())
