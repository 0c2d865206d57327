"""The gateway's tokenization (`cluster/gateway/prompt_tokens.py`): its encode equals the
tokenizer's, and its lower bound on a text's token count never exceeds the real count
(Hypothesis, over the tokenizers pdserve serves and over pipelines built to stress each
part of the argument), while pipelines that may drop or fuse input get no bound."""

from __future__ import annotations

import json
import unicodedata
from fractions import Fraction

import hypothesis
import pytest
from gguf import GGUFReader
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from pdserve.cluster.gateway.prompt_tokens import (
    _NORMALIZER_SHRINK,
    PromptTokens,
    byte_level_alphabet,
    text_bound,
)
from pdserve.runtime.tokenizer import Tokenizer

# The frequent long word makes a long regular token: the bound's worst case is a run of
# the longest token, which look-alike characters can reach only through a regular one.
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world! héllo wörld, 世界 你好 🙂",
          "def add(a, b):\n    return a + b\n", "Numbers: 12345 and 3.14, KELVIN K, ΐ ﬀ 𝐀 가각",
          " supercalifragilistic" * 10] * 20
# Characters and pieces that stress the bound: dropped control characters, lead bytes that
# SmolLM2's vocabulary lacks (U+40000..), the largest shrinks of each normalizer (math
# letters, Greek with two accents, Hangul jamo, the Kelvin sign), special-token text and
# long runs that merge into long tokens.
PIECES = ["\x04", "\x1d", "\x00", "é", "e\u0301", "ΐ", "\u03b9\u0308\u0301", "\U0001D400", "ﬀ", "K", "İ",
          "\u1100\u1161\u11a8", "가", "\uff21", "世界", "🙂", "\U00040000", "\U000B0000", "<|im_start|>",
          "<|im_end|>", " ", "\n", "    ", "x", "12345", "Hello world"]


def _disguised(text: str, style: str) -> str:
    """`text` in look-alikes that NFKC (and lowercasing) turn back into it: 4-byte math
    letters and digits, or 3-byte fullwidth forms, for ASCII characters."""
    if style == "fullwidth":
        return "".join(chr(ord(c) + 0xFF01 - 0x21) if "!" <= c <= "~" else c for c in text)
    starts = {"a": 0x1D41A, "A": 0x1D400, "0": 0x1D7CE}  # MATHEMATICAL BOLD ...
    return "".join(next((chr(base + ord(c) - ord(first)) for first, base in starts.items()
                         if first <= c < chr(ord(first) + (10 if first == "0" else 26))), c) for c in text)


def _texts(longest: list[str]) -> st.SearchStrategy[str]:
    """Texts made of PIECES, the tokenizer's longest tokens (as they are or disguised),
    arbitrary characters, and runs of any of these; or one run alone, the bound's worst
    case when its piece encodes to few tokens."""
    disguised = st.builds(_disguised, st.sampled_from(longest), st.sampled_from(["math", "fullwidth"]))
    piece = st.one_of(st.sampled_from(PIECES + longest), disguised, st.text(max_size=4))
    run = st.builds(lambda p, n: p * n, piece, st.integers(1, 200))
    return st.one_of(run, st.lists(st.one_of(piece, run), max_size=30).map("".join))


def _train(model, normalizer=None, pre_tokenizer=None, special=("<|im_start|>", "<|im_end|>"),
           byte_level: bool = True) -> Backend:
    backend = Backend(model)
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    trainer_of = trainers.WordPieceTrainer if isinstance(model, models.WordPiece) else trainers.BpeTrainer
    backend.train_from_iterator(CORPUS, trainer_of(vocab_size=300, special_tokens=list(special),
                                                   initial_alphabet=alphabet, show_progress=False))
    return backend


def _byte_level(normalizer=None) -> Backend:
    backend = _train(models.BPE(), normalizer, pre_tokenizers.ByteLevel(add_prefix_space=False))
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_style() -> Backend:
    """Llama 2's layout: "▁" for spaces by the normalizer, BPE with byte fallback."""
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = json.loads(_train(models.BPE(unk_token="<unk>"), normalizer, special=["<unk>"],
                                byte_level=False).to_str())["model"]
    vocab = trained["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    backend = Backend(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizer
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


def _runtime(backend: Backend, add_bos: bool = False) -> Tokenizer:
    return Tokenizer(backend, bos_token_id=backend.token_to_id("<|im_start|>"),
                     eos_token_id=backend.token_to_id("<|im_end|>"), add_bos=add_bos)


@pytest.fixture(scope="module")
def tokenizers(tiny_llama_dir, tiny_qwen2_dir, smollm2_gguf_path) -> dict[str, Tokenizer]:
    return {
        "tiny_llama": Tokenizer.from_hf_dir(tiny_llama_dir),
        "tiny_qwen2": Tokenizer.from_hf_dir(tiny_qwen2_dir),  # NFC, Qwen2's split regex
        "smollm2": Tokenizer.from_gguf(GGUFReader(smollm2_gguf_path)),  # lacks some bytes
        "nfkc_lowercase": _runtime(_byte_level(normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])),
                                   add_bos=True),
        "nfd": _runtime(_byte_level(normalizers.NFD())),
        "sentencepiece_style": _runtime(_sentencepiece_style()),
        "lacks_a_lead_byte": _runtime(_lacking_a_lead_byte()),
    }


