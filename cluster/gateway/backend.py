"""What the gateway's request path needs from whatever runs the model.

`Backend.generate` streams one request's `TokenDelta`s; closing the stream early aborts
the request wherever it runs. The cluster's backend
(`pdserve.cluster.control.cluster_backend.ClusterBackend`) routes across Ray workers;
`LocalBackend` runs one in-process engine (the gateway tests). Neither engine is
imported here: the gateway imports no engine code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from pdserve.cluster.gateway.errors import ErrorKind, RequestError
from pdserve.runtime.request import TokenDelta
from pdserve.runtime.sampling_params import SamplingParams


class Backend(Protocol):
    def ready(self) -> bool:
        """True when a request sent now can be served (some worker is up)."""

    def generate(self, request_id: str, prompt_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[TokenDelta]:
        """Stream the request's deltas; the last carries a finish reason. Raises
        RequestError (before any delta) when the request cannot be taken: OVERLOADED
        past a queue bound, UNAVAILABLE with no worker, INVALID_ARGUMENT when a worker
        refuses it. Closing the iterator early aborts the request and frees its KV."""


class LocalEngine(Protocol):
    """What `LocalBackend` needs of `pdserve.engine.async_engine.AsyncEngine`."""

    is_alive: bool
    num_waiting: int

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[TokenDelta]: ...


class LocalBackend:
    """One `AsyncEngine` in this process; refuses past `max_waiting` queued requests."""

    def __init__(self, engine: LocalEngine, max_waiting: int | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting

    def ready(self) -> bool:
        return self.engine.is_alive

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[TokenDelta]:
        if not self.engine.is_alive:
            raise RequestError(ErrorKind.UNAVAILABLE, "the engine is not running")
        if self.max_waiting is not None and self.engine.num_waiting >= self.max_waiting:
            raise RequestError(ErrorKind.OVERLOADED, f"{self.engine.num_waiting} requests are queued "
                               f"(limit {self.max_waiting}); retry shortly", retry_after=1)
        stream = self.engine.generate(prompt_ids, params, request_id)
        try:
            async for delta in stream:
                yield delta
        except ValueError as exc:  # RequestRejected: the engine can never run it
            raise RequestError(ErrorKind.INVALID_ARGUMENT, str(exc)) from None
        except RuntimeError as exc:  # it shut down between the check above and now
            raise RequestError(ErrorKind.UNAVAILABLE, str(exc)) from None
        finally:
            await stream.aclose()
