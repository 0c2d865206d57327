"""Text <-> token ids, chat templates and streaming detokenization.

`Tokenizer` wraps a `tokenizers.Tokenizer` built either from a HuggingFace directory
(`tokenizer.json` + `tokenizer_config.json`) or from the vocabulary a GGUF file stores in its
metadata. `IncrementalDetokenizer` turns a stream of generated ids into text pieces that never
split a UTF-8 character.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend


class TokenizerError(ValueError):
    """The tokenizer files are missing or describe something this module cannot build."""


# Qwen2's split regex, as in its tokenizer.json and llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _smollm_pre() -> Any:
    # Digits one by one, then GPT-2's byte-level regex: SmolLM2's tokenizer.json, and
    # llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM ("\p{N}" then the GPT-2 regex).
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def _qwen2_pre() -> Any:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _gpt2_pre() -> Any:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# `tokenizer.ggml.pre` -> (pre-tokenizer, normalizer). Qwen2's own tokenizer NFC-normalizes
# its input (llama.cpp does not); we follow the tokenizer the model was trained with.
_GGUF_PRE_TOKENIZERS = {
    "smollm": (_smollm_pre, None),
    "qwen2": (_qwen2_pre, normalizers.NFC),
    "gpt2": (_gpt2_pre, None),
}


def _gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A model's tokenizer and chat template. Immutable after construction; thread-safe to read.

    `encode(text, add_special_tokens=True)` runs the backend's post-processor and, when the
    model asks for a BOS that the post-processor does not add itself (`add_bos`), prepends it.
    Special-token text such as `<|im_start|>` in `text` always encodes to its single id.
    """

    def __init__(self, backend: _Backend, *, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos: bool = False, chat_template: str | None = None) -> None:
        self._backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_id = eos_token_id
        # Only add BOS ourselves when the post-processor adds nothing, or it would be doubled.
        self.add_bos = bool(add_bos and bos_token_id is not None
                            and backend.num_special_tokens_to_add(False) == 0)
        self.chat_template = chat_template
        special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        special.update(i for i in (bos_token_id, eos_token_id) if i is not None)
        self._all_special_ids = sorted(special)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self._bos_token_id}, "
                f"eos={self._eos_token_id}, add_bos={self.add_bos}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Read `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` (if any)."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(
                f"{path} has no tokenizer.json; pdserve needs the fast-tokenizer file. Save it "
                "with transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir)"
            )
        backend = _Backend.from_file(str(tokenizer_file))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():  # newer transformers write the template here instead
            template = jinja_file.read_text()

        def token_id(key: str) -> int | None:
            content = _token_content(config.get(key))
            return None if content is None else backend.token_to_id(content)

        return cls(backend, bos_token_id=token_id("bos_token"), eos_token_id=token_id("eos_token"),
                   add_bos=bool(config.get("add_bos_token", False)), chat_template=template)

    @classmethod
    def from_gguf(cls, reader: Any) -> Tokenizer:
        """Build a byte-level BPE tokenizer from a `gguf.GGUFReader`'s `tokenizer.ggml.*` keys."""
        model = _gguf_value(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(
                f"GGUF tokenizer model {model!r} is not supported; only byte-level BPE ('gpt2', "
                "used by SmolLM2, Qwen2 and Llama 3) is. Use the model's HuggingFace directory "
                "(with tokenizer.json) instead."
            )
        pre = _gguf_value(reader, "tokenizer.ggml.pre", "gpt2")
        if pre not in _GGUF_PRE_TOKENIZERS:
            raise TokenizerError(
                f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
                f"{', '.join(sorted(_GGUF_PRE_TOKENIZERS))}. Use the model's HuggingFace directory."
            )
        tokens: list[str] = _gguf_value(reader, "tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
                  for m in _gguf_value(reader, "tokenizer.ggml.merges", [])]
        types: list[int] = _gguf_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
        # Tokens are stored in the byte-level alphabet (" " as "Ġ"), as in tokenizer.json.
        vocab = {token: i for i, token in enumerate(tokens)}
        backend = _Backend(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                      continuing_subword_prefix="", end_of_word_suffix="",
                                      fuse_unk=False, byte_fallback=False))
        make_pre, make_norm = _GGUF_PRE_TOKENIZERS[pre]
        backend.pre_tokenizer = make_pre()
        if make_norm is not None:
            backend.normalizer = make_norm()
        backend.decoder = decoders.ByteLevel()
        # llama.cpp token types: 3 = CONTROL (special); 4 = USER_DEFINED (matched whole, not
        # special).
        control = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, types) if ty == 3]
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types) if ty == 4]
        backend.add_special_tokens(control)
        backend.add_tokens(user)
        return cls(backend,
                   bos_token_id=_gguf_value(reader, "tokenizer.ggml.bos_token_id"),
                   eos_token_id=_gguf_value(reader, "tokenizer.ggml.eos_token_id"),
                   add_bos=bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", False)),
                   chat_template=_gguf_value(reader, "tokenizer.chat_template"))

    # ----------------------------------------------------------------- queries

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (may be below the model's embedding rows)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def all_special_ids(self) -> list[int]:
        return list(self._all_special_ids)

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template renders tool definitions itself (its text uses `tools`)."""
        return bool(self.chat_template) and _TOOLS_VARIABLE.search(self.chat_template) is not None

    def token_text(self, token_id: int | None) -> str | None:
        """The vocabulary entry of one id (special tokens read as written, e.g. "<|im_end|>")."""
        return None if token_id is None else self._backend.id_to_token(token_id)

    # ----------------------------------------------------------------- text <-> ids

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` pipeline, for reading its description."""
        return self._backend

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # encode_batch releases the GIL while the Rust code runs (encode holds it): other
        # threads of the process, an event loop among them, go on meanwhile.
        [encoding] = self._backend.encode_batch([text], add_special_tokens=add_special_tokens)
        ids = encoding.ids
        if add_special_tokens and self.add_bos:
            ids = [self._bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            tools: list[dict] | None = None) -> str:
        """Render `messages` with the model's template exactly as transformers does.

        `tools` (OpenAI function tools) reaches the template as the variable `tools`; when it
        is None the variable is left undefined, so `tools is defined` reads as in transformers."""
        if not self.chat_template:
            raise TokenizerError(
                "this model has no chat template; send a plain completion prompt instead of "
                "chat messages, or use a checkpoint whose tokenizer declares chat_template"
            )
        template = _compile_template(self.chat_template)
        context: dict[str, Any] = {}
        if tools is not None:
            context["tools"] = tools
        return template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.token_text(self._bos_token_id) or "",
            eos_token=self.token_text(self._eos_token_id) or "",
            **context,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    tools: list[dict] | None = None) -> list[int]:
        """Template, then encode; the template writes any BOS itself, so none is added again."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools=tools))


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # transformers overrides jinja's tojson, which would HTML-escape the output.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


_TEMPLATE_CACHE: dict[str, jinja2.Template] = {}
# A template that renders tool definitions reads the variable `tools` (transformers' name).
_TOOLS_VARIABLE = re.compile(r"\btools\b")


def _compile_template(source: str) -> jinja2.Template:
    template = _TEMPLATE_CACHE.get(source)
    if template is None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        template = _TEMPLATE_CACHE[source] = env.from_string(source)
    return template


class IncrementalDetokenizer:
    """Turns generated ids into text pieces, one `push` per id; one per sequence.

    Contract: concatenating every `push()` result and then `flush()` equals
    `tokenizer.decode(all_ids, skip_special_tokens)`, and no piece ends inside a UTF-8
    character. Text whose decoding ends in U+FFFD (an incomplete character, or rarely a real
    U+FFFD / invalid bytes) is held back until a later id completes it, or until `flush()`.

    Each push decodes only a short trailing window (the last emitted step plus held-back
    ids), so the cost per token does not grow with the sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # Invariant: `_window[:_read]` was already emitted and decodes to a text that ends on a
        # complete character; it is kept only as left context for decoding what follows.
        self._window: list[int] = []
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is incomplete)."""
        self._window.append(token_id)
        full = self._decode(self._window)
        if full.endswith("\ufffd"):
            return ""
        piece = full[len(self._decode(self._window[:self._read])):]
        self._window = self._window[self._read:]
        self._read = len(self._window)
        return piece

    def flush(self) -> str:
        """Return whatever is held back (may contain U+FFFD) and reset to an empty window."""
        prefix = self._decode(self._window[:self._read])
        piece = self._decode(self._window)[len(prefix):]
        self._window, self._read = [], 0
        return piece
