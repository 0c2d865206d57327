"""Immutable messages of the prefill -> decode hop, and the wire encoding of those that
cross the KV link.

    PrefillJob      gateway -> prefill   a prompt to compute and the ticket to push its KV with
    PrefillResult   prefill -> gateway   the job settled: KV accepted by decode, or why not
    KVTicket        decode -> prefill    where to write: destination blocks, secret, deadline
    PagesHeader     prefill -> decode    one layer's pages (and their scales, for a
                                         quantized KV cache), then `nbytes` raw bytes
    TransferDone    prefill -> decode    every page sent; the first sampled token (and the
                                         prompt logprobs, when the request asked for them)
    TransferAbort   either way           give up on a ticket, with a reason
    MessageRejected (raised on the sender) the receiver refused a message, and why

On the KV link every message is a msgpack map (never pickle: nothing that came off the
network is ever executed); a pages header's map is followed by its raw bytes. Decoding
checks every field's type and rejects anything else with `MalformedMessage`; the values of
a TransferDone (its token ids and logprobs) are checked against the model and the request
by `first_token_problem`. PrefillJob and PrefillResult travel between Ray processes, not
over the KV link.

Every transport carries a message of up to `MAX_DONE_BYTES`; the decode side prefills a
prompt itself when its prompt logprobs could make the TransferDone larger
(`done_bytes_bound`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import msgpack

from pdserve.runtime.request import PromptLogprob
from pdserve.runtime.sampling_params import MAX_LOGPROBS, SamplingParams


class MalformedMessage(ValueError):
    """Bytes that do not decode to a well-formed message of the expected kind."""


class MessageRejected(ValueError):
    """The receiver refused an incoming message; nothing was written. The message says
    why. Raised by the receiver's checks and, through the transports, on the sender."""


@dataclass(frozen=True)
class KVLayout:
    """What both ends must agree on for pages to mean the same thing."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without "torch.", e.g. "float32", "int8", "float8_e4m3fn"
    # A quantized pool's per-row scales ("float16"), sent after the values; "": none.
    scale_dtype: str = ""

    @property
    def page_shape(self) -> tuple[int, int, int]:
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def scale_page_shape(self) -> tuple[int, int]:
        """One page's scales: one per (slot, kv-head)."""
        return (self.block_size, self.num_kv_heads)


@dataclass(frozen=True)
class KVTicket:
    """Issued by the decode worker: the right to write pages [first_page, first_page +
    len(block_ids)) of one request's prompt into those blocks, until `deadline`."""

    request_id: str
    ticket_id: int
    secret: bytes
    block_ids: tuple[int, ...]
    first_page: int  # = num_cached_tokens // block_size on the decode side
    num_prompt_tokens: int
    layout: KVLayout
    deadline: float  # time.time() after which the receiver fails the ticket

    @property
    def num_cached_tokens(self) -> int:
        return self.first_page * self.layout.block_size


@dataclass(frozen=True)
class PagesHeader:
    """One layer of pages [page_start, page_start + num_pages) of a ticket (the pages one
    prefill chunk completed); `nbytes` raw bytes follow it on the wire."""

    request_id: str
    ticket_id: int
    secret: bytes
    layer: int
    page_start: int  # index into the ticket's block_ids
    num_pages: int
    dtype: str
    shape: tuple[int, ...]  # [2, num_pages, block_size, kv_heads, head_dim]
    nbytes: int
    # XXH3-64 of the payload (layout.checksum); over nccl, its device_checksum. A sender
    # may leave it None for its channel's send_pool_pages to fill in: never sent so.
    checksum: int
    # A quantized chunk's scales, in the payload after the values (layout.py): their
    # dtype and shape [2, num_pages, block_size, kv_heads]; "" and () for a float chunk.
    scale_dtype: str = ""
    scale_shape: tuple[int, ...] = ()

    kind: ClassVar[str] = "chunk"  # the wire name, fixed by the protocol


@dataclass(frozen=True)
class TransferDone:
    request_id: str
    ticket_id: int
    secret: bytes
    first_token: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()
    # Prompt tokens 1 .. P - 1's logprobs when the request asked for them, else empty.
    prompt_logprobs: tuple[PromptLogprob, ...] = ()
    # The request's W3C trace context ("" untraced; at most TRACEPARENT_CHARS), for the
    # decode worker's log lines about this transfer.
    traceparent: str = ""

    kind: ClassVar[str] = "done"


