"""`ClusterBackend`: the gateway's path to the Ray workers.

    route -> D.generate(remote=P is not None)  ==stream==> first item: KVTicket (or None)
          -> P.prefill(PrefillJob(ticket, D's KV address))  (concurrently; P pushes KV to D)
          <== TokenDeltas from D, as D produces them (a Ray streaming generator, not polling)

Failure semantics: a refused or failed prefill tells D at once (`fail_remote`), and D
recomputes the prompt or fails the request per its policy. A decode worker found dead
before it produced any token is retried once on another worker; after that, or once
tokens have been streamed, the request ends with UNAVAILABLE. Either way the controller
hears of the death at once. Leaving the stream early aborts the request on D and P,
which frees its KV on both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from ray.exceptions import RayActorError, RayTaskError

from pdserve.cluster.control.controller import Controller, WorkerHandle
from pdserve.cluster.control.router import Router
from pdserve.cluster.gateway.errors import ErrorKind, RequestError
from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.cluster.workers.actors import Refused
from pdserve.kv_transfer.messages import KVTicket, PrefillJob, PrefillResult
from pdserve.runtime.request import TokenDelta
from pdserve.runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # decode workers tried for one request (a retry only before any output)


class ClusterBackend:
    def __init__(self, controller: Controller, router: Router, metrics: GatewayMetrics) -> None:
        self.controller = controller
        self.router = router
        self.metrics = metrics

    def ready(self) -> bool:
        return bool(self.controller.members("decode"))

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[TokenDelta]:
        for attempt in range(MAX_ATTEMPTS):
            # Each attempt its own id on the workers, so nothing left of an earlier one (a
            # late ticket, a prefill job still running) can settle or abort this one.
            attempt_id = request_id if attempt == 0 else f"{request_id}.retry{attempt}"
            request = self._route(attempt_id, prompt_ids, params)
            try:
                async for delta in request.run():
                    yield delta
                return
            except RequestError:
                if not request.decode_lost or request.num_deltas or attempt == MAX_ATTEMPTS - 1:
                    raise
                log.warning("retrying request %s: decode worker %s died before its first token",
                            request_id, request.decode.worker_id)

    def _route(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> _InFlight:
        links = self.controller.links
        decode_workers = self.controller.members("decode")
        prefill_workers = [p for p in self.controller.members("prefill") if links.has_up(p.worker_id)]
        route = self.router.route(prompt_ids, [w.view() for w in decode_workers],
                                  [w.view() for w in prefill_workers])
        if route is None:
            raise RequestError(ErrorKind.UNAVAILABLE, "no decode worker is ready; retry shortly", retry_after=1)
        if route.unmet_prefill_tokens:
            self.controller.note_unmet_prefill(route.unmet_prefill_tokens)
        decode = self.controller.workers[route.decode]
        prefill = self.controller.workers.get(route.prefill) if route.prefill else None
        path = "remote" if prefill is not None else "local"
        if prefill is not None and links.address(prefill.worker_id, decode.worker_id) is None:
            # The pair's link is down (logged, retried, in pdserve_kv_links): prefill on D, counted.
            prefill, path = None, "unlinked"
        self.metrics.routed(decode.worker_id, path)
        return _InFlight(self, request_id, prompt_ids, params, decode, prefill)


class _InFlight:
    """One request on its way through the cluster; owns the gateway's counters for it."""

    def __init__(self, backend: ClusterBackend, request_id: str, prompt_ids: list[int],
                 params: SamplingParams, decode: WorkerHandle, prefill: WorkerHandle | None) -> None:
        self.backend = backend
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.decode = decode
        self.prefill = prefill
        self.prefill_task: asyncio.Task | None = None
        self.routed_at = time.monotonic()
        self.first_token_at: float | None = None
        self.prefill_result: PrefillResult | None = None
        self.num_deltas = 0  # yielded to the caller
        self.decode_lost = False  # the decode worker's process died under this request
        self.local_prefill_tokens = 0  # counted in the decode worker's backlog until the first token

    async def run(self) -> AsyncIterator[TokenDelta]:
        decode, prefill = self.decode, self.prefill
        decode.in_flight += 1
        if prefill is not None:
            prefill.in_flight += 1
            prefill.in_flight_tokens += len(self.prompt_ids)
        else:  # prefilled on the decode worker: its backlog until the first token
            self.local_prefill_tokens = len(self.prompt_ids)
            decode.in_flight_tokens += self.local_prefill_tokens
        finished = False
        stream = decode.actor.generate.remote(self.request_id, self.prompt_ids, self.params, prefill is not None)
        try:
            async for ref in stream:
                item = await ref
                if isinstance(item, Refused):
                    raise RequestError(ErrorKind[item.kind], item.message, retry_after=item.retry_after)
                if not isinstance(item, TokenDelta):  # remote mode's first item: the ticket or None
                    self._start_prefill(item)
                    continue
                if self.first_token_at is None and item.token_ids:
                    self.first_token_at = time.monotonic()
                    self._release_local_prefill()
                    self._record_ttft_split()
                finished = item.finish_reason is not None
                self.num_deltas += 1
                yield item
        except RayActorError as exc:
            self.decode_lost = True
            self.backend.controller.worker_died(decode, f"its process died ({exc.__class__.__name__})")
            raise RequestError(ErrorKind.UNAVAILABLE, f"decode worker {decode.worker_id} died while serving "
                               "this request; retry it") from exc
        except RayTaskError as exc:
            log.error("decode worker %s failed request %s: %s", decode.worker_id, self.request_id, exc)
            raise RequestError(ErrorKind.INTERNAL, f"decode worker {decode.worker_id} failed this request; "
                               "retry it") from exc
        finally:
            decode.in_flight -= 1
            self._release_local_prefill()
            if self.prefill_task is None:
                self._release_prefill()  # no ticket came: the prefill worker never got the job
            if not finished:
                decode.actor.abort.remote(self.request_id)
            if not finished and self.prefill_task is not None and not self.prefill_task.done():
                self.prefill_task.cancel()  # a finished request's prefill reply is due; let it land

    def _start_prefill(self, ticket: KVTicket | None) -> None:
        prefill = self.prefill
        if ticket is None or prefill is None:
            self._release_prefill()  # no room on D now: D prefills it itself
            return
        address = self.backend.controller.links.address(prefill.worker_id, self.decode.worker_id)
        if address is None:
            self.decode.actor.fail_remote.remote(self.request_id, f"prefill worker {prefill.worker_id} lost "
                                                   f"its link to {self.decode.worker_id}")
            self._release_prefill()
            return
        job = PrefillJob(ticket, address, self.prompt_ids, self.params)
        self.prefill_task = asyncio.create_task(self._prefill(job))

    async def _prefill(self, job: PrefillJob) -> None:
        prefill = self.prefill
        try:
            result = await prefill.actor.prefill.remote(job)
        except asyncio.CancelledError:
            prefill.actor.abort.remote(self.request_id)
            raise
        except RayActorError as exc:
            result = Refused("UNAVAILABLE", f"prefill worker {prefill.worker_id} died")
            self.backend.controller.worker_died(prefill, f"its process died ({exc.__class__.__name__})")
        finally:
            self._release_prefill()
        if isinstance(result, Refused) or not result.ok:
            reason = result.message if isinstance(result, Refused) else result.reason
            self.decode.actor.fail_remote.remote(self.request_id, reason)
            return
        self.prefill_result = result
        self._record_ttft_split()

    def _release_local_prefill(self) -> None:
        self.decode.in_flight_tokens -= self.local_prefill_tokens
        self.local_prefill_tokens = 0

    def _release_prefill(self) -> None:
        if self.prefill is not None:
            self.prefill.in_flight -= 1
            self.prefill.in_flight_tokens -= len(self.prompt_ids)
            self.prefill = None

    def _record_ttft_split(self) -> None:
        """Split the time to first token of a disaggregated request by stage, once both
        the first token and the prefill worker's report are here (either comes first).
        The stages are measured where they happen; the first decode step is the rest
        (D settling the transfer plus the stream to the gateway)."""
        result = self.prefill_result
        if self.first_token_at is None or result is None:
            return
        self.prefill_result = None  # record once
        ttft = self.first_token_at - self.routed_at
        stages = {"prefill_queue": result.queue_seconds, "prefill_compute": result.compute_seconds,
                  "kv_transfer": result.transfer_tail_seconds}
        stages["first_decode_step"] = ttft - sum(stages.values())
        self.backend.metrics.observe_ttft_split(stages)
