"""Which kernels a model runs: attention backends and the kernel set chosen per runner.

An attention backend is a strategy object that stores a layer's new K/V and attends over
the paged pool; `Kernels` bundles it with the RMSNorm, RoPE and gated-activation
functions of the same family. Layers call them and know nothing of either family. The
runner picks the family once from its `DeviceConfig` (`select_kernels`): on the CPU in
float32 the C++ kernels (kernels/cpu_attention.py, kernels/cpu_layer_ops.py), or the
PyTorch references where they cannot be built; the Triton kernels on CUDA; or any family
forced (Triton on the CPU needs TRITON_INTERPRET=1). Only the Triton family imports Triton
(~70 MiB of a process's memory), when it is chosen.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch

from pdserve.kernels.activation import silu_mul_ref
from pdserve.kernels.attention import paged_attention_ref
from pdserve.kernels.cpu_attention import paged_attention_cpu
from pdserve.kernels.cpu_extension import cpu_kernels_available
from pdserve.kernels.cpu_layer_ops import rms_norm_cpu, rope_cpu, silu_mul_cpu, store_kv_cpu
from pdserve.kernels.kv_store import store_kv_ref
from pdserve.kernels.rmsnorm import rms_norm_ref
from pdserve.kernels.rope import rope_ref
from pdserve.runtime.config import ConfigError
from pdserve.runtime.forward_batch import ForwardBatch
from pdserve.runtime.kv_pool import LayerCache


class AttentionBackend(Protocol):
    name: str

    def prepare(self, batch: ForwardBatch) -> None:
        """Build per-batch metadata; the model calls it once per forward, before the first
        layer (so inside a captured CUDA graph too). Must not synchronise with the device."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                batch: ForwardBatch, scale: float) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D]. Writes k/v into the cache slots of `batch`
        (quantized, with their scales, when the pool is), then returns attention output
        [T, H, D]. `batch` is the one last prepared."""


class ReferenceAttention:
    """PyTorch reference kernels; correct on any device, fast on none."""

    name = "reference"

    def prepare(self, batch: ForwardBatch) -> None:
        """Nothing to prepare: the reference reads the batch's host-side lengths."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerCache,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        """See `AttentionBackend.forward`."""
        store_kv_ref(k, v, cache.k, cache.v, batch.slot_mapping, cache.k_scale, cache.v_scale)
        return paged_attention_ref(q, cache.k, cache.v, batch.block_tables, batch.query_lens, batch.seq_lens,
                                   scale, cache.k_scale, cache.v_scale)


