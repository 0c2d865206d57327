"""Tokenizer and IncrementalDetokenizer against transformers' tokenizers."""

from __future__ import annotations

import json
import shutil

import jinja2
import pytest
from gguf import GGUFReader
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from pdserve.runtime.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345 and 3.14",
    "I'm sure they'll say it's fine; we've done it.",
    "héllo 世界 🙂",
    "emoji 👩‍👩‍👧 flags 🇫🇷 and a rare one 𓀀",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\n\n\n  indented",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "E=mc² ½ ²³, Arabic ٣٤٥, Roman Ⅻ",
    "",
]
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 日本"},
]


def _pieces(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    return [detok.push(i) for i in ids] + [detok.flush()]


# ----------------------------------------------------------------------------- SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFReader(smollm2_gguf_path))


@pytest.fixture(scope="module")
def transformers_gguf_tok(smollm2_gguf_path):
    return AutoTokenizer.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name)


@pytest.fixture(scope="module")
def smollm2_reference(transformers_gguf_tok) -> Backend:
    """transformers' GGUF tokenizer with SmolLM2's real pre-tokenizer.

    transformers builds the `smollm` GGUF tokenizer with plain GPT-2 splitting and omits the
    `Digits(individual_digits=True)` step of SmolLM2's tokenizer.json (llama.cpp's `smollm`
    pre-tokenizer does split digits). ASCII digits come out the same either way, because the
    vocabulary has no multi-digit tokens, but other numerals differ: "²³" is one chunk for
    transformers and two for SmolLM2. The right behaviour is tokenizer.json's, so we put its
    pre-tokenizer into transformers' vocabulary, merges and special tokens.
    """
    backend = Backend.from_str(transformers_gguf_tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return backend


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_encode_matches_reference(text, smollm2_tok, smollm2_reference,
                                          transformers_gguf_tok):
    ours = smollm2_tok.encode(text)
    assert ours == smollm2_reference.encode(text, add_special_tokens=False).ids
    if not any(c.isnumeric() and not c.isascii() for c in text):  # see smollm2_reference
        assert ours == transformers_gguf_tok.encode(text, add_special_tokens=False)
    # SmolLM2 declares add_bos_token false: special tokens add nothing.
    assert smollm2_tok.encode(text, add_special_tokens=True) == ours


@pytest.mark.slow
def test_smollm2_special_tokens_and_digits(smollm2_tok):
    tok = smollm2_tok
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id) == (49152, 1, 2)
    assert tok.all_special_ids == list(range(17))  # the 17 CONTROL tokens
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    digits = [tok.encode(d)[0] for d in "0123456789"]
    assert tok.encode("9876543210") == digits[::-1]
    assert tok.encode("x²³") == tok.encode("x²") + tok.encode("³")


@pytest.mark.slow
def test_smollm2_decode_matches_transformers(smollm2_tok, transformers_gguf_tok):
    for text in TEXTS:
        ids = smollm2_tok.encode(text)
        for skip in (True, False):
            expected = transformers_gguf_tok.decode(ids, skip_special_tokens=skip)
            assert smollm2_tok.decode(ids, skip_special_tokens=skip) == expected
        if "<|im_" not in text:
            assert smollm2_tok.decode(ids) == text


@pytest.mark.slow
@pytest.mark.parametrize("messages", [CONVERSATION, [{"role": "system", "content": "Be brief."},
                                                    *CONVERSATION]])
def test_smollm2_chat_template_matches_transformers(messages, smollm2_tok, transformers_gguf_tok):
    expected = transformers_gguf_tok.apply_chat_template(messages, tokenize=False,
                                                         add_generation_prompt=True)
    assert smollm2_tok.apply_chat_template(messages) == expected
    assert expected.endswith("<|im_start|>assistant\n")
    ids = transformers_gguf_tok.apply_chat_template(messages, tokenize=True,
                                                    add_generation_prompt=True)
    assert smollm2_tok.encode_chat(messages) == ids["input_ids"]
    without = transformers_gguf_tok.apply_chat_template(messages, tokenize=False)
    assert smollm2_tok.apply_chat_template(messages, add_generation_prompt=False) == without


@pytest.mark.slow
def test_smollm2_incremental_detokenizer(smollm2_tok):
    for text in TEXTS:
        ids = smollm2_tok.encode(text)
        pieces = _pieces(smollm2_tok, ids)
        assert "".join(pieces) == smollm2_tok.decode(ids)
        assert pieces[-1] == ""  # nothing held back at the end
        assert not any("\ufffd" in p for p in pieces)


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_smollm2_incremental_detokenizer_property(smollm2_tok, text):
    ids = smollm2_tok.encode(text)
    pieces = _pieces(smollm2_tok, ids)
    assert "".join(pieces) == smollm2_tok.decode(ids)