@dataclass(frozen=True)
class TransferAbort:
    request_id: str
    ticket_id: int
    secret: bytes
    reason: str

    kind: ClassVar[str] = "abort"


class PrefillJob(NamedTuple):
    """Compute `prompt_ids` and ship its KV for `ticket` to the listener at `address`."""

    ticket: KVTicket
    address: str
    prompt_ids: list[int]
    params: SamplingParams
    # A migrated request's output tokens carried at the end of `prompt_ids` (None: a new
    # request): it queues ahead of new jobs and samples its first token at this position.
    resume_at: int | None = None
    # The request's W3C trace context at the gateway ("" untraced): the prefill worker's
    # log lines about this job carry it.
    traceparent: str = ""


class PrefillResult(NamedTuple):
    """How a `PrefillJob` settled, with where its time to first token went."""

    request_id: str
    ok: bool
    reason: str  # why it failed; "" when ok
    queue_seconds: float  # accepted .. the step that computed its first prompt chunk began
    compute_seconds: float  # that step began .. its last prompt chunk computed, first token sampled
    transfer_tail_seconds: float  # .. the decode side accepted all its KV (what overlap did not hide)
    kv_bytes: int = 0  # payload bytes this job sent to the decode worker


# Field name -> accepted Python types after msgpack decoding, per message kind.
_SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {}
_CLASSES = {cls.kind: cls for cls in (PagesHeader, TransferDone, TransferAbort)}
for _cls in (KVLayout, KVTicket, *_CLASSES.values()):
    _SCHEMAS[_cls.__name__] = {f.name: f.type for f in dataclasses.fields(_cls)}

_TYPES = {"str": (str,), "int": (int,), "bytes": (bytes,), "float": (float, int),
          "tuple[int, ...]": (list, tuple), "tuple[tuple[int, float], ...]": (list, tuple),
          "tuple[PromptLogprob, ...]": (list, tuple), "KVLayout": (dict,)}

# The smallest frame head of any transport (torch.distributed's: 4 KiB less its two lengths)
# bounds every message but a chunk's pages, which travel as payload.
MAX_DONE_BYTES = 4000