TOKENIZERS = ["tiny_llama", "tiny_qwen2", "smollm2", "nfkc_lowercase", "nfd", "sentencepiece_style",
              "lacks_a_lead_byte"]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_the_bound_never_exceeds_the_real_count(tokenizers, name):
    tokenizer = tokenizers[name]
    prompt_tokens = PromptTokens(tokenizer)
    assert prompt_tokens.bound is not None
    # The longest tokens' texts, so that runs of them reach the bound's worst case.
    by_length = sorted(range(tokenizer.vocab_size), key=lambda i: -len(tokenizer.decode([i], False).encode()))
    longest = [tokenizer.decode([i], skip_special_tokens=False) for i in by_length[:20]]

    def check(text: str, special: bool) -> None:
        ids = prompt_tokens.encode(text, add_special_tokens=special)
        assert ids == tokenizer.encode(text, add_special_tokens=special)
        assert prompt_tokens.min_tokens(text) <= len(ids), text[:100]

    # The worst cases the bound is built for, each as a long run: the longest tokens, as
    # they are and in look-alikes that normalize into them, dropped characters, characters
    # that lose their lead byte.
    for piece in [*longest[:3], *(_disguised(t, s) for t in longest[:3] for s in ("math", "fullwidth")),
                  "\x04", "é", "\U00040000", "\U000B0000"]:
        check(piece * 200, special=False)

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(text=_texts(longest), special=st.booleans())
    def check_any(text, special):
        check(text, special)

    check_any()


def test_the_bound_is_the_text_length_over_the_longest_token(tokenizers):
    # The tiny vocabulary's longest entry is "<|endoftext|>", 13 bytes; Qwen2's NFC may
    # shrink text by 4x; SmolLM2's longest entries are 81 characters, and it lacks the
    # lead bytes of most 4-byte characters (3 of 4 bytes are kept).
    bounds = {name: PromptTokens(tokenizers[name]).bound for name in ("tiny_llama", "tiny_qwen2", "smollm2")}
    assert bounds["tiny_llama"].tokens_per_byte == Fraction(1, 13)
    assert bounds["tiny_qwen2"].tokens_per_byte == Fraction(1, 52)
    assert bounds["smollm2"].tokens_per_byte == Fraction(3, 4 * 81)
    assert bounds["smollm2"].dropped_chars == "\x04\x06\x13\x14\x16\x1d"
    tiny = PromptTokens(tokenizers["tiny_llama"])
    assert tiny.min_tokens("x" * 1300) == 100 and tiny.min_tokens("é" * 13) == 2 and tiny.min_tokens("") == 0
    smollm2 = PromptTokens(tokenizers["smollm2"])
    assert smollm2.min_tokens("\x04" * 10_000) == 0 and tokenizers["smollm2"].encode("\x04" * 10_000) == []


def test_byte_level_alphabet_is_the_tokenizers_one():
    alphabet = byte_level_alphabet()
    assert sorted(alphabet) == sorted(pre_tokenizers.ByteLevel.alphabet())
    mapping = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    assert [mapping.pre_tokenize_str(chr(b))[0][0] for b in range(128)] == alphabet[:128]
    assert mapping.pre_tokenize_str("é")[0][0] == alphabet[0xC3] + alphabet[0xA9]


@pytest.fixture(scope="module")
def every_character() -> dict[str, list[str]]:
    """Every code point but NUL and the surrogates, and the same decomposed (NFD, NFKD)."""
    chars = [chr(c) for c in range(1, 0x110000) if not 0xD800 <= c < 0xE000]
    return {"as is": chars, **{form: [unicodedata.normalize(form, c) for c in chars] for form in ("NFD", "NFKD")}}


