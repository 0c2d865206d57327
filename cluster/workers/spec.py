"""`WorkerSpec`: everything a worker process needs to build its engine, validated once.

The controller makes one spec per role and hands it to every worker actor it creates, so
a replacement worker is built exactly like the one it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.kv_transfer.decode_side import OnTransferFailure
from pdserve.kv_transfer.transports.base import KINDS
from pdserve.runtime.config import CacheConfig, ConfigError, DeviceConfig, SchedulerConfig, SpeculativeConfig
from pdserve.runtime.threads import AUTO, Threads

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class WorkerSpec:
    model: str
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory_bytes: int = 512 * 1024**2
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_bytes
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int = 512
    # Prompt tokens per step while the worker also decodes (None: no limit); see
    # SchedulerConfig.max_prefill_tokens_while_decoding.
    max_prefill_tokens_while_decoding: int | None = None
    prompt_deadline_factor: float = 0.0  # see SchedulerConfig.prompt_deadline_factor
    enable_prefix_caching: bool = True
    threads: Threads = AUTO  # torch threads per worker: "auto" (one per core it is pinned to) or N
    max_queued_requests: int = 256  # a worker refuses new requests past this many queued
    transfer_timeout: float = 30.0  # seconds a decode worker waits for a request's KV
    on_transfer_failure: str = OnTransferFailure.RECOMPUTE.value
    kv_transport: str | None = None  # forced transport kind; None picks per pair
    kv_host: str | None = None  # address KV listeners bind; None: this node's Ray address
    speculative: SpeculativeConfig | None = None  # decode workers speculate when set
    device: str = "auto"  # where workers run the model: auto (CUDA if the process sees one), cpu, cuda[:N]
    gpus_per_worker: float = 0.0  # Ray GPUs each worker actor asks for (1 on a GPU pool)
    compile: bool = False  # torch.compile the decoder layers at start-up (CPU)
    quantization: str = "auto"  # how weights are held: see runtime.config.DeviceConfig.quantization
    # How the KV cache is stored: see runtime.config.CacheConfig.kv_cache_dtype. Prefill and
    # decode workers of one cluster share it (pools of different dtypes never link).
    kv_cache_dtype: str = "auto"
    # Seconds an engine loop may go without progress (one step running, or a stuck
    # thread) before its worker counts as hung and is replaced: far above any one step.
    engine_hang_timeout: float = 120.0

    def __post_init__(self) -> None:
        for name in ("block_size", "kv_cache_memory_bytes", "max_num_seqs", "max_num_batched_tokens",
                     "max_prefill_chunk", "max_queued_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.threads != AUTO and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                     or self.threads < 1):
            raise ConfigError(f"threads must be a positive integer or 'auto', got {self.threads!r}")
        if not self.transfer_timeout > 0:
            raise ConfigError(f"transfer_timeout must be > 0 seconds, got {self.transfer_timeout!r}")
        if self.on_transfer_failure not in {p.value for p in OnTransferFailure}:
            raise ConfigError(f"on_transfer_failure must be one of "
                              f"{', '.join(p.value for p in OnTransferFailure)}, got {self.on_transfer_failure!r}")
        if self.kv_transport is not None and self.kv_transport not in KINDS:
            raise ConfigError(f"kv_transport must be one of {', '.join(KINDS)}, got {self.kv_transport!r}")
        if not self.engine_hang_timeout > 0:
            raise ConfigError(f"engine_hang_timeout must be > 0 seconds, got {self.engine_hang_timeout!r}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        self.cache_config, self.scheduler_config, self.device_config  # noqa: B018 - their checks raise now

    @property
    def device_config(self) -> DeviceConfig:
        return DeviceConfig(device=self.device, compile=self.compile, quantization=self.quantization)

    @property
    def cache_config(self) -> CacheConfig:
        return CacheConfig(block_size=self.block_size, num_blocks=self.num_kv_blocks,
                           memory_bytes=self.kv_cache_memory_bytes, kv_cache_dtype=self.kv_cache_dtype)

    @property
    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                               max_prefill_chunk=min(self.max_prefill_chunk, self.max_num_batched_tokens),
                               max_prefill_tokens_while_decoding=self.max_prefill_tokens_while_decoding,
                               prompt_deadline_factor=self.prompt_deadline_factor)
