"""Load a model end to end: checkpoint -> weights on device -> KV pool -> runtime info."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pdserve.runtime.config import CacheConfig, ConfigError, DeviceConfig, RuntimeInfo
from pdserve.runtime.model_runner import ModelRunner
from pdserve.runtime.progress import Progress
from pdserve.runtime.tokenizer import Tokenizer
from pdserve.runtime.weights import Checkpoint, load_checkpoint

_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


class _LayerProgress:
    """Counts the decoder layers a weight stream has moved past: a layer counts once a
    tensor of another layer follows it (files list layers in any order: safetensors sorts
    names, so layer 10 comes before layer 2)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.begun: set[int] = set()

    def __call__(self, name: str) -> None:
        match = _LAYER_NAME.match(name)
        if match:
            self.begun.add(int(match[1]))
            self.progress.advance_to(len(self.begun) - 1)


@dataclass(frozen=True)
class LoadedModel:
    checkpoint: Checkpoint
    runner: ModelRunner
    info: RuntimeInfo

    @property
    def tokenizer(self) -> Tokenizer:
        return self.checkpoint.tokenizer


def load_model(
    model: str,
    cache: CacheConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_model_len: int | None = None,
    device_config: DeviceConfig | None = None,
) -> LoadedModel:
    """Resolve `model` (HF directory, .gguf file or embedded name) and make it runnable.

    Placement: either `dtype` and `device` (the default: float32 on the CPU with the
    PyTorch reference kernels, as the correctness oracle tests expect) or a
    `device_config` (kernels, dtype, CUDA graphs; see `DeviceConfig`), not both."""
    if device_config is not None and (dtype != torch.float32 or str(device) != "cpu"):
        raise ConfigError("pass dtype and device inside device_config, not beside it")
    device_config = device_config or DeviceConfig(device=str(device), dtype=dtype)
    checkpoint = load_checkpoint(model)
    config = checkpoint.config
    context = config.max_position_embeddings
    if max_model_len is not None:
        if not 0 < max_model_len <= context:
            raise ConfigError(
                f"max_model_len {max_model_len} must be between 1 and the model's "
                f"context of {context} tokens"
            )
        context = max_model_len
    progress = Progress(f"loading {model}", config.num_layers)
    weights = checkpoint.iter_weights().reporting(_LayerProgress(progress))
    runner = ModelRunner.create(config, weights, cache or CacheConfig(),
                                device_config=device_config, weight_blocks=checkpoint.iter_weight_blocks())
    progress.finish()
    info = RuntimeInfo(
        num_blocks=runner.pool.num_blocks,
        block_size=runner.pool.block_size,
        max_model_len=context,
        eos_token_ids=checkpoint.eos_token_ids,
        bos_token_id=checkpoint.bos_token_id,
        device=runner.device,
    )
    return LoadedModel(checkpoint, runner, info)
