"""The gateway's side of tokenization: exact encodes that leave the GIL to the event loop,
and a lower bound on a text's token count that costs one look at its length.

    prompt_tokens = PromptTokens(tokenizer)   # once: reads the tokenizer's pipeline
    prompt_tokens.encode(text, add_special_tokens) == tokenizer.encode(text, add_special_tokens)
    prompt_tokens.min_tokens(text) <= len(prompt_tokens.encode(text, add_special_tokens))

`Tokenizer.encode` calls the batch entry point of HF `tokenizers`, which releases the GIL
while its Rust code runs (the single-text `encode` holds it: measured on a 3 MiB prompt,
every other thread of the process stalled for 2.5 s), so a worker thread can tokenize
beside the event loop.

The bound. Let B be the UTF-8 bytes of a text that the tokenizer encodes: all of them, less
any byte the vocabulary lacks (a byte-level BPE drops those; SmolLM2's lacks six ASCII
control characters and the lead bytes of most 4-byte characters, whose continuation bytes
it keeps). Every token stands for at most L bytes of the normalized text (L: the longest
vocabulary entry, one character per byte for byte-level BPE; the longest added token's
text), and the normalizer shrinks UTF-8 by at most a factor S, so the text encodes to at
least ceil(B / (L * S)) tokens. Special tokens a post-processor or a chat template adds
only raise the count. The argument needs a pipeline that never drops or fuses input: a BPE that can encode every byte (byte-level, or
byte fallback with all 256 byte tokens), pre-tokenizers that keep every character, a
normalizer of known shrink, no truncation, no added token that swallows the whitespace
beside it. Any other tokenizer gets no bound (`min_tokens` is 0): its prompts are only
checked after tokenizing, which is exact and runs off the event loop all the same.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from typing import Any, NamedTuple

from pdserve.runtime.tokenizer import Tokenizer

# How much each normalizer can shrink the UTF-8 of its input, at most. Unicode forms and
# lowercasing map a character (or a sequence that composes into one) to no less than a
# quarter of its bytes; the extremes, over every code point (tests/test_prompt_tokens.py):
# 4x under NFKC/NFKD (U+1D400 MATHEMATICAL BOLD CAPITAL A -> "A"), 3x under NFC/NFD
# (U+1FEF -> "`"; Hangul jamo triples -> one syllable) and lowercasing (U+212A KELVIN
# SIGN -> "k"). Prepend only adds. Kinds not listed (Strip, StripAccents, BertNormalizer,
# Precompiled, ...) may delete characters, so no bound holds under them.
_NORMALIZER_SHRINK = {"NFC": 4, "NFD": 4, "NFKC": 4, "NFKD": 4, "Lowercase": 4, "Prepend": 1}
# Pre-tokenizers that split or map text but keep every character of it (Split keeps them
# unless its behaviour is "Removed"; Whitespace, WhitespaceSplit, BertPreTokenizer and
# CharDelimiterSplit drop separators).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Digits", "Metaspace", "Punctuation", "UnicodeScripts", "Split"}


class TextBound(NamedTuple):
    # Tokens per UTF-8 byte of text at least: 1 / (L * S) of the module docstring, times the
    # share of a character's bytes that is kept when the vocabulary lacks lead bytes.
    tokens_per_byte: Fraction
    dropped_chars: str  # ASCII characters the vocabulary cannot encode (dropped when encoding)


class PromptTokens:
    """Tokenization for the gateway's request path. Immutable; safe to use from any thread."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.bound = text_bound(tokenizer.backend)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """`tokenizer.encode(text, add_special_tokens)` (the GIL is released while the
        Rust code runs). Slow for long texts: call it from a worker thread."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt text of a conversation (the chat template's output), which
        `encode(..., add_special_tokens=False)` tokenizes. `tools` goes to the template as
        its `tools` variable (left undefined when None). Raises what the template raises."""
        return self.tokenizer.apply_chat_template(messages, tools=tools)

    def min_tokens(self, text: str) -> int:
        """A number of tokens that no encoding of `text` goes below; 0 for a tokenizer
        without a bound. Cheap: the length of the text, and a count of each dropped
        character when the vocabulary has any."""
        if self.bound is None:
            return 0
        # isascii() is O(1) on CPython's str: no copy for the common case.
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        size -= sum(text.count(c) for c in self.bound.dropped_chars)
        return math.ceil(size * self.bound.tokens_per_byte)


def text_bound(backend: Any) -> TextBound | None:
    """The bound of the module docstring for a `tokenizers.Tokenizer`, or None where its
    pipeline may drop or fuse input."""
    added = backend.get_added_tokens_decoder().values()
    if backend.truncation is not None or any(t.lstrip or t.rstrip for t in added):
        return None
    shrink = _normalizer_shrink(_component(backend.normalizer))
    pre_tokenizers = _flatten(_component(backend.pre_tokenizer), "pretokenizers")
    if shrink is None or not all(_keeps_every_char(p) for p in pre_tokenizers):
        return None
    if type(backend.model).__name__ != "BPE":  # WordPiece/Unigram/WordLevel: unknown runs fuse
        return None
    vocab = backend.get_vocab(with_added_tokens=False)
    longest_added = max((len(t.content.encode("utf-8")) for t in added), default=1)
    kept = Fraction(1)
    if any(p["type"] == "ByteLevel" for p in pre_tokenizers):
        missing = {b for b, char in enumerate(byte_level_alphabet()) if char not in vocab}
        if any(0x80 <= b < 0xC0 for b in missing):
            return None  # with continuation bytes missing too, a character could lose every byte
        if missing and shrink != 1:
            return None  # a normalizer could turn other text into dropped characters
        # A k-byte character whose lead byte is missing keeps its k - 1 continuation bytes.
        kept = min((Fraction(k - 1, k) for b in missing if (k := _utf8_length(b)) > 1), default=kept)
        longest = max(map(len, vocab))  # byte-level entries hold one character per byte
        dropped = "".join(sorted(chr(b) for b in missing if b < 0x80))
    elif backend.model.byte_fallback and all(f"<0x{b:02X}>" in vocab for b in range(256)):
        longest, dropped = max(len(entry.encode("utf-8")) for entry in vocab), ""
    else:
        return None  # characters outside the vocabulary would be dropped or fused into one <unk>
    return TextBound(kept / (max(longest, longest_added) * shrink), dropped)


def byte_level_alphabet() -> list[str]:
    """The character byte-level BPE writes for each byte 0..255 (GPT-2's byte-to-unicode
    table: printable Latin-1 bytes stand for themselves, the others for 256 upwards)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _utf8_length(lead: int) -> int:
    """The length of the UTF-8 sequences that start with byte `lead`; 0 for a byte that
    starts none (a continuation byte, or one that occurs in no UTF-8 text)."""
    if lead < 0x80:
        return 1
    return next((k for k, (low, high) in enumerate(_LEAD_BYTES, start=2) if low <= lead <= high), 0)


