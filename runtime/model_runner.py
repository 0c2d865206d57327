"""The model runner: one forward pass over a `ForwardBatch`, returning logits.

It owns the model weights and reads the KV pool through the model's attention layers;
block allocation belongs to the scheduler, so the runner never allocates or frees.
Where the model runs (device, dtype, kernels, CUDA graphs) is fixed at creation from a
`DeviceConfig`.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pdserve.kernels.cpu_extension import cpu_kernels_available
from pdserve.runtime.attention_backend import default_kernels, select_kernels
from pdserve.runtime.compiled_layers import compile_layers
from pdserve.runtime.config import CacheConfig, ConfigError, DeviceConfig, ModelConfig
from pdserve.runtime.forward_batch import ForwardBatch
from pdserve.runtime.kv_pool import KVPool
from pdserve.runtime.models import MODEL_CLASSES
from pdserve.runtime.progress import Progress
from pdserve.runtime.weights.quantize import quantizable, quantize_blocks

log = logging.getLogger(__name__)

# Batch sizes with a captured decode graph; larger decode batches run eagerly.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)


@dataclass(frozen=True)
class Placement:
    """A `DeviceConfig` resolved on this machine: no "auto" and no None left."""

    device: torch.device
    dtype: torch.dtype
    kernels: str  # "triton", "cpu" or "reference"
    cuda_graphs: bool  # only with Triton kernels on CUDA: the references read host data
    compiled: bool  # decoder layers under torch.compile: CPU only, around torch-op kernels

    @classmethod
    def resolve(cls, config: DeviceConfig) -> Placement:
        if config.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(config.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError(f"device {config.device!r} was asked for but CUDA is not "
                                  "available; use device='cpu' or 'auto'")
        on_cuda = device.type == "cuda"
        dtype = config.dtype or (torch.bfloat16 if on_cuda else torch.float32)
        kernels = config.kernels if config.kernels != "auto" else default_kernels(device, dtype)
        return cls(device, dtype, kernels, config.cuda_graphs and on_cuda and kernels == "triton",
                   config.compile and not on_cuda and kernels != "triton")


def _load_cpu_weights(model, quantization: str, weights: Iterable[tuple[str, torch.Tensor]],
                      weight_blocks: Iterable[tuple[str, str, torch.Tensor]], blocks_computable: bool) -> None:
    """Fill a CPU model's dense weights and blocks as `quantization` says (see DeviceConfig);
    `blocks_computable`: float32 with the CPU kernels built.

    gguf/q4 read the blocks first and drop the dense parameters they stand for before any
    is written, then read only the remaining tensors (norms, biases, matrices in formats
    without blocks): the float32 copy of a blocked weight is never made, so neither the
    process's peak nor its final memory holds it (`WeightStream.skipping`; a plain iterable
    of weights is read in full and the unused tensors thrown away). int8 quantizes each
    matrix as it is read (`load_weights_quantized`): one checkpoint tensor in float32 at a
    time, never the whole dense model. Every mode ends by handing freed heap back to the OS."""
    if quantization == "fp8":
        raise ConfigError("quantization 'fp8' (FP8 weights) runs on CUDA, in Triton; on the CPU use int8 or gguf")
    if quantization not in ("none", "auto") and not blocks_computable:
        raise ConfigError(f"quantization {quantization!r} needs the CPU kernels (a C++ compiler) and float32")
    if quantization in ("gguf", "q4"):
        if not model.load_blocks(weight_blocks):
            raise ConfigError(f"quantization {quantization!r}: this checkpoint has no GGUF blocks the CPU "
                              f"kernels compute from (Q4_0, Q4_1 or Q8_0); use int8 or none")
        held = model.drop_dense_weights()
        skipping = getattr(weights, "skipping", None)
        weights = skipping(held) if skipping else ((n, t) for n, t in weights if n not in held)
    elif quantization == "auto" and blocks_computable:
        model.load_blocks(weight_blocks)
    if quantization == "int8":
        if not model.load_weights_quantized(weights, "q8_0", quantize_blocks, quantizable):
            raise ConfigError("quantization 'int8': no weight of this model splits into blocks of 32; use none")
    else:
        model.load_weights(weights)
    model.store_weights_input_major()
    _release_freed_memory()


GPU_BLOCK_KINDS = {"int8": "q8_0", "fp8": "f8_0"}  # quantization -> the blocks made at load on CUDA


def load_gpu_weights(model, quantization: str, weights: Iterable[tuple[str, torch.Tensor]],
                     weight_blocks: Iterable[tuple[str, str, torch.Tensor]], device: torch.device) -> None:
    """Fill a CUDA model's weights as `quantization` says (a mode that keeps no dense copy):
    every linear layer and the LM head as blocks that the Triton kernel computes from
    (`block_linear_triton`: the dequantization inside the matmul loop), on `device`.
    gguf/q4 take the file's own Q4_0/Q4_1/Q8_0 blocks (W4A16 / W8A16); int8 makes Q8_0 blocks
    (W8A16) and fp8 F8_0 blocks (FP8 weights, one float16 scale per 32) from the dense
    weights. The embedding stays dense (a lookup reads one row per token)."""
    model.load_weights(weights)
    if quantization in ("gguf", "q4"):
        if not model.load_blocks(weight_blocks):
            raise ConfigError(f"quantization {quantization!r}: this checkpoint has no GGUF blocks the kernels "
                              f"compute from (Q4_0, Q4_1 or Q8_0); use int8, fp8 or none")
    else:
        kind = GPU_BLOCK_KINDS[quantization]
        if not model.quantize_weights(kind, lambda w: quantize_blocks(w, kind), quantizable):
            raise ConfigError(f"quantization {quantization!r}: no weight of this model splits into blocks of 32")
    model.embed_blocks = None  # the embedding keeps its dense rows (the LM head may still use blocks)
    model.drop_dense_weights()
    model.blocks_to(device)


def _release_freed_memory() -> None:
    """Hand the heap pages freed with the dense weights back to the OS: glibc keeps them
    otherwise (measured with SmolLM2 in gguf mode: 284 of its 513 MiB stayed resident).
    A no-op where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: KVPool, graphs: DecodeGraphRunner | None = None,
                 placement: Placement | None = None) -> None:
        self.model = model
        self.pool = pool
        self.graphs = graphs
        self.placement = placement or Placement(pool.kv.device, pool.dtype, model.kernels.name, False, False)

    @classmethod
    def create(
        cls,
        config: ModelConfig,
        weights: Iterable[tuple[str, torch.Tensor]],
        cache: CacheConfig,
        device: torch.device | str = "cpu",
        device_config: DeviceConfig | None = None,
        weight_blocks: Iterable[tuple[str, str, torch.Tensor]] = (),
    ) -> ModelRunner:
        """Build the model on its device, load `weights`, allocate the KV pool and, on CUDA
        with Triton kernels, capture the decode graphs.

        Without `device_config` the model runs on `device` in `config.dtype` with the
        default kernels there (references on the CPU). With one, `device` must be left at
        its default and the config's device and dtype win. `weight_blocks` (a checkpoint's
        `iter_weight_blocks()`) are used on the CPU in float32 when the device config allows
        and the CPU kernels are built."""
        if device_config is None:
            device_config = DeviceConfig(device=str(device), dtype=config.dtype)
        elif str(device) != "cpu":
            raise ConfigError("pass the device inside device_config, not beside it")
        placement = Placement.resolve(device_config)
        if placement.device.type == "cuda" and placement.device.index is not None:
            # Triton launches and graph captures use the current device.
            torch.cuda.set_device(placement.device)
        started = time.perf_counter()
        config = config.with_dtype(placement.dtype)
        kernels = select_kernels(placement.kernels, placement.device, placement.dtype, placement.compiled)
        with torch.device(placement.device):
            model = MODEL_CLASSES[config.architecture](config, kernels)
        model.eval()
        if placement.device.type == "cpu":
            _load_cpu_weights(model, device_config.quantization, weights, weight_blocks,
                              placement.dtype == torch.float32 and placement.kernels != "triton"
                              and cpu_kernels_available())
            if kernels.name == "cpu" and not placement.compiled:
                model.fuse_layers()  # last: it holds the weights and blocks as they are now
        elif device_config.blocks_only:
            load_gpu_weights(model, device_config.quantization, weights, weight_blocks, placement.device)
        else:
            model.load_weights(weights)
        pool = KVPool.for_model(config, cache, placement.device)
        graphs = None
        if placement.cuda_graphs:
            max_pages = min(pool.num_blocks, -(-config.max_position_embeddings // pool.block_size))
            graphs = DecodeGraphRunner(model, pool, max_pages)
        runner = cls(model, pool, graphs, placement)
        log.info("loaded %s (%d layers) on %s in %.1fs: %s; KV pool %d blocks x %d tokens",
                 config.architecture, config.num_layers, placement.device, time.perf_counter() - started,
                 runner.describe(), pool.num_blocks, pool.block_size)
        if placement.compiled:
            log.info("compiling the decoder layers (torch.compile; minutes on a small machine) ...")
            compiling = time.perf_counter()
            compile_layers(runner)
            log.info("compiled the decoder layers in %.1fs", time.perf_counter() - compiling)
        return runner

    def describe(self) -> str:
        """How the forward runs, for logs and benchmarks: dtype, kernels, compilation."""
        parts = [str(self.placement.dtype).removeprefix("torch."), f"{self.model.kernels.name} kernels"]
        if self.graphs is not None:
            parts.append("CUDA graphs")
        if self.placement.compiled:
            parts.append("compiled layers")
        blocks = sorted({m.blocks.kind for m in self.model.modules() if getattr(m, "blocks", None)}
                        | ({self.model.head_blocks.kind} if getattr(self.model, "head_blocks", None) else set()))
        if blocks:
            dense = any(m.weight is not None for m in self.model.modules() if getattr(m, "block_kind", None))
            parts.append(f"{'small batches' if dense else 'every batch'} from GGUF blocks ({', '.join(blocks)})")
        return ", ".join(parts)

    def weight_bytes(self) -> int:
        """Bytes of every weight the model holds (dense tensors and blocks, each once)."""
        tensors = {t.data_ptr(): t.numel() * t.element_size() for t in self.model.parameters()}
        for module in self.model.modules():
            for blocks in (getattr(module, "blocks", None), getattr(module, "head_blocks", None),
                           getattr(module, "embed_blocks", None)):
                if blocks is not None:
                    tensors[blocks.data.data_ptr()] = blocks.data.numel()
        return sum(tensors.values())

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.pool.kv.device

    @torch.inference_mode()
    def execute(self, batch: ForwardBatch, on_layer_done=None) -> torch.Tensor:
        """Run one forward; return float32 logits [len(batch.sample_indices), vocab].

        Writes the K/V of every token in the batch into its slot; reads nothing but the
        batch and the pool. `on_layer_done(i)` is called once layer i's K/V are stored.
        Decode batches that fit a captured graph replay it."""
        if on_layer_done is None and self.graphs is not None and self.graphs.fits(batch):
            return self.graphs.run(batch)
        hidden = self.model(batch, self.pool, on_layer_done)
        return self.model.compute_logits(hidden.index_select(0, batch.sample_indices))


class DecodeGraphRunner:
    """Decode steps replayed from CUDA graphs, one graph per batch size in GRAPH_BATCH_SIZES.

    A decode batch (one new token per sequence) of B sequences runs in the graph of the
    smallest captured size b >= B. Its inputs are copied into static buffers:

        rows     0 ........ B-1 | B ........ b-1
                 the batch      | padding: token 0 at position 0 (context 1, reading
                                | block 0, which always exists), slot -1 (stores nothing)

    Each graph computes the logits of all b rows into its own static output; `run` returns
    the sampled rows. Graphs need kernels that never read host data nor synchronise (the
    Triton family: context lengths come from positions on the device), so the host-side
    `query_lens` / `seq_lens` of the static batches are placeholders that nothing reads.
    Block tables are at most `max_pages` wide. CUDA only; never touched on the CPU.
    """

    def __init__(self, model: torch.nn.Module, pool: KVPool, max_pages: int) -> None:
        assert pool.kv.is_cuda and model.kernels.name == "triton"
        self.model, self.pool, self.max_pages = model, pool, max_pages
        size, device = GRAPH_BATCH_SIZES[-1], pool.kv.device
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(size, max_pages, dtype=torch.int64, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        mempool = torch.cuda.graph_pool_handle()
        started = time.perf_counter()
        progress = Progress("capturing decode CUDA graphs", len(GRAPH_BATCH_SIZES))
        with torch.inference_mode():
            # Largest first: smaller graphs then reuse its memory from the shared pool.
            for b in reversed(GRAPH_BATCH_SIZES):
                self.graphs[b] = self._capture(b, mempool)
                progress.advance()
        progress.finish()
        log.info("captured %d decode CUDA graphs in %.1fs", len(self.graphs),
                 time.perf_counter() - started)

    def _static_batch(self, b: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:b], positions=self.positions[:b],
            slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
            sample_indices=torch.arange(b, device=self.input_ids.device),
            query_lens=(1,) * b, seq_lens=(1,) * b,
        )

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model.compute_logits(self.model(batch, self.pool))

    def _capture(self, b: int, mempool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        batch = self._static_batch(b)
        # Warm up on a side stream (compiles the Triton kernels for these shapes); the
        # static slots are all -1, so neither warm-up nor capture writes the pool.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=mempool):
            logits = self._forward(batch)
        return graph, logits

    def fits(self, batch: ForwardBatch) -> bool:
        """Whether `run` can take this batch: a pure decode batch small and narrow enough."""
        return (batch.num_tokens == batch.num_seqs <= GRAPH_BATCH_SIZES[-1]
                and batch.block_tables.shape[1] <= self.max_pages)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Replay the graph for `batch` (which `fits`); same result as the eager forward
        up to float rounding (the decode kernel may split the context differently)."""
        n = batch.num_seqs
        b = next(size for size in GRAPH_BATCH_SIZES if size >= n)
        graph, logits = self.graphs[b]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        self.block_tables[:n, :batch.block_tables.shape[1]].copy_(batch.block_tables)
        self.input_ids[n:b].zero_()
        self.positions[n:b].zero_()
        self.slot_mapping[n:b].fill_(-1)
        self.block_tables[n:b, 0].zero_()
        graph.replay()
        # A copy: the next replay overwrites `logits`.
        return logits.index_select(0, batch.sample_indices)
