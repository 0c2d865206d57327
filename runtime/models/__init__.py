"""Model definitions. Every supported architecture maps to one implementation here."""

from pdserve.runtime.models.llama import LlamaForCausalLM

# HF architecture name -> implementation. Qwen2 and Mistral are Llama with other flags.
MODEL_CLASSES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}

__all__ = ["MODEL_CLASSES", "LlamaForCausalLM"]
