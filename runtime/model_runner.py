"""The model runner: one forward pass over a `ForwardBatch`, returning logits.

It owns the model weights and reads the KV pool through the model's attention layers;
block allocation belongs to the scheduler, so the runner never allocates or frees.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch

from pdserve.runtime.config import CacheConfig, ModelConfig
from pdserve.runtime.forward_batch import ForwardBatch
from pdserve.runtime.kv_pool import KVPool
from pdserve.runtime.models import MODEL_CLASSES

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: KVPool) -> None:
        self.model = model
        self.pool = pool

    @classmethod
    def create(
        cls,
        config: ModelConfig,
        weights: Iterable[tuple[str, torch.Tensor]],
        cache: CacheConfig,
        device: torch.device | str = "cpu",
    ) -> ModelRunner:
        started = time.perf_counter()
        model_class = MODEL_CLASSES[config.architecture]
        with torch.device(device):
            model = model_class(config)
        model.load_weights(weights)
        model.eval()
        pool = KVPool.for_model(config, cache, device)
        log.info(
            "loaded %s (%d layers) in %.1fs; KV pool %d blocks x %d tokens",
            config.architecture, config.num_layers, time.perf_counter() - started,
            pool.num_blocks, pool.block_size,
        )
        return cls(model, pool)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @torch.inference_mode()
    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """Run one forward; return float32 logits [len(batch.sample_indices), vocab].

        Writes the K/V of every token in the batch into its slot; reads nothing but the
        batch and the pool."""
        hidden = self.model(batch, self.pool)
        return self.model.compute_logits(hidden.index_select(0, batch.sample_indices))
