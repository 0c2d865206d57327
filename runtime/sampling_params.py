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
from collections.abc import Iterable
from dataclasses import dataclass

# Upper bound on `logprobs`, as in the OpenAI API: top alternatives cost a top-k per step.
MAX_LOGPROBS = 20
# Bounds on the stop conditions, which are checked against every step's output: one request
# must not make every step of its batch slow. Stop token ids count as a set (duplicates
# are dropped).
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
_U64 = (1 << 64) - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request and when to stop.

    Disabled values: `top_k` 0 or -1, `top_p` 1.0, `min_p` 0.0, `seed` None (the default
    RNG), `logprobs` None. `stop` and `stop_token_ids` accept a single value or any
    iterable and are stored as tuples.
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
    include_stop_str_in_output: bool = False
    speculate: bool = True  # False opts this request out of speculative decoding

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
        self._validate()

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
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not (0 <= self.logprobs <= MAX_LOGPROBS)
        ):
            raise ValueError(
                f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], "
                f"got {self.logprobs!r}"
            )
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

    @property
    def is_greedy(self) -> bool:
        """True when the request takes the argmax of the raw logits every step.

        temperature 0 and top_k 1 both mean "the single most likely token"; the greedy
        path breaks ties by the lowest token id.
        """
        return self.temperature == 0 or self.top_k == 1


# Every field a client may set, by name: the HTTP models, the gRPC request and the CLI take
# these, and the gateway checks requests against them. Repeated fields hold sequences.
SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SamplingParams))
REPEATED_SAMPLING_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(SamplingParams) if str(f.type).startswith("tuple"))
SCALAR_SAMPLING_FIELDS: tuple[str, ...] = tuple(f for f in SAMPLING_FIELDS if f not in REPEATED_SAMPLING_FIELDS)


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