_LEAD_BYTES = ((0xC2, 0xDF), (0xE0, 0xEF), (0xF0, 0xF4))  # of 2-, 3- and 4-byte sequences


def _component(component: Any) -> dict | None:
    """A normalizer's or pre-tokenizer's description (its serialized JSON), or None."""
    return None if component is None else json.loads(component.__getstate__())


def _flatten(spec: dict | None, children: str) -> list[dict]:
    if spec is None:
        return []
    if spec["type"] == "Sequence":
        return [leaf for child in spec[children] for leaf in _flatten(child, children)]
    return [spec]


def _normalizer_shrink(spec: dict | None) -> int | None:
    shrink = 1
    for step in _flatten(spec, "normalizers"):
        factor = _NORMALIZER_SHRINK.get(step["type"])
        if step["type"] == "Replace":
            factor = _replace_shrink(step)
        if factor is None:
            return None
        shrink *= factor
    return shrink


def _replace_shrink(step: dict) -> int | None:
    """Replacing a fixed string by a non-empty one shrinks by their length ratio at most;
    a regex or an empty replacement has no such bound."""
    pattern, content = step["pattern"].get("String"), step["content"].encode("utf-8")
    if pattern is None or not content:
        return None
    return max(1, math.ceil(len(pattern.encode("utf-8")) / len(content)))


def _keeps_every_char(spec: dict) -> bool:
    return spec["type"] in _KEEPING_PRE_TOKENIZERS and spec.get("behavior") != "Removed"
