"""Frozen configuration, validated once at construction.

Values chosen by the user or read from a checkpoint live here and never change. Values
discovered while starting up (how many KV blocks fit, which ids end a sequence) live in
`RuntimeInfo`, built after the model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


# Architectures the runtime implements, by the name HF `config.json` gives them.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "default", "linear" or "llama3"."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("default", "linear", "llama3"):
            raise ConfigError(
                f"rope_scaling type {self.kind!r} is not supported; "
                "supported: default, linear, llama3"
            )
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, and Llama checkpoints with attention_bias
    o_bias: bool = False  # Llama checkpoints with attention_bias
    mlp_bias: bool = False
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def with_dtype(self, dtype: torch.dtype) -> ModelConfig:
        return dataclasses.replace(self, dtype=dtype)


KV_CACHE_DTYPES = ("auto", "int8", "fp8")  # see CacheConfig.kv_cache_dtype


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. `num_blocks=None` sizes the pool from `memory_bytes`.

    kv_cache_dtype: how the pool stores K/V. "auto": in `dtype` (the model's when None),
    as computed; "int8" or "fp8" (float8_e4m3fn): quantized, one float16 scale per token
    and kv-head beside the values (kernels/kv_quant.py), about 3.9x the tokens of float32
    in the same memory; attention dequantizes as it reads.
    """

    block_size: int = 16
    num_blocks: int | None = None
    memory_bytes: int = 512 * 1024**2
    dtype: torch.dtype | None = None  # None: the model's dtype
    kv_cache_dtype: str = "auto"
    # A draft model's KV pool of as many blocks shares `memory_bytes` with this one; its
    # block takes this fraction of one of ours (0: no draft pool).
    draft_kv_share: float = 0.0

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ConfigError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.memory_bytes <= 0:
            raise ConfigError(f"memory_bytes must be positive, got {self.memory_bytes}")
        if not 0.0 <= self.draft_kv_share < float("inf"):
            raise ConfigError(f"draft_kv_share must be >= 0, got {self.draft_kv_share}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "fp8" and not hasattr(torch, "float8_e4m3fn"):
            raise ConfigError(f"kv_cache_dtype 'fp8' needs torch.float8_e4m3fn, which this torch "
                              f"({torch.__version__}) lacks; use int8 or upgrade torch")
        if self.kv_cache_dtype != "auto" and self.dtype is not None and self.dtype != self.storage_dtype(self.dtype):
            raise ConfigError(f"give either a KV cache dtype ({self.kv_cache_dtype}) or a pool dtype "
                              f"({self.dtype}), not both")

    def storage_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the pool holds K/V in for a model computing in `model_dtype`."""
        if self.kv_cache_dtype == "int8":
            return torch.int8
        if self.kv_cache_dtype == "fp8":
            return torch.float8_e4m3fn
        return self.dtype or model_dtype


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits: how many sequences run and how many tokens one forward computes."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int = 512
    # Prompt tokens (all prefill chunks together) in a step that also decodes; None: no
    # limit but the above. Bounds the inter-token latency that a prompt prefilled beside
    # running requests adds to them (a disaggregated decode worker's local prefills).
    max_prefill_tokens_while_decoding: int | None = None
    # The order in which prompts get compute (`BatchScheduler`): 0 is first come, first
    # served; K > 0 serves the earliest due first, a prompt of L tokens falling due once
    # the worker has computed K x L prompt tokens since it arrived (shorter prompts overtake
    # longer ones, never by more than that), `max_prefill_chunk` prompt tokens per step in all.
    prompt_deadline_factor: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.prompt_deadline_factor, (int, float)) and 0 <= self.prompt_deadline_factor < math.inf):
            raise ConfigError(f"scheduler config prompt_deadline_factor must be a number >= 0, "
                              f"got {self.prompt_deadline_factor!r}")
        names = ["max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk"]
        if self.max_prefill_tokens_while_decoding is not None:
            names.append("max_prefill_tokens_while_decoding")
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"scheduler config {name} must be a positive integer, got {value!r}")
        if self.max_prefill_chunk > self.max_num_batched_tokens:
            raise ConfigError(
                f"max_prefill_chunk ({self.max_prefill_chunk}) cannot exceed "
                f"max_num_batched_tokens ({self.max_num_batched_tokens})"
            )


SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding on a decode worker (`pdserve.engine.speculation`)."""

    method: str = "ngram"
    num_tokens: int = 3  # k: the most draft tokens per request and step
    max_batch_size: int = 8  # speculate only while at most this many requests decode
    rest_steps: int = 16  # steps a request with k = 0 waits before trying again
    ngram_min: int = 2  # n-gram proposer: the shortest suffix it matches
    ngram_max: int = 4  # ... and the longest, tried first
    draft_model: str | None = None  # draft method: a checkpoint (HF directory or .gguf) ...
    draft_layers: int | None = None  # ... or a self-draft of the target's first N layers

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ConfigError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}")
        if not 1 <= self.num_tokens <= 16:
            raise ConfigError(f"num_speculative_tokens must be in [1, 16], got {self.num_tokens}")
        if self.max_batch_size < 1 or self.rest_steps < 1:
            raise ConfigError("max_batch_size and rest_steps must be >= 1")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        has_model, has_layers = self.draft_model is not None, self.draft_layers is not None
        if self.method == "draft" and has_model == has_layers:
            raise ConfigError("speculative method 'draft' needs exactly one draft source: a draft model "
                              "(--draft-model M) or the target's first N layers (--draft-layers N)")
        if self.method != "draft" and (has_model or has_layers):
            raise ConfigError(f"a draft model or draft layers need speculative method 'draft', not {self.method!r}")
        if has_layers and self.draft_layers < 1:
            raise ConfigError(f"draft_layers must be >= 1, got {self.draft_layers}")


