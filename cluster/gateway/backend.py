"""What the gateway's request path needs from whatever runs the model.

`Backend.generate` streams one request's `TokenDelta`s; closing the stream early aborts
the request wherever it runs. `Backend.generate_group` streams n sequences of one prompt
(OpenAI's `n`, `best_of`), whose prompt KV is computed once and shared. The cluster's backend
(`pdserve.cluster.control.cluster_backend.ClusterBackend`) routes across Ray workers;
`LocalBackend` runs one in-process engine (the gateway tests). Neither engine is
imported here: the gateway imports no engine code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from pdserve.cluster.gateway.errors import ErrorKind, RequestError
from pdserve.cluster.gateway.request_record import RequestRecord
from pdserve.runtime.request import TokenDelta
from pdserve.runtime.sampling_params import SamplingParams


class Backend(Protocol):
    def ready(self) -> bool:
        """True when a request sent now can be served (some worker is up)."""

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 record: RequestRecord | None = None) -> AsyncIterator[TokenDelta]:
        """Stream the request's deltas; the last carries a finish reason. Raises
        RequestError (before any delta) when the request cannot be taken: OVERLOADED
        past a queue bound, UNAVAILABLE with no worker, INVALID_ARGUMENT when a worker
        refuses it. Closing the iterator early aborts the request and frees its KV.
        The backend writes its route, prefill report, fallbacks and migrations into
        `record` as they happen."""

    def generate_group(self, request_ids: list[str], prompt_ids: list[int], params: list[SamplingParams],
                       records: list[RequestRecord] | None = None) -> list[AsyncIterator[TokenDelta]]:
        """n sequences of one prompt: iterator i streams request `request_ids[i]` with
        `params[i]` exactly as `generate` would (the same errors before its first delta;
        closing it aborts that sequence only). The prompt's KV is computed (and, between
        workers, transferred) once: sequence 0 leads, and the others share its prompt's
        pages, computing only the last partial page each. Start iterator 0 first, or all
        of them together; an iterator started before it is served on its own."""


class LocalEngine(Protocol):
    """What `LocalBackend` needs of `pdserve.engine.async_engine.AsyncEngine`."""

    is_alive: bool
    num_waiting: int

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 *, follows: str | None = None) -> AsyncIterator[TokenDelta]: ...


class LocalBackend:
    """One `AsyncEngine` in this process; refuses past `max_waiting` queued requests."""

    def __init__(self, engine: LocalEngine, max_waiting: int | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting

    def ready(self) -> bool:
        return self.engine.is_alive

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 record: RequestRecord | None = None) -> AsyncIterator[TokenDelta]:
        return self._stream(request_id, prompt_ids, params, None, record)

    def generate_group(self, request_ids: list[str], prompt_ids: list[int], params: list[SamplingParams],
                       records: list[RequestRecord] | None = None) -> list[AsyncIterator[TokenDelta]]:
        """Sequence 0 leads; the others follow it in the engine, which shares the prompt's
        pages among them through its prefix cache."""
        if not request_ids or len(request_ids) != len(params):
            raise ValueError(f"a group needs one SamplingParams per request id: {len(request_ids)} ids, "
                             f"{len(params)} params")
        leader = request_ids[0]
        records = records or [None] * len(request_ids)
        return [self._stream(request_id, prompt_ids, p, None if i == 0 else leader, record)
                for i, (request_id, p, record) in enumerate(zip(request_ids, params, records))]

    async def _stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      follows: str | None, record: RequestRecord | None) -> AsyncIterator[TokenDelta]:
        if not self.engine.is_alive:
            raise RequestError(ErrorKind.UNAVAILABLE, "the engine is not running")
        if self.max_waiting is not None and self.engine.num_waiting >= self.max_waiting:
            raise RequestError(ErrorKind.OVERLOADED, f"{self.engine.num_waiting} requests are queued "
                               f"(limit {self.max_waiting}); retry shortly", retry_after=1)
        stream = self.engine.generate(prompt_ids, params, request_id, follows=follows)
        if record is not None:
            record.routed("local" if follows is None else "group", "local", None)
        try:
            async for delta in stream:
                yield delta
        except ValueError as exc:  # RequestRejected: the engine can never run it
            raise RequestError(ErrorKind.INVALID_ARGUMENT, str(exc)) from None
        except RuntimeError as exc:  # it shut down between the check above and now
            raise RequestError(ErrorKind.UNAVAILABLE, str(exc)) from None
        finally:
            await stream.aclose()
