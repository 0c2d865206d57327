"""`ClusterBackend`: the gateway's path to the Ray workers.

    route -> D.generate(remote=P is not None)  ==stream==> first item: KVTicket (or None)
          -> P.prefill(PrefillJob(ticket, D's KV address))  (concurrently; P pushes KV to D)
          <== TokenDeltas from D, as D produces them (a Ray streaming generator, not polling)

Failure semantics: a refused or failed prefill tells D at once (`fail_remote`), and D
recomputes the prompt or fails the request per its policy. A decode worker lost under a
request (its process died, the controller replaced it as hung, or a drain ran out of
time) does not end the request: it migrates. The gateway re-admits it on another decode
worker with the prompt + every token already streamed as its new prompt (prefilled
remotely or locally by the usual rule), `max_tokens` reduced by those, queued ahead of
new arrivals and with its seeded draws continuing from the same output position; the
client's stream simply goes on, without a repeated or missing token, and its usage counts
the original prompt. A greedy or seeded request continues exactly as it would have. After
`max_migrations` moves (or with none allowed) the request ends with UNAVAILABLE. The
controller hears of every death at once. Leaving the stream early aborts the request on
D and P, which frees its KV on both.

Groups (`generate_group`: n sequences of one prompt) compute and ship the prompt's KV
once. Sequence 0, the leader, is routed as any request; once it is placed in its decode
worker's engine (its ticket came back, or at once when D prefills it), the followers go
to that same worker with `remote=False, follows=<leader id>`: D holds them until the
leader's KV is there and then serves their prompt from its prefix cache, computing only
the last partial page of each. A follower whose leader failed or left before it was
placed, or was never started (a caller consuming a follower's stream first), is routed
on its own; a follower whose decode worker is lost migrates like any request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from ray.exceptions import RayActorError, RayTaskError

from pdserve.cluster.control.controller import Controller, WorkerHandle
from pdserve.cluster.control.router import Router
from pdserve.cluster.control.slo_control import SLOControl
from pdserve.cluster.gateway.errors import ErrorKind, RequestError
from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.cluster.gateway.request_record import PrefillReport, RequestRecord
from pdserve.cluster.workers.actors import Refused
from pdserve.kv_transfer.messages import KVTicket, PrefillJob, PrefillResult
from pdserve.runtime.request import TokenDelta
from pdserve.runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_MAX_MIGRATIONS = 3  # moves to another decode worker per request
MIGRATION_WAIT_S = 120.0  # how long a migrating request waits for a decode worker to be up


class ClusterBackend:
    def __init__(self, controller: Controller, router: Router, metrics: GatewayMetrics,
                 max_migrations: int = DEFAULT_MAX_MIGRATIONS, slo: SLOControl | None = None) -> None:
        self.controller = controller
        self.router = router
        self.metrics = metrics
        self.max_migrations = max_migrations
        self.slo = slo  # with the SLO planner: sheds new requests that would miss the TTFT target

    def ready(self) -> bool:
        return bool(self.controller.members("decode"))

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 record: RequestRecord | None = None) -> AsyncIterator[TokenDelta]:
        record = record or RequestRecord(request_id, len(prompt_ids))

        async def first_route() -> _InFlight:
            return self._route(request_id, prompt_ids, params, None, record)

        return self._serve(request_id, prompt_ids, params, first_route, record)

    def generate_group(self, request_ids: list[str], prompt_ids: list[int], params: list[SamplingParams],
                       records: list[RequestRecord] | None = None) -> list[AsyncIterator[TokenDelta]]:
        """One stream per sequence, each as `generate` would stream it; the prompt's KV is
        computed and transferred once (module docstring). Start stream 0 first (or all
        together) for the others to share it."""
        if not request_ids or len(request_ids) != len(params):
            raise ValueError(f"a group needs one SamplingParams per request id: {len(request_ids)} ids, "
                             f"{len(params)} params")
        placement = _Placement(request_ids[0])
        records = records or [RequestRecord(request_id, len(prompt_ids)) for request_id in request_ids]

        async def lead() -> _InFlight:
            placement.started = True
            try:
                return self._route(request_ids[0], prompt_ids, params[0], None, records[0], placement=placement)
            except BaseException:
                placement.settle(None)
                raise

        def follow(request_id: str, sequence_params: SamplingParams,
                   record: RequestRecord) -> Callable[[], Awaitable[_InFlight]]:
            return lambda: self._follow(placement, request_id, prompt_ids, sequence_params, record)

        streams = [self._serve(request_ids[0], prompt_ids, params[0], lead, records[0])]
        streams += [self._serve(request_id, prompt_ids, p, follow(request_id, p, record), record)
                    for request_id, p, record in zip(request_ids[1:], params[1:], records[1:])]
        return streams

    async def _follow(self, placement: _Placement, request_id: str, prompt_ids: list[int],
                      params: SamplingParams, record: RequestRecord) -> _InFlight:
        """A follower's first route: its leader's decode worker, or its own route when the
        leader has none to offer (see `_Placement.wait`) or that worker takes no new requests."""
        decode = await placement.wait()
        if decode is None or decode not in self.controller.members("decode"):
            log.info("request %s: its group's leader %s is on no decode worker it can join; routing it on its own",
                     request_id, placement.leader_id)
            return self._route(request_id, prompt_ids, params, None, record)
        self.metrics.routed(decode.worker_id, "group")  # D prefills only its last partial page
        record.routed("group", decode.worker_id, None)
        return _InFlight(self, request_id, prompt_ids, params, decode, None, None, record,
                         follows=placement.leader_id)

    async def _serve(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     first_route: Callable[[], Awaitable[_InFlight]],
                     record: RequestRecord) -> AsyncIterator[TokenDelta]:
        """Stream the request from its first route (`first_route()`), then, each time its
        decode worker is lost, from a new route that carries the tokens sent so far."""
        sent: list[int] = []  # output token ids yielded so far, over every attempt
        lost_at: float | None = None  # when the last decode worker was lost under it
        for attempt in itertools.count():
            # Each attempt its own id on the workers, so nothing left of an earlier one (a
            # late ticket, a prefill job still running) can settle or abort this one.
            attempt_id = request_id if attempt == 0 else f"{request_id}.m{attempt}"
            if attempt == 0:
                request = await first_route()
            else:
                await self._wait_for_a_decode_worker(request_id)
                remaining = dataclasses.replace(params, max_tokens=params.max_tokens - len(sent))
                request = self._route(attempt_id, prompt_ids + sent, remaining, len(sent), record)
            try:
                async for delta in request.run():
                    if attempt:  # usage speaks of the client's prompt, not the carried tokens
                        delta = delta._replace(num_prompt_tokens=len(prompt_ids),
                                               num_cached_tokens=min(delta.num_cached_tokens, len(prompt_ids)))
                        if lost_at is not None and (delta.token_ids or delta.finish_reason is not None):
                            self.metrics.migration_took(time.monotonic() - lost_at)
                            lost_at = None
                    sent.extend(delta.token_ids)
                    yield delta
                return
            except RequestError:
                if not request.decode_lost:
                    raise
                lost = request.decode.worker_id
                reason = self.controller.departure_reason(lost)
                if attempt >= self.max_migrations:
                    raise RequestError(ErrorKind.UNAVAILABLE, f"decode worker {lost} was lost under this request "
                                       f"({reason}) after {len(sent)} tokens, and it has moved {attempt} times "
                                       f"already (limit --max-migrations {self.max_migrations}); retry it") from None
                lost_at = time.monotonic()
                self.metrics.migrated(reason)
                record.migrated(lost, reason, len(sent))
                log.warning("request %s: decode worker %s lost (%s) after %d tokens; migrating (move %d of at most %d)",
                            request_id, lost, reason, len(sent), attempt + 1, self.max_migrations)

    async def _wait_for_a_decode_worker(self, request_id: str) -> None:
        deadline = time.monotonic() + MIGRATION_WAIT_S
        while not self.controller.members("decode"):
            if time.monotonic() > deadline:
                raise RequestError(ErrorKind.UNAVAILABLE, f"request {request_id} lost its decode worker and no "
                                   f"other came up within {MIGRATION_WAIT_S:.0f} s; retry it", retry_after=5)
            await asyncio.sleep(0.1)

    def _route(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               resume_at: int | None, record: RequestRecord, placement: _Placement | None = None) -> _InFlight:
        links = self.controller.links
        decode_workers = self.controller.members("decode")
        prefill_workers = [p for p in self.controller.members("prefill") if links.has_up(p.worker_id)]
        route = self.router.route(prompt_ids, [w.view() for w in decode_workers],
                                  [w.view() for w in prefill_workers])
        if route is None:
            raise RequestError(ErrorKind.UNAVAILABLE, "no decode worker is ready; retry shortly", retry_after=1)
        if route.unmet_prefill_tokens:
            self.controller.note_unmet_prefill(route.unmet_prefill_tokens)
        self.controller.note_routed_prompt(len(prompt_ids) - route.cached_tokens)
        decode = self.controller.workers[route.decode]
        prefill = self.controller.workers.get(route.prefill) if route.prefill else None
        path = "remote" if prefill is not None else "local"
        unlinked = prefill is not None and links.address(prefill.worker_id, decode.worker_id) is None
        if unlinked:
            # The pair's link is down (logged, retried, in pdserve_kv_links): prefill on D, counted.
            unlinked_from, prefill, path = prefill.worker_id, None, "unlinked"
        if self.slo is not None and resume_at is None:  # a migrating request is never refused
            prefiller, uncached = prefill if prefill is not None else decode, len(prompt_ids) - route.cached_tokens
            try:
                self.slo.admit(request_id, uncached, prefiller.in_flight_tokens, remote=prefill is not None)
            except RequestError:
                if prefill is not None:  # demand all the same: the planner sizes prefill for it
                    self.controller.note_unmet_prefill(uncached)
                raise
        self.metrics.routed(decode.worker_id, path)
        record.routed(path, decode.worker_id, prefill.worker_id if prefill is not None else None)
        if unlinked:
            record.fell_back(f"the KV link {unlinked_from} -> {decode.worker_id} is down; prefilled on the decode worker")
        return _InFlight(self, request_id, prompt_ids, params, decode, prefill, resume_at, record,
                         placement=placement)


class _Placement:
    """Where a group's leader went, for its followers to join it. Settled once: with the
    leader's decode worker as soon as the leader is in that worker's engine, or with None
    when the leader failed or left before that."""

    def __init__(self, leader_id: str) -> None:
        self.leader_id = leader_id
        self.started = False  # the leader's stream began: a settlement is coming
        self.decode: WorkerHandle | None = None
        self._settled = asyncio.Event()

    def settle(self, decode: WorkerHandle | None) -> None:
        if not self._settled.is_set():
            self.decode = decode
            self._settled.set()

    async def wait(self) -> WorkerHandle | None:
        """The leader's decode worker; None when the leader failed before it was placed,
        or has not started (nothing may ever start it: a follower never waits on it then)."""
        if not self.started:
            return None
        await self._settled.wait()
        return self.decode


def _tail_tokens(num_prompt_tokens: int, block_size: int) -> int:
    """The prompt tokens a follower computes: those after the last full page that leaves
    at least one token to compute (the full pages come from its leader)."""
    return num_prompt_tokens - (num_prompt_tokens - 1) // block_size * block_size


class _InFlight:
    """One request on its way through the cluster; owns the gateway's counters for it."""

    def __init__(self, backend: ClusterBackend, request_id: str, prompt_ids: list[int],
                 params: SamplingParams, decode: WorkerHandle, prefill: WorkerHandle | None,
                 resume_at: int | None, record: RequestRecord, follows: str | None = None,
                 placement: _Placement | None = None) -> None:
        self.backend = backend
        self.record = record  # the gateway's account of the request: this attempt writes its part
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.resume_at = resume_at  # a migrated request's carried output tokens (None: a new one)
        self.follows = follows  # its group's leader, already on `decode` (None: not a follower)
        self.placement = placement  # a group leader's: settled once the leader is placed on `decode`
        self.decode = decode
        self.prefill = prefill
        self.prefill_task: asyncio.Task | None = None
        self.routed_at = time.monotonic()
        self.first_token_at: float | None = None
        self.prefill_result: PrefillResult | None = None
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
            if self.follows is not None:
                self.local_prefill_tokens = _tail_tokens(len(self.prompt_ids), decode.info.block_size)
            decode.in_flight_tokens += self.local_prefill_tokens
        finished = False
        follows = () if self.follows is None else (self.follows,)
        stream = decode.actor.generate.remote(self.request_id, self.prompt_ids, self.params, prefill is not None,
                                              self.resume_at, *follows)
        if prefill is None:
            self._placed()  # D prefills it: in D's queue before any request sent after this call
        try:
            async for ref in stream:
                item = await ref
                if isinstance(item, Refused):
                    if item.engine_dead:  # this worker is done for: replace it, move the request
                        self.decode_lost = True
                        self.backend.controller.worker_died(decode, item.message, "engine_died")
                    raise RequestError(ErrorKind[item.kind], item.message, retry_after=item.retry_after)
                if not isinstance(item, TokenDelta):  # remote mode's first item: the ticket or None
                    self._placed()
                    self._start_prefill(item)
                    continue
                if self.first_token_at is None and item.token_ids:
                    self.first_token_at = time.monotonic()
                    self._release_local_prefill()
                    self._record_ttft_split()
                finished = item.finish_reason is not None
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
            if self.placement is not None:
                self.placement.settle(None)  # failed or left before it was placed: no-op otherwise
            decode.in_flight -= 1
            self._release_local_prefill()
            if self.prefill_task is None:
                self._release_prefill()  # no ticket came: the prefill worker never got the job
            if not finished:
                decode.actor.abort.remote(self.request_id)
            if not finished and self.prefill_task is not None and not self.prefill_task.done():
                self.prefill_task.cancel()  # a finished request's prefill reply is due; let it land

    def _placed(self) -> None:
        """The request is in its decode worker's engine: its group's followers may join it."""
        if self.placement is not None:
            self.placement.settle(self.decode)

    def _start_prefill(self, ticket: KVTicket | None) -> None:
        prefill = self.prefill
        if ticket is None or prefill is None:
            if prefill is not None:
                self.record.fell_back(f"decode worker {self.decode.worker_id} had no room to reserve the "
                                      "prompt's KV; it prefills the prompt itself")
            self._release_prefill()  # no room on D now: D prefills it itself
            return
        address = self.backend.controller.links.address(prefill.worker_id, self.decode.worker_id)
        if address is None:
            reason = f"prefill worker {prefill.worker_id} lost its link to {self.decode.worker_id}"
            self.decode.actor.fail_remote.remote(self.request_id, reason)
            self.record.fell_back(reason)
            self._release_prefill()
            return
        job = PrefillJob(ticket, address, self.prompt_ids, self.params, self.resume_at, self.record.traceparent)
        self.record.prefill_sent_at = time.monotonic()
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
        except RayTaskError as exc:  # a bug on the prefill worker: this job fails, D recomputes per policy
            log.error("prefill worker %s failed request %s: %s", prefill.worker_id, self.request_id, exc)
            result = Refused("INTERNAL", f"prefill worker {prefill.worker_id} failed this job")
        finally:
            self._release_prefill()
        if isinstance(result, Refused) and result.engine_dead:
            self.backend.controller.worker_died(prefill, result.message, "engine_died")
        self._report(job, prefill.worker_id, result)
        if isinstance(result, Refused) or not result.ok:
            reason = result.message if isinstance(result, Refused) else result.reason
            self.decode.actor.fail_remote.remote(self.request_id, reason)
            self.record.fell_back(f"prefill on {prefill.worker_id} failed ({reason}); the decode worker "
                                  "handles it per --on-transfer-failure")
            return
        self.prefill_result = result
        self._record_ttft_split()

    def _report(self, job: PrefillJob, worker: str, result: PrefillResult | Refused) -> None:
        """The prefill worker's account of the job, into the request's record."""
        ticket, transport = job.ticket, job.address.split("://", 1)[0]
        pages = -(-ticket.num_prompt_tokens // ticket.layout.block_size) - ticket.first_page
        if isinstance(result, Refused):
            self.record.prefill = PrefillReport(worker, 0.0, 0.0, 0.0, pages, 0, transport, False, result.message)
            return
        self.record.prefill = PrefillReport(worker, result.queue_seconds, result.compute_seconds,
                                            result.transfer_tail_seconds, pages, result.kv_bytes, transport,
                                            result.ok, result.reason)

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
        if self.first_token_at is None or result is None or self.resume_at is not None:
            return  # a migrated request's first token here is not its time to first token
        self.prefill_result = None  # record once
        ttft = self.first_token_at - self.routed_at
        stages = {"prefill_queue": result.queue_seconds, "prefill_compute": result.compute_seconds,
                  "kv_transfer": result.transfer_tail_seconds}
        stages["first_decode_step"] = ttft - sum(stages.values())
        self.backend.metrics.observe_ttft_split(stages)