class CpuAttention:
    """Every sequence of the batch in one compiled call per layer (kernels/cpu_attention.py):
    decode rows straight from the pages, longer chunks through ATen's SDPA. CPU, float32.
    Holds the prepared lengths: one instance per model."""

    name = "cpu"

    def __init__(self) -> None:
        self._batch: ForwardBatch | None = None
        self._lengths: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepare(self, batch: ForwardBatch) -> None:
        """See `AttentionBackend.prepare`: the lengths as int64 tensors, once per forward."""
        starts = [0, *itertools.accumulate(batch.query_lens)]
        self._lengths = (torch.tensor(starts, dtype=torch.int64), torch.tensor(batch.seq_lens, dtype=torch.int64))
        self._batch = batch

    def lengths(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(query_start [B + 1], seq_lens [B]) int64 of `batch`, the one last prepared."""
        assert batch is self._batch, "prepare(batch) must run before the layers"
        return self._lengths

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerCache,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        """See `AttentionBackend.forward`."""
        assert batch is self._batch, "prepare(batch) must run before the layers"
        store_kv_cpu(k, v, cache.k, cache.v, batch.slot_mapping, cache.k_scale, cache.v_scale)
        query_start, seq_lens = self._lengths
        return paged_attention_cpu(q.contiguous(), cache.k, cache.v, batch.block_tables, query_start,
                                   seq_lens, scale, cache.k_scale, cache.v_scale)


class _DecodeMetadata(NamedTuple):
    seq_lens: torch.Tensor  # [B] context lengths, positions + 1, computed on the device


class _ExtendMetadata(NamedTuple):
    query_start: torch.Tensor  # [B + 1] int32 offsets of each sequence's queries
    seq_lens: torch.Tensor  # [B] int32
    max_query_len: int


class TritonAttention:
    """Triton kernels. A batch where every sequence adds one token runs the split decode
    kernel; any other batch (prefill chunks, possibly mixed with decodes) runs the extend
    kernel, which treats a decoding sequence as a one-token extend.

    The decode path reads nothing from the host: context lengths are `positions + 1`,
    computed on the device by `prepare`, so a decode step can be captured in a CUDA graph
    and replayed with new inputs. Holds the prepared metadata: one instance per model.
    """

    name = "triton"

    def __init__(self) -> None:
        from pdserve.kernels.decode_attention import decode_attention
        from pdserve.kernels.extend_attention import extend_attention
        from pdserve.kernels.kv_store_triton import store_kv

        self._store_kv, self._decode, self._extend = store_kv, decode_attention, extend_attention
        self._batch: ForwardBatch | None = None
        self._metadata: _DecodeMetadata | _ExtendMetadata | None = None

    def prepare(self, batch: ForwardBatch) -> None:
        """See `AttentionBackend.prepare`. Decode: one device op; extend: two small host to
        device copies of the lengths."""
        if batch.num_tokens == batch.num_seqs:
            # The one new token of each sequence is its last position.
            self._metadata = _DecodeMetadata(batch.positions + 1)
        else:
            device = batch.input_ids.device
            starts = [0, *itertools.accumulate(batch.query_lens)]
            self._metadata = _ExtendMetadata(
                torch.tensor(starts, dtype=torch.int32, device=device),
                torch.tensor(batch.seq_lens, dtype=torch.int32, device=device),
                max(batch.query_lens),
            )
        self._batch = batch

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerCache,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        """See `AttentionBackend.forward`."""
        assert batch is self._batch, "prepare(batch) must run before the layers"
        self._store_kv(k, v, cache.k, cache.v, batch.slot_mapping, cache.k_scale, cache.v_scale)
        meta = self._metadata
        if isinstance(meta, _DecodeMetadata):
            return self._decode(q, cache.k, cache.v, batch.block_tables, meta.seq_lens, scale,
                                    k_scale=cache.k_scale, v_scale=cache.v_scale)
        return self._extend(q, cache.k, cache.v, batch.block_tables, meta.query_start,
                                meta.seq_lens, meta.max_query_len, scale,
                                k_scale=cache.k_scale, v_scale=cache.v_scale)


class Kernels(NamedTuple):
    """One family of kernels, used by every layer of a model."""

    name: str
    attention: AttentionBackend
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # rms_norm_ref's contract
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # rope_ref's contract
    silu_mul: Callable[[torch.Tensor], torch.Tensor]  # silu_mul_ref's contract


def reference_kernels() -> Kernels:
    return Kernels("reference", ReferenceAttention(), rms_norm_ref, rope_ref, silu_mul_ref)


def cpu_kernels(compiled: bool = False) -> Kernels:
    """The C++ CPU kernels. Compiled layers keep the references for the small ops, which
    inductor fuses itself and cannot trace through the extension's calls."""
    if compiled:
        return Kernels("cpu", CpuAttention(), rms_norm_ref, rope_ref, silu_mul_ref)
    return Kernels("cpu", CpuAttention(), rms_norm_cpu, rope_cpu, silu_mul_cpu)


def triton_kernels() -> Kernels:
    from pdserve.kernels.rmsnorm_triton import rms_norm
    from pdserve.kernels.rope_triton import rope

    return Kernels("triton", TritonAttention(), rms_norm, rope, silu_mul_ref)


def default_kernels(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The family "auto" means on `device`: Triton on CUDA; on the CPU the C++ kernels
    (float32) where they build, else the references."""
    if device.type == "cuda":
        return "triton"
    return "cpu" if dtype == torch.float32 and cpu_kernels_available() else "reference"


def select_kernels(kernels: str, device: torch.device, dtype: torch.dtype = torch.float32,
                   compiled: bool = False) -> Kernels:
    """The kernel family for `DeviceConfig.kernels` ("auto", "cpu", "triton" or "reference")
    on `device` for a model in `dtype` (`compiled`: its layers run under torch.compile):
    auto means Triton on CUDA, and on the CPU the C++ kernels where they build and the
    model is float32 (else the references). Raises ConfigError when the choice cannot run
    there."""
    if kernels == "auto":
        kernels = default_kernels(device, dtype)
    if kernels == "reference":
        return reference_kernels()
    if kernels == "cpu":
        if device.type != "cpu" or dtype != torch.float32:
            raise ConfigError(f"kernels='cpu' runs float32 models on the CPU only, not {dtype} on {device}")
        if not cpu_kernels_available():
            raise ConfigError("kernels='cpu' needs the C++ CPU kernels, which could not be "
                              "built here (see the log); use kernels='reference'")
        return cpu_kernels(compiled)
    if kernels != "triton":
        raise ConfigError(f"kernels must be auto, cpu, triton or reference, got {kernels!r}")
    from pdserve.kernels.triton_utils import INTERPRETED

    if device.type == "cuda" and INTERPRETED:
        raise ConfigError("Triton kernels were imported with TRITON_INTERPRET=1, which runs "
                          "them on the CPU only; unset it to use them on CUDA")
    if device.type != "cuda" and not INTERPRETED:
        raise ConfigError(f"Triton kernels on {device} need TRITON_INTERPRET=1 set before "
                          "triton is imported (tests only); use kernels='cpu' or 'reference' on the CPU")
    return triton_kernels()