QUANTIZATIONS = ("auto", "none", "gguf", "q4", "int8", "fp8")  # see DeviceConfig.quantization


@dataclass(frozen=True)
class DeviceConfig:
    """Where the model runs and with which kernels.

    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda[:N]".
    dtype: None picks bfloat16 on CUDA and float32 on the CPU.
    kernels: "auto" (Triton on CUDA; on the CPU the compiled batch attention, or the
        PyTorch references where it cannot be built), "cpu", "triton" or "reference";
        forcing "triton" on the CPU needs TRITON_INTERPRET=1 (tests only).
    cuda_graphs: capture decode steps in CUDA graphs for fixed batch-size buckets.
    compile: on the CPU, compile each decoder layer with torch.compile (inductor's C++
        code for everything around the matmuls and attention) at start-up. Off by default:
        on the 2-core machine it measured slower in serving (dynamo's per-call cost on 60
        calls a step outweighs the fused norms and RoPE). CUDA replays graphs instead and
        ignores it.
    quantization: how the weights of linear layers (and the embedding) are held, on the
        CPU in float32 arithmetic (the blocks are pdserve.kernels.block_linear's):
        "auto"  a GGUF checkpoint's Q4_0/Q4_1/Q8_0 blocks for batches of up to
                BLOCK_LINEAR_MAX_ROWS rows (bit-identical weights, 4-6x fewer bytes
                streamed per decode step), the dense float32 copy for larger ones (the
                fastest prefill, the most memory); dense only for other checkpoints;
        "none"  the dense float32 weights only;
        "gguf"  the GGUF file's own blocks for every batch and no dense copy of what they
                hold (the least memory; "q4" is the same); an error for a checkpoint with
                no Q4_0/Q4_1/Q8_0 blocks;
        "int8"  every weight quantized at load to Q8_0 blocks (int8, one float16 scale
                per 32 weights of a row) from the dense weights of any checkpoint; no
                dense copy.
        "fp8"   every weight quantized at load to F8_0 blocks (float8_e4m3fn, one float16
                scale per 32 weights of a row); CUDA only.
        Either way a row's result never depends on the other rows of its batch (no
        per-batch scales). On CUDA "auto" and "none" are dense; gguf/q4, int8 and fp8 keep
        the linear layers as blocks only, computed by the Triton kernel (W4A16, W8A16, FP8
        weights), with the embedding dense.
    """

    device: str = "auto"
    dtype: torch.dtype | None = None
    kernels: str = "auto"
    cuda_graphs: bool = True
    compile: bool = False
    quantization: str = "auto"

    def __post_init__(self) -> None:
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.kernels not in ("auto", "cpu", "triton", "reference"):
            raise ConfigError(f"kernels must be auto, cpu, triton or reference, got {self.kernels!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")

    @property
    def blocks_only(self) -> bool:
        """Whether quantized layers keep no dense copy (every mode but auto and none)."""
        return self.quantization not in ("auto", "none")


@dataclass(frozen=True)
class RuntimeInfo:
    """Values discovered at start-up, after the model and pool exist."""

    num_blocks: int
    block_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    device: torch.device
