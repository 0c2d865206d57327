"""Per-request sampling parameters, with the names and defaults vLLM users know.

A `SamplingParams` is validated once at construction and frozen; the sampler and the stop
checks only read it. Errors are `ValueError`s naming the field, the bad value and the range
that is allowed, because they usually come straight from a user's request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pdserve.runtime.structured_output import StructuredOutput

# Upper bound on `logprobs`, as in the OpenAI API: top alternatives cost a top-k per step.
MAX_LOGPROBS = 20
# Bounds on the stop conditions, which are checked against every step's output: one request
# must not make every step of its batch slow. Stop token ids count as a set (duplicates
# are dropped).
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
# logit_bias is applied to every step's logits of its row: bounded like the stop ids.
MAX_LOGIT_BIAS = 1024
PENALTY_BOUND = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2], as in the OpenAI API
LOGIT_BIAS_BOUND = 100.0  # each bias lies in [-100, 100], as in the OpenAI API
_U64 = (1 << 64) - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request and when to stop.

    Disabled values: `top_k` 0 or -1, `top_p` 1.0, `min_p` 0.0, `seed` None (the default
    RNG), `logprobs` None, `prompt_logprobs` None, `presence_penalty` and `frequency_penalty` 0.0,
    `repetition_penalty` 1.0, `logit_bias` (), `min_tokens` 0. `stop` and `stop_token_ids`
    accept a single value or any iterable and are stored as tuples.

    Logits controls (applied by the sampler to the raw logits, before temperature and the
    filters, and before the greedy argmax):
      - `repetition_penalty` r (HF/vLLM): every token seen in the prompt or the output
        has its logit divided by r when positive, multiplied by r otherwise;
      - `frequency_penalty` f and `presence_penalty` p (OpenAI): logit -= f * count +
        p * (count > 0), count being the token's occurrences in the output so far;
      - `logit_bias`: (token id, bias) pairs, the bias added to the logit; accepts a dict
        or any iterable of pairs, stored sorted by token id. Ids must also be below the
        model's vocabulary, which the engine checks;
      - `min_tokens`: EOS (unless `ignore_eos`) and `stop_token_ids` are masked, and do
        not stop the request, until it has this many output tokens (as vLLM: the stop
        token can come no earlier than as token min_tokens + 1). A value at or above
        `max_tokens` means the request ends by length.
    "Output" counts everything generated for the request, including output carried into
    a migrated request's prompt.

    `prompt_logprobs` k (vLLM's): the first output delta also carries, for every prompt token
    after the first, its logprob given the tokens before it and the k most likely tokens
    there. Such a prompt is computed in full: it reuses no cached prefix.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    speculate: bool = True  # False opts this request out of speculative decoding
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    structured_output: StructuredOutput | None = None

    def seed_at(self, position: int) -> int | None:
        """The seed of the draws that pick output token number `position` (0-based), or
        None when unseeded. A pure function of (seed, position): a request continued on
        another worker at position n (a migration, the prefill worker's first token) draws
        exactly what it would have drawn in one place."""
        if self.seed is None:
            return None
        digest = hashlib.blake2b(struct.pack("<QQ", self.seed & _U64, position), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**64; keep it non-negative

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__, before anything reads the fields.
        object.__setattr__(self, "stop", _as_tuple(self.stop, str))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, int))
        object.__setattr__(self, "logit_bias", _as_logit_bias(self.logit_bias))
        self._validate()
        self._validate_controls()

    def _validate(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        t = self.temperature
        if not _is_real(t) or not (math.isfinite(t) and t >= 0):
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}"
            )
        if not _is_real(self.top_p) or not (0 < self.top_p <= 1):
            raise ValueError(
                f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}"
            )
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(
                f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}"
            )
        if not _is_real(self.min_p) or not (0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1] (0 disables it), got {self.min_p!r}")
        if self.seed is not None and not (_is_int(self.seed) and -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not (0 <= value <= MAX_LOGPROBS)):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        object.__setattr__(self, "stop_token_ids", tuple(dict.fromkeys(self.stop_token_ids)))
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop holds {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise ValueError(f"stop holds a string of {longest} characters; at most "
                             f"{MAX_STOP_STRING_CHARS} are allowed")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids holds {len(self.stop_token_ids)} distinct ids; at most "
                             f"{MAX_STOP_TOKEN_IDS} are allowed")
        if "" in self.stop:
            raise ValueError(
                f"stop must not contain empty strings, got {self.stop!r}; "
                "remove the empty entry"
            )
        for token_id in self.stop_token_ids:
            if token_id < 0:
                raise ValueError(
                    f"stop_token_ids must be token ids >= 0, got {token_id!r} "
                    f"in {self.stop_token_ids!r}"
                )

    def _validate_controls(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not (-PENALTY_BOUND <= value <= PENALTY_BOUND):
                raise ValueError(f"{name} must be a number in [-2, 2] (0 disables it), got {value!r}")
        r = self.repetition_penalty
        if not _is_real(r) or not (math.isfinite(r) and r > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 disables it), got {r!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0 (0 disables it), got {self.min_tokens!r}")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            raise ValueError(f"structured_output must be a StructuredOutput or None, "
                             f"got {type(self.structured_output).__name__}")

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError (naming the field) if `logit_bias` names a token id outside a
        vocabulary of `vocab_size` ids; the engines call this, as only they know it."""
        if self.logit_bias and self.logit_bias[-1][0] >= vocab_size:
            raise ValueError(f"logit_bias names token {self.logit_bias[-1][0]} but the model's vocabulary "
                             f"has {vocab_size} tokens (ids 0 to {vocab_size - 1})")

    @property
    def has_penalties(self) -> bool:
        """Some penalty reads the request's tokens so far (prompt and/or output)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def has_logits_controls(self) -> bool:
        """The sampler must change this request's raw logits before picking a token."""
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0

    @property
    def is_greedy(self) -> bool:
        """True when the request takes the argmax of its logits every step (raw, or as
        the logits controls left them).

        temperature 0 and top_k 1 both mean "the single most likely token"; the greedy
        path breaks ties by the lowest token id.
        """
        return self.temperature == 0 or self.top_k == 1


# Every field a client may set, by name: the HTTP models, the gRPC request and the CLI take
# these, and the gateway checks requests against them. Repeated fields hold sequences;
# `structured_output` is a message of its own in each API, so it is in neither list.
SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SamplingParams))
REPEATED_SAMPLING_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(SamplingParams) if str(f.type).startswith("tuple"))
SCALAR_SAMPLING_FIELDS: tuple[str, ...] = tuple(
    f for f in SAMPLING_FIELDS if f not in REPEATED_SAMPLING_FIELDS and f != "structured_output")


