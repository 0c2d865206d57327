"""Reading checkpoints: HF directories (safetensors) and GGUF files, behind one `Checkpoint`."""

from pdserve.runtime.weights.checkpoint import Checkpoint, CheckpointError, load_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint"]