@pytest.mark.parametrize("kind", ["NFC", "NFD", "NFKC", "NFKD", "Lowercase"])
def test_no_character_shrinks_more_than_its_normalizer_factor(every_character, kind):
    """The factors the bound assumes (prompt_tokens._NORMALIZER_SHRINK), over every code
    point and every decomposition that composes back into one, in one normalizer call
    per form: NUL separates the characters and composes with nothing."""
    normalizer = getattr(normalizers, kind)()
    for form, inputs in every_character.items():
        outputs = normalizer.normalize_str("\x00".join(inputs)).split("\x00")
        assert len(outputs) == len(inputs) and all(outputs)
        ratios = [len(i.encode()) / len(o.encode()) for i, o in zip(inputs, outputs)]
        worst = max(range(len(ratios)), key=ratios.__getitem__)
        assert ratios[worst] <= _NORMALIZER_SHRINK[kind], (form, inputs[worst], outputs[worst])


def _with_added_lstrip() -> Backend:
    backend = _byte_level()
    backend.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    return backend


def _truncating() -> Backend:
    backend = _byte_level()
    backend.enable_truncation(16)
    return backend


def _lacking(byte: int, normalizer=None) -> Backend:
    trained = json.loads(_byte_level().to_str())["model"]
    missing = byte_level_alphabet()[byte]
    vocab = {t: i for i, t in enumerate(t for t in trained["vocab"] if missing not in t)}
    merges = [tuple(m) for m in trained["merges"] if missing not in "".join(m)]
    backend = Backend(models.BPE(vocab, merges))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return backend


def _lacking_a_lead_byte() -> Backend:
    """Byte-level BPE without byte 0xC3 (the lead of "é", C3 A9), with tokens for runs of
    byte A9 ("©" in the byte-level alphabet): "é" * 16 encodes to one token of 16 bytes."""
    lacking = json.loads(_lacking(0xC3).to_str())["model"]
    vocab, merges = lacking["vocab"], [tuple(m) for m in lacking["merges"]]
    for n in (1, 2, 4, 8):
        merges.append(("©" * n, "©" * n))
        vocab["©" * 2 * n] = len(vocab)
    backend = Backend(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


# Pipelines that can drop or fuse input: any positive bound could refuse a prompt that fits.
NO_BOUND = {
    "whitespace_pre_tokenizer": lambda: _train(models.BPE(unk_token="<unk>"), None, pre_tokenizers.Whitespace(),
                                               special=["<unk>"]),
    "split_removing": lambda: _byte_level_with_pre(pre_tokenizers.Split(" ", "removed")),
    "strip_normalizer": lambda: _byte_level(normalizers.Strip()),
    "strip_accents": lambda: _byte_level(normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()])),
    "regex_replace": lambda: _byte_level(normalizers.Replace(Regex(" +"), " ")),
    "replace_by_nothing": lambda: _byte_level(normalizers.Replace("x", "")),
    "word_piece": lambda: _train(models.WordPiece(unk_token="<unk>"), None, pre_tokenizers.BertPreTokenizer(),
                                 special=["<unk>"], byte_level=False),
    "bpe_without_byte_fallback": lambda: _train(models.BPE(unk_token="<unk>", fuse_unk=True), None,
                                                pre_tokenizers.Metaspace(), special=["<unk>"], byte_level=False),
    "truncation": _truncating,
    "lstrip_added_token": _with_added_lstrip,
    "lacks_a_continuation_byte": lambda: _lacking(0xA9),
    "lacks_a_control_byte_under_a_normalizer": lambda: _lacking(0x04, normalizers.NFC()),
}


def _byte_level_with_pre(pre_tokenizer) -> Backend:
    backend = _train(models.BPE(), None, pre_tokenizers.Sequence([pre_tokenizer, pre_tokenizers.ByteLevel()]))
    return backend


@pytest.mark.parametrize("name", sorted(NO_BOUND))
def test_pipelines_that_may_drop_or_fuse_input_get_no_bound(name):
    backend = NO_BOUND[name]()
    assert text_bound(backend) is None
    assert PromptTokens(_runtime(backend)).min_tokens("x" * 10_000) == 0


def test_why_dropping_pipelines_get_no_bound():
    # A stripped or whitespace-split prompt of a million bytes may be one token long.
    for backend in (NO_BOUND["strip_normalizer"](), NO_BOUND["whitespace_pre_tokenizer"]()):
        assert len(backend.encode(" " * 1_000_000 + "a").ids) == 1
    # Without a lead byte a character keeps its continuation bytes: half of a 2-byte one.
    lacking_a_lead = _lacking(0xC3)
    longest = max(map(len, lacking_a_lead.get_vocab()))  # in characters: one per byte
    assert text_bound(lacking_a_lead).tokens_per_byte == Fraction(1, 2 * longest)
    assert PromptTokens(_runtime(lacking_a_lead)).min_tokens("é" * 1000) <= len(lacking_a_lead.encode("é" * 1000).ids)
