"""The controller: worker membership, KV links between workers, health, replacement.

It runs on the gateway's event loop and owns the list of workers. Every `poll_interval`
it asks each worker for its stats; the answer is the health check, refreshes the numbers
the router, `/metrics` (and the autoscaler) read, and carries the worker's numbered
prefix-cache events into the router's `PrefixIndex` (a gap in the numbers - a reply
lost to a timeout, events dropped on the worker - makes it reload that worker's whole
cache from a snapshot). A worker is replaced from the same `WorkerSpec` when its process
died, when it misses `max_missed_polls` polls in a row, or when its engine thread died
or made no progress for `spec.engine_hang_timeout` seconds (the stats say, from the
actor's own thread); its requests end with a clear error at the gateway.

The monitor loop survives its own failures: an exception in a round (or in one
worker's poll) is logged and counted (`num_errors`, `pdserve_controller_errors_total`)
and the next round runs as usual.

With an `Autoscaler` (queue depth) or an `SLOPlanner` (latency targets), each poll round
also asks it for the number of workers per role:
new workers are started like replacements; a worker to remove is drained first - it
leaves the router's view at once, finishes the requests it holds, and only then stops -
so scaling down loses no request. Every decision goes to `on_decision` (metrics, log); after
each round, `after_scaling` runs (with the planner: its plan applied, `slo_control`).

CPU placement: the controller is the one owner of which cores a worker gets. At start it
picks a plan (`pdserve.runtime.threads`). When every node that offers a role resource is
this process's node (local Ray, or a one-node cluster; not a `ray://` client): one
`CoreLedger` over this process's cores for both roles, sized for the most workers that may
run at once. Otherwise, per role, an `UnpinnedPlan` with the CPUs per role slot of the
nodes that offer the role (the fewest of them; 1 while none is up). A worker's placement is
claimed before its actor starts, passed to it, and asks Ray for as many CPUs; a replacement
claims with the placement it replaces (so it gets the same cores); a stopped worker's
cores are released.

KV links (`kv_links.KVLinks`): for each (prefill, decode) pair the transport is chosen by
measurement (`transports.select`): for every transport that can work between the two (or
only the one the spec forces) the decode worker opens a listener and issues a probe
ticket, the prefill worker times a short real transfer to it, and the fastest that passed
carries the pair's KV (the table is logged). A worker is registered before its links are made, and lists the workers of the
other role in the same event-loop turn, so of two workers starting together the later
one always sees the earlier: every pair gets linked whatever the start order (an attempt
already running for a pair is shared). At start-up a link that cannot work fails
start-up loudly; later (replacements, scale-ups) a failed link is marked down, logged and
retried with backoff, and requests between that pair are prefilled on the decode worker
and counted as such (`pdserve_routes_total{prefill="unlinked"}`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from pdserve.cluster.control.autoscaler import Autoscaler, Decision
from pdserve.cluster.control.kv_links import KVLinks
from pdserve.cluster.control.planner import SLOPlanner
from pdserve.cluster.control.router import PrefixIndex, WorkerView
from pdserve.cluster.gateway.metrics import ControlPlaneStatus
from pdserve.cluster.workers.actors import DecodeWorker, PrefillWorker, WorkerInfo
from pdserve.cluster.workers.spec import ROLES, WorkerSpec
from pdserve.cluster.workers.stats import WorkerStats
from pdserve.kv_transfer.layout import chunk_nbytes
from pdserve.kv_transfer.transports.select import (
    PROBE_PAGES,
    PROBE_REPEATS,
    LayoutMismatch,
    candidate_transports,
    fastest,
    transport_table,
)
from pdserve.runtime.threads import CoreLedger, CpuPlacement, UnpinnedPlan, available_cores, format_cores

log = logging.getLogger(__name__)

_CLASSES = {"prefill": PrefillWorker, "decode": DecodeWorker}
MAX_DEPARTURES = 1024  # departure reasons remembered (for requests still migrating off them)


class WorkerStartError(RuntimeError):
    """A worker (or a KV link to it) could not be started; the message says why."""


@dataclass(eq=False)
class WorkerHandle:
    worker_id: str
    role: str
    actor: ray.actor.ActorHandle
    info: WorkerInfo
    placement: CpuPlacement  # what the controller claimed for it (info says what it runs on)
    stats: WorkerStats | None = None
    missed_polls: int = 0
    in_flight: int = 0  # requests this gateway has on it now
    in_flight_tokens: int = 0  # prompt tokens of those still to prefill on it
    ready: bool = False  # registered and its KV links attempted: it takes requests
    draining: bool = False  # being removed: no new requests, stops once it holds none

    @property
    def idle(self) -> bool:
        """Holds no request: none from this gateway in flight, none queued or running."""
        s = self.stats
        return self.in_flight == 0 and (s is None or not (s.num_running or s.num_waiting or s.num_waiting_for_kv))

    def view(self) -> WorkerView:
        usage = self.stats.kv_usage if self.stats is not None else 0.0
        return WorkerView(self.worker_id, self.in_flight, self.in_flight_tokens, usage)


class Controller:
    def __init__(self, spec: WorkerSpec, num_prefill: int, num_decode: int, index: PrefixIndex,
                 cpus_per_worker: float = 1.0, poll_interval: float = 0.5, poll_timeout: float = 10.0,
                 max_missed_polls: int = 3, autoscaler: Autoscaler | SLOPlanner | None = None,
                 on_decision: Callable[[Decision], None] | None = None, drain_timeout: float = 600.0,
                 after_scaling: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.target = {"prefill": num_prefill, "decode": num_decode}
        self.index = index
        self.cpus_per_worker = cpus_per_worker  # the fewest Ray CPUs a worker asks for
        self.poll_interval = poll_interval
        self.poll_timeout = poll_timeout
        self.max_missed_polls = max_missed_polls
        self.autoscaler = autoscaler
        self.on_decision = on_decision
        self.after_scaling = after_scaling  # called after every autoscaler round (the SLO plan's appliers)
        self.drain_timeout = drain_timeout
        self.workers: dict[str, WorkerHandle] = {}  # registered: starting (not ready), serving, draining
        self.links = KVLinks()
        self.num_replaced = 0
        self.num_errors = 0  # monitor-loop failures (logged, counted, survived)
        self.unmet_prefill_tokens = 0  # routed prompt tokens that found no prefill worker (autoscaler)
        self._unmet_seen = 0  # the part of it the autoscaler has seen
        self._routed_prompts: list[int] = []  # uncached tokens per prompt routed since the last scaling round
        self._link_tasks: dict[tuple[str, str], asyncio.Task] = {}
        self._departures: collections.OrderedDict[str, str] = collections.OrderedDict()  # worker -> reason
        self._next_id = {"prefill": 0, "decode": 0}
        self._monitor: asyncio.Task | None = None
        self._replacing: set[asyncio.Task] = set()  # starting (replacements and scale-ups) and draining
        self._start_progress: tuple[int, int] | None = None  # while start() runs: (workers up, workers to start)
        self._starting = {"prefill": 0, "decode": 0}
        self._cpus: Mapping[str, CoreLedger | UnpinnedPlan] = {}  # role -> its plan, set by start()

    # ------------------------------------------------------------------ membership

    def members(self, role: str) -> list[WorkerHandle]:
        """The workers of `role` that take new requests (ready, not draining)."""
        return [w for w in self.workers.values() if w.role == role and w.ready and not w.draining]

    def counts(self) -> dict[tuple[str, str], int]:
        """(role, state) -> number of workers; state is starting, serving or draining."""
        out = {(role, "starting"): n for role, n in self._starting.items()}
        for w in self.workers.values():
            if w.ready:
                key = (w.role, "draining" if w.draining else "serving")
                out[key] = out.get(key, 0) + 1
        return out

    def status(self) -> ControlPlaneStatus:
        return ControlPlaneStatus(self.num_errors, self.links.counts(), self.index.num_resyncs, self.num_replaced)

    def note_unmet_prefill(self, tokens: int) -> None:
        """The gateway routed `tokens` prompt tokens that wanted a prefill worker and found
        none: the autoscaler's prefill signal counts them."""
        self.unmet_prefill_tokens += tokens

    def note_routed_prompt(self, uncached_tokens: int) -> None:
        """The gateway routed a prompt with this many tokens to compute, by any route (the
        SLO planner sizes the load a split of a worker budget would put where)."""
        if self.autoscaler is not None:
            self._routed_prompts.append(uncached_tokens)

    def all_stats(self) -> list[WorkerStats]:
        return [w.stats for w in self.workers.values() if w.stats is not None]

    async def start(self) -> None:
        """Start every worker and link every pair; raises WorkerStartError on failure."""
        self._cpus = self._plan_cpus()
        roles = [role for role in ("prefill", "decode") for _ in range(self.target[role])]
        log.info("starting %d prefill + %d decode worker(s) for %s: each loads the model, then the KV links are "
                 "probed", self.target["prefill"], self.target["decode"], self.spec.model)
        self._start_progress = (0, len(roles))  # (up so far, how many) while start() runs, for the progress lines
        await asyncio.gather(*(self._add_worker(role, strict=True) for role in roles))
        self._start_progress = None
        self._monitor = asyncio.create_task(self._monitor_loop(), name="pdserve-controller")

    async def shutdown(self) -> None:
        for task in [self._monitor, *self._replacing, *self._link_tasks.values()]:
            if task is not None:
                task.cancel()
        for handle in list(self.workers.values()):
            await self._stop(handle)
        self.workers.clear()

    def _plan_cpus(self) -> dict[str, CoreLedger | UnpinnedPlan]:
        """Role -> the plan its workers' placements are claimed from (module docstring)."""
        # A Ray client (ray://) runs on no node: its cores are not the workers'.
        here = None if ray.util.client.ray.is_connected() else ray.get_runtime_context().get_node_id()
        hosts = {node["NodeID"]: node["Resources"] for node in ray.nodes()
                 if node["Alive"] and any(node["Resources"].get(role) for role in ROLES)}
        if here is not None and set(hosts) == {here}:
            scaling = self.autoscaler.policy if self.autoscaler is not None else None
            most = scaling.most_workers if scaling else sum(self.target.values())
            ledger = CoreLedger(available_cores(), self.spec.threads, most, node_id=here)
            log.info("workers on this node: %d core(s) each of %s (threads: %s)", ledger.cores_per_worker,
                     format_cores(ledger.cores), self.spec.threads)
            return dict.fromkeys(ROLES, ledger)
        plans = {}
        for role in ROLES:
            slots = [int(res.get("CPU", 0) // res[role]) for res in hosts.values() if res.get(role)]
            plans[role] = UnpinnedPlan(self.spec.threads, min(slots, default=1))
            log.info("%s workers on other nodes: %d CPU(s) each, not pinned", role, plans[role].num_cpus)
        return plans

    async def _add_worker(self, role: str, previous: CpuPlacement | None = None,
                          strict: bool = False) -> WorkerHandle:
        """Start a worker of `role` on cores claimed for it (like `previous`'s, if given)
        and link it with every worker of the other role. `strict` (start-up): a link that
        fails fails the worker; otherwise it is left down and retried."""
        worker_id = f"{role}-{self._next_id[role]}"
        self._next_id[role] += 1
        placement = self._cpus[role].claim(worker_id, previous)
        actor = ray.remote(_CLASSES[role]).options(
            name=f"pdserve-{worker_id}", num_cpus=max(self.cpus_per_worker, placement.num_cpus),
            num_gpus=self.spec.gpus_per_worker, resources={role: 1},
            max_restarts=0, max_concurrency=10_000,
        ).remote(self.spec, worker_id, placement)
        try:
            info = await actor.info.remote()
        except Exception as exc:
            ray.kill(actor)
            self._cpus[role].release(worker_id)
            raise WorkerStartError(f"{role} worker {worker_id} failed to start: {exc}") from exc
        handle = WorkerHandle(worker_id, role, actor, info, placement)
        # Registered and the other role listed in this same turn of the event loop (no
        # await in between): see "KV links" in the module docstring.
        self.workers[worker_id] = handle
        others = [w for w in self.workers.values() if w.role != role and not w.draining]
        pairs = [(handle, w) if role == "prefill" else (w, handle) for w in others]
        errors = await asyncio.gather(*(self._link(p, d) for p, d in pairs))
        failed = [e for e in errors if e is not None]
        if strict and failed:
            self.workers.pop(worker_id, None)
            self.links.forget(worker_id)
            ray.kill(actor)
            self._cpus[role].release(worker_id)
            raise WorkerStartError(failed[0])
        if self.workers.get(worker_id) is not handle:
            raise WorkerStartError(f"{role} worker {worker_id} was lost while linking")
        handle.ready = True
        progress = ""
        if self._start_progress is not None:
            self._start_progress = (self._start_progress[0] + 1, self._start_progress[1])
            progress = f" [{self._start_progress[0]} of {self._start_progress[1]}]"
        log.info("%s worker %s up (pid %d, %d torch thread(s) on core(s) %s)%s", role, worker_id, info.pid,
                 info.threads, format_cores(info.cores), progress)
        return handle

    async def _link(self, prefill: WorkerHandle, decode: WorkerHandle) -> str | None:
        """Make the pair's link (or join the attempt already running); None if it is up,
        else why not."""
        pair = (prefill.worker_id, decode.worker_id)
        task = self._link_tasks.get(pair)
        if task is None:
            task = asyncio.create_task(self._attempt_link(prefill, decode), name=f"pdserve-link-{pair}")
            self._link_tasks[pair] = task
            task.add_done_callback(lambda _: self._link_tasks.pop(pair, None))
        return await asyncio.shield(task)

    async def _attempt_link(self, prefill: WorkerHandle, decode: WorkerHandle) -> str | None:
        pair = (prefill.worker_id, decode.worker_id)
        self.links.begin(pair)
        try:
            address = await self._measure_transports(prefill, decode)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the link down, with its reason
            error = f"the KV link {prefill.worker_id} -> {decode.worker_id} does not work: {_cause(exc)}"
            delay = self.links.failed(pair, error, time.monotonic())
            log.error("%s; retrying in %.0f s", error, delay)
            return error
        self.links.succeeded(pair, address)
        log.info("KV link %s -> %s over %s", prefill.worker_id, decode.worker_id, address)
        return None

    async def _measure_transports(self, prefill: WorkerHandle, decode: WorkerHandle) -> str:
        """Time a probe transfer over each candidate transport of the pair; the address of
        the fastest that worked. Raises TransportError naming every failure if none did."""
        results: dict[str, float | BaseException] = {}
        addresses: dict[str, str] = {}
        nbytes = 0  # bytes one probe transfer moves
        for kind in candidate_transports(prefill.info.peer, decode.info.peer, self.spec.kv_transport):
            try:
                addresses[kind] = await decode.actor.listen.remote(kind)
                ticket = await decode.actor.probe_ticket.remote(PROBE_PAGES)
                nbytes = ticket.layout.num_layers * chunk_nbytes(ticket.layout, PROBE_PAGES)
                try:
                    results[kind] = await prefill.actor.measure.remote(addresses[kind], ticket)
                finally:
                    await decode.actor.release_probe.remote(ticket.ticket_id)
            except Exception as exc:  # a transport that cannot work here loses the race
                if isinstance(getattr(exc, "cause", exc), LayoutMismatch):
                    raise  # no transport can link pools of different layouts: say why, once
                results[kind] = RuntimeError(_cause(exc))
        best = fastest(results)
        log.info("KV transports %s -> %s (a %d-page probe at every layer, median of %d):\n%s\n  chosen: %s",
                 prefill.worker_id, decode.worker_id, PROBE_PAGES, PROBE_REPEATS,
                 transport_table(results, nbytes), best)
        return addresses[best]

    def _retry_links(self) -> None:
        for prefill_id, decode_id in self.links.due(time.monotonic()):
            prefill, decode = self.workers.get(prefill_id), self.workers.get(decode_id)
            if prefill is None or decode is None or (prefill_id, decode_id) in self._link_tasks:
                continue
            self._spawn(self._link(prefill, decode))

    # ------------------------------------------------------------------ health

    async def _monitor_loop(self) -> None:
        while True:
            try:
                await self._monitor_round()
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                self._count_error("a monitor round")
            await asyncio.sleep(self.poll_interval)

    async def _monitor_round(self) -> None:
        polled = [h for h in self.workers.values() if h.ready]
        results = await asyncio.gather(*(self._poll(h) for h in polled), return_exceptions=True)
        for handle, result in zip(polled, results):
            if isinstance(result, Exception):
                self._count_error(f"polling {handle.worker_id}", result)
        self._retry_links()
        if self.autoscaler is not None:
            self._autoscale()

    def _count_error(self, what: str, exc: BaseException | None = None) -> None:
        self.num_errors += 1
        log.error("controller: %s failed (%d errors so far); going on", what, self.num_errors,
                  exc_info=exc if exc is not None else True)

    async def _poll(self, handle: WorkerHandle) -> None:
        acked = self.index.seq(handle.worker_id)
        try:
            stats, batch = await asyncio.wait_for(_await(handle.actor.stats.remote(acked)), self.poll_timeout)
        except (asyncio.TimeoutError, GetTimeoutError):
            handle.missed_polls += 1
            log.warning("%s missed a health check (%d in a row)", handle.worker_id, handle.missed_polls)
            if handle.missed_polls >= self.max_missed_polls:
                self._replace(handle, f"it missed {handle.missed_polls} health checks", "unresponsive")
            return
        except RayActorError as exc:
            self._replace(handle, f"its process died ({_cause(exc)})", "process_died")
            return
        handle.missed_polls = 0
        handle.stats = stats
        trouble = self._engine_trouble(stats)
        if trouble is not None:
            self._replace(handle, *trouble)
            return
        if handle.worker_id not in self.workers:
            return  # removed while this poll was out
        if not self.index.apply_batch(handle.worker_id, batch):
            await self._resync_prefix_index(handle, acked, batch.first_seq)

    def _engine_trouble(self, stats: WorkerStats) -> tuple[str, str] | None:
        """(why, reason kind) when the worker's engine cannot serve (dead, hung), or None."""
        if not stats.engine_alive:
            return stats.engine_failure or "its engine thread ended", "engine_died"
        if stats.engine_heartbeat_age > self.spec.engine_hang_timeout:
            return (f"its engine thread made no progress for {stats.engine_heartbeat_age:.0f} s "
                    f"(limit {self.spec.engine_hang_timeout:g} s): hung"), "engine_hung"
        return None

    async def _resync_prefix_index(self, handle: WorkerHandle, acked: int, first_seq: int) -> None:
        log.warning("%s: prefix-cache events %d..%d were lost; reloading its cache index from a snapshot",
                    handle.worker_id, acked + 1, first_seq - 1)
        snapshot = await asyncio.wait_for(_await(handle.actor.cache_snapshot.remote()), self.poll_timeout)
        if handle.worker_id in self.workers:
            self.index.reset(handle.worker_id, snapshot)

    # ------------------------------------------------------------------ scaling

    def _autoscale(self) -> None:
        serving = {role: [w.stats for w in self.members(role) if w.stats is not None] for role in self.target}
        counts = {role: len(self.members(role)) + self._starting[role] for role in self.target}
        states = self.counts()
        draining = {role: states.get((role, "draining"), 0) for role in self.target}
        unmet, self._unmet_seen = self.unmet_prefill_tokens - self._unmet_seen, self.unmet_prefill_tokens
        prompts, self._routed_prompts = self._routed_prompts, []
        for decision in self.autoscaler.observe(time.monotonic(), serving["prefill"], serving["decode"], counts,
                                                unmet_prefill_tokens=unmet, draining=draining, prompts=prompts):
            log.info("%s: %s %s %d -> %d: %s", type(self.autoscaler).__name__, decision.role, decision.direction,
                     decision.current, decision.desired, decision.reason)
            if self.on_decision is not None:
                self.on_decision(decision)
            if decision.desired > decision.current:
                for _ in range(decision.desired - decision.current):
                    self._spawn(self._start_replacement(decision.role))
            else:
                # The least busy leave: their requests finish soonest.
                victims = sorted(self.members(decision.role), key=lambda w: (w.in_flight, w.worker_id))
                for handle in victims[:decision.current - decision.desired]:
                    handle.draining = True
                    self._spawn(self._drain(handle))
        if self.after_scaling is not None:
            self.after_scaling()

    async def _drain(self, handle: WorkerHandle) -> None:
        """Stop `handle` once it holds no request (or after `drain_timeout`)."""
        deadline = time.monotonic() + self.drain_timeout
        while not handle.idle and time.monotonic() < deadline and handle.worker_id in self.workers:
            await asyncio.sleep(self.poll_interval)
        if self.workers.pop(handle.worker_id, None) is None:
            return  # it died meanwhile (and was replaced... by nobody: it was leaving anyway)
        self.index.forget(handle.worker_id)
        self.links.forget(handle.worker_id)
        self._departed(handle.worker_id, "drained")
        log.info("%s worker %s drained and stopped", handle.role, handle.worker_id)
        await self._stop(handle)
        self._cpus[handle.role].release(handle.worker_id)

    def _spawn(self, work) -> None:
        task = asyncio.create_task(work)
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    def worker_died(self, handle: WorkerHandle, why: str, reason: str = "process_died") -> None:
        """A caller saw the worker die (its process, or its engine: `reason`, see
        departure_reason): replace it now, not at the next poll."""
        self._replace(handle, why, reason)

    def departure_reason(self, worker_id: str) -> str:
        """Why a worker left (process_died, unresponsive, engine_died, engine_hung,
        drained), for the requests it held; "unknown" if it is not known to have left."""
        return self._departures.get(worker_id, "unknown")

    def _departed(self, worker_id: str, reason: str) -> None:
        self._departures[worker_id] = reason
        while len(self._departures) > MAX_DEPARTURES:
            self._departures.popitem(last=False)

    def _replace(self, handle: WorkerHandle, why: str, reason: str) -> None:
        """Remove a worker that cannot serve (`reason`: its kind, see departure_reason)
        and start a replacement, unless it was leaving anyway."""
        if self.workers.pop(handle.worker_id, None) is None:
            return
        self._departed(handle.worker_id, reason)
        self.index.forget(handle.worker_id)
        self.links.forget(handle.worker_id)
        ray.kill(handle.actor)
        self._cpus[handle.role].release(handle.worker_id)
        if handle.draining:
            log.warning("%s worker %s died while draining: %s", handle.role, handle.worker_id, why)
            return
        log.error("%s worker %s is gone: %s; starting a replacement", handle.role, handle.worker_id, why)
        self.num_replaced += 1
        self._spawn(self._start_replacement(handle.role, handle.placement))

    async def _start_replacement(self, role: str, previous: CpuPlacement | None = None) -> None:
        """Start one more worker of `role` (on `previous`'s cores when given), retrying
        until it comes up."""
        delay = 1.0
        self._starting[role] += 1
        try:
            while True:
                try:
                    await self._add_worker(role, previous)
                    return
                except WorkerStartError as exc:
                    log.error("starting a %s worker failed: %s; retrying in %.0f s", role, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
        finally:
            self._starting[role] -= 1

    async def _stop(self, handle: WorkerHandle) -> None:
        try:
            await asyncio.wait_for(_await(handle.actor.shutdown.remote()), 5.0)
        except Exception as exc:  # noqa: BLE001 - it is being killed either way
            log.debug("%s did not shut down cleanly: %s", handle.worker_id, exc)
        ray.kill(handle.actor)


async def _await(ref):
    return await ref


def _cause(exc: BaseException) -> str:
    """The worker-side error behind a Ray error, in one line."""
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