# ----------------------------------------------------------------------------- HF dirs


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_qwen2_dir"])
def tiny_dir(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama_dir) -> Tokenizer:
    return Tokenizer.from_hf_dir(tiny_llama_dir)


def test_hf_dir_tokenizer_matches_transformers(tiny_dir):
    ours, theirs = Tokenizer.from_hf_dir(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        if "<|im_" not in text:
            assert ours.decode(ids) == text  # all test texts are NFC, so Qwen2's NFC is a no-op
    assert ours.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert ours.all_special_ids == [0, 1, 2] and ours.vocab_size == len(theirs)
    assert ours.eos_token_id == theirs.eos_token_id == 2
    assert ours.bos_token_id == theirs.bos_token_id
    expected = theirs.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CONVERSATION) == expected


def test_hf_dir_add_bos_and_chat_template_file(tiny_llama_dir, tmp_path):
    path = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    config = json.loads((path / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    config["add_bos_token"] = True
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").write_text("{{ bos_token }}" + template)
    tok = Tokenizer.from_hf_dir(path)
    assert tok.encode("hi", add_special_tokens=True) == [1, *tok.encode("hi")]
    rendered = tok.apply_chat_template(CONVERSATION[:1])
    assert rendered == "<|im_start|><|im_start|>user\nWhat is the capital of France?<|im_end|>\n" \
                       "<|im_start|>assistant\n"
    # The template wrote BOS itself, so encode_chat does not add another one.
    assert tok.encode_chat(CONVERSATION[:1]) == tok.encode(rendered)


def test_missing_tokenizer_json_says_what_to_do(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_template_errors_and_tojson(tiny_tok):
    backend = Backend.from_str(tiny_tok._backend.to_str())
    no_template = Tokenizer(backend, bos_token_id=None, eos_token_id=2)
    with pytest.raises(TokenizerError, match="no chat template"):
        no_template.apply_chat_template(CONVERSATION)
    strict = Tokenizer(backend, bos_token_id=None, eos_token_id=2, chat_template=(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
        "{{ messages | tojson }}{{ eos_token }}"))
    with pytest.raises(jinja2.TemplateError, match="system first"):
        strict.apply_chat_template(CONVERSATION)
    # transformers' tojson: no HTML escaping, non-ASCII kept.
    msgs = [{"role": "system", "content": "<b>&'日本"}]
    expected = '[{"role": "system", "content": "<b>&\'日本"}]<|im_end|>'
    assert strict.apply_chat_template(msgs) == expected


# ----------------------------------------------------------------------------- detokenizer


def test_detokenizer_holds_back_split_characters(tiny_tok):
    ids = tiny_tok.encode("😀")  # not in the training corpus: its 4 bytes span 3 tokens
    assert len(ids) == 3
    assert _pieces(tiny_tok, ids) == ["", "", "😀", ""]
    ids = tiny_tok.encode("a世b")
    assert "".join(_pieces(tiny_tok, ids)) == "a世b"


def test_detokenizer_special_tokens(tiny_tok):
    ids = tiny_tok.encode("<|im_start|>hi 世界<|im_end|>")
    assert "".join(_pieces(tiny_tok, ids)) == "hi 世界"
    assert "".join(_pieces(tiny_tok, ids, skip_special_tokens=False)) == \
        "<|im_start|>hi 世界<|im_end|>"


def test_detokenizer_decodes_a_bounded_window(tiny_tok):
    longest = 0

    class Recording(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):
            nonlocal longest
            longest = max(longest, len(ids))
            return super().decode(ids, skip_special_tokens)

    tok = Recording(tiny_tok._backend, bos_token_id=None, eos_token_id=2)
    text = " ".join(TEXTS) * 4
    ids = tok.encode(text)
    assert len(ids) > 500
    assert "".join(_pieces(tok, ids)) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert longest <= 8  # at most a 4-byte character's tokens plus the previous step's


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=30))
def test_detokenizer_property_on_text(tiny_tok, text):
    ids = tiny_tok.encode(text)
    pieces = _pieces(tiny_tok, ids)
    full = tiny_tok.decode(ids)
    assert "".join(pieces) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces)
        assert pieces[-1] == ""  # the pushes alone already equal the full decode


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 319), max_size=30))
def test_detokenizer_property_on_arbitrary_ids(tiny_tok, ids):
    # Random ids make invalid UTF-8 too; held-back text then comes out in flush().
    for skip in (True, False):
        pieces = _pieces(tiny_tok, ids, skip)
        assert "".join(pieces) == tiny_tok.decode(ids, skip)
        assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # pushes never end mid-character