def _as_tuple(value: object, kind: type) -> tuple:
    """`value` as a tuple of `kind`: one bare value becomes a 1-tuple."""
    if isinstance(value, kind) and not isinstance(value, bool):
        return (value,)
    field = "stop" if kind is str else "stop_token_ids"
    # ValueError, not TypeError, for every bad request field: one exception type to map
    # to a 400 response.
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(  # noqa: TRY004
            f"{field} must be a {kind.__name__} or a list of them, got {value!r}"
        )
    items = tuple(value)
    for item in items:
        if not isinstance(item, kind) or isinstance(item, bool):
            raise ValueError(  # noqa: TRY004
                f"{field} must contain only {kind.__name__} values, got {item!r} in {value!r}"
            )
    return items


def _as_logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """`value` (a mapping or an iterable of (token id, bias) pairs) as pairs sorted by id."""
    if isinstance(value, Mapping):
        value = value.items()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"logit_bias must map token ids to biases (a dict or (id, bias) pairs), "  # noqa: TRY004
                         f"got {value!r}")
    pairs: dict[int, float] = {}
    for item in value:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"logit_bias must hold (token id, bias) pairs, got {item!r}")
        token_id, bias = item
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token_id!r}")
        if not _is_real(bias) or not (-LOGIT_BIAS_BOUND <= bias <= LOGIT_BIAS_BOUND):
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} "
                             f"for token {token_id}")
        if token_id in pairs:
            raise ValueError(f"logit_bias lists token {token_id} twice; give each token one bias")
        if len(pairs) == MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias holds more than {MAX_LOGIT_BIAS} tokens; at most "
                             f"{MAX_LOGIT_BIAS} are allowed")
        pairs[token_id] = float(bias)
    return tuple(sorted(pairs.items()))