def encode(message: Any) -> bytes:
    """msgpack bytes of a message; `decode` restores an equal one."""
    body = _to_plain(message)
    if hasattr(type(message), "kind"):
        body["kind"] = type(message).kind
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes | memoryview, expected: type | None = None) -> Any:
    """Parse and type-check a message. Raises MalformedMessage with the reason."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError) as exc:  # msgpack's unpack errors are ValueErrors
        raise MalformedMessage(f"not a msgpack message: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedMessage("a message must be a msgpack map")
    if expected is not None and expected in (KVTicket, KVLayout):
        cls = expected
    else:
        kind = body.pop("kind", None)
        cls = _CLASSES.get(kind) if isinstance(kind, str) else None  # a peer may send any value
    if cls is None or (expected is not None and cls is not expected):
        raise MalformedMessage(f"unexpected message kind for {getattr(expected, '__name__', 'any')}")
    return _from_plain(cls, body)


TRACEPARENT_CHARS = 55  # a W3C traceparent of version 00: 00-<32 hex>-<16 hex>-<2 hex>


def done_bytes_bound(request_id: str, num_prompt_logprobs: int, prompt_top: int) -> int:
    """The most bytes a TransferDone of this request encodes to when it carries
    `num_prompt_logprobs` prompt logprobs of `prompt_top` alternatives each: every number
    at its widest msgpack form, the first token with MAX_LOGPROBS alternatives."""
    widest_id, widest_float = 2**32 - 1, -1e300  # token ids and ranks are < 2**32
    fixed = TransferDone(request_id, 2**64 - 1, bytes(16), widest_id, widest_float,
                         ((widest_id, widest_float),) * MAX_LOGPROBS, traceparent="0" * TRACEPARENT_CHARS)
    entry = PromptLogprob(widest_float, widest_id, ((widest_id, widest_float),) * prompt_top)
    array_header = 5  # msgpack's array32 header: the widest
    return len(encode(fixed)) + array_header + num_prompt_logprobs * len(msgpack.packb(entry))


# A log-probability is <= 0; logits - logsumexp may round a hair above it.
_LOGPROB_ROUNDING = 1e-3


def first_token_problem(done: TransferDone, vocab_size: int | None, max_top_logprobs: int,
                        num_prompt_logprobs: int = 0, max_prompt_top: int = 0) -> str | None:
    """Why `done`'s sampled token and logprobs cannot be used by a decode engine whose
    vocabulary has `vocab_size` ids (None: unknown, ids are only checked to be non-negative),
    for a request that asked for at most `max_top_logprobs` alternatives, and for
    `num_prompt_logprobs` prompt logprobs (0: none) of at most `max_prompt_top`
    alternatives each; None if usable."""
    if len(done.prompt_logprobs) != num_prompt_logprobs:
        return (f"{len(done.prompt_logprobs)} prompt logprobs sent; expected {num_prompt_logprobs} "
                "(one per prompt token after the first, when the request asked for them)")
    tops = [done.top_logprobs, *(entry.top for entry in done.prompt_logprobs)]
    tokens = [done.first_token, *(token for top in tops for token, _ in top)]
    bad = next((t for t in tokens if t < 0 or (vocab_size is not None and t >= vocab_size)), None)
    if bad is not None:
        return f"token id {bad} is outside the vocabulary [0, {vocab_size if vocab_size is not None else 'inf'})"
    if len(done.top_logprobs) > max_top_logprobs:
        return f"{len(done.top_logprobs)} top logprobs sent; at most {max_top_logprobs} allowed"
    widest = max((len(entry.top) for entry in done.prompt_logprobs), default=0)
    if widest > max_prompt_top:
        return f"{widest} alternatives sent for a prompt token; at most {max_prompt_top} allowed"
    bad_rank = next((e.rank for e in done.prompt_logprobs
                     if e.rank < 1 or (vocab_size is not None and e.rank > vocab_size)), None)
    if bad_rank is not None:
        return f"prompt token rank {bad_rank} is outside [1, {vocab_size if vocab_size is not None else 'inf'}]"
    values = [done.logprob, *(e.logprob for e in done.prompt_logprobs),
              *(value for top in tops for _, value in top)]
    bad_value = next((v for v in values if math.isnan(v) or v > _LOGPROB_ROUNDING), None)
    if bad_value is not None:
        return f"logprob {bad_value} is not a log-probability (a number <= 0)"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _to_plain(message: Any) -> dict:
    plain = {}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        plain[f.name] = _to_plain(value) if dataclasses.is_dataclass(value) else value
    return plain


def _from_plain(cls: type, body: dict) -> Any:
    schema = _SCHEMAS[cls.__name__]
    if set(body) != set(schema):
        raise MalformedMessage(f"{cls.__name__} fields {sorted(body)} != {sorted(schema)}")
    values = {}
    for name, type_name in schema.items():
        value = body[name]
        if not isinstance(value, _TYPES[type_name]) or isinstance(value, bool):
            raise MalformedMessage(f"{cls.__name__}.{name} has type {type(value).__name__}")
        if type_name == "KVLayout":
            value = _from_plain(KVLayout, value)
        elif type_name == "tuple[int, ...]":
            if not all(_is_int(v) for v in value):
                raise MalformedMessage(f"{cls.__name__}.{name} must hold integers")
            value = tuple(value)
        elif type_name == "tuple[tuple[int, float], ...]":
            if not _is_pairs(value):
                raise MalformedMessage(f"{cls.__name__}.{name} must hold (id, logprob) pairs")
            value = tuple((int(a), float(b)) for a, b in value)
        elif type_name == "tuple[PromptLogprob, ...]":
            value = tuple(_prompt_logprob(cls.__name__, name, entry) for entry in value)
        elif type_name == "float":
            value = float(value)
        values[name] = value
    return cls(**values)


def _is_pairs(value: object) -> bool:
    """Whether `value` is a list of (int, number) pairs, as msgpack decodes them."""
    return isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and _is_int(p[0])
        and isinstance(p[1], (int, float)) and not isinstance(p[1], bool) for p in value)


def _prompt_logprob(message: str, name: str, entry: object) -> PromptLogprob:
    """A decoded [logprob, rank, [[id, logprob], ...]] as a PromptLogprob."""
    if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], (int, float))
            and not isinstance(entry[0], bool) and _is_int(entry[1]) and _is_pairs(entry[2])):
        raise MalformedMessage(f"{message}.{name} must hold [logprob, rank, [[id, logprob], ...]] entries")
    return PromptLogprob(float(entry[0]), entry[1], tuple((int(a), float(b)) for a, b in entry[2]))
