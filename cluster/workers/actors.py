"""The worker processes: one Ray actor per prefill or decode worker.

Each actor owns one engine (built from a `WorkerSpec`) on its own engine thread; its
methods run on the actor's event loop and only talk to the engine through the engine's
command queue. What leaves a worker:

    DecodeWorker.generate(...)  a stream: Refused | (KVTicket | None, if remote) then TokenDeltas
    PrefillWorker.prefill(job)  PrefillResult | Refused, once the KV reached the decode worker
    *.stats(acked)              (WorkerStats, the prefix-cache events after seq `acked`)
    *.cache_snapshot()          every page in the prefix cache, at an event seq (after a gap)
    *.info()                    WorkerInfo: identity, KV peer, and the cores and torch threads it runs on

A worker is built from its `WorkerSpec` and the `CpuPlacement` the controller claimed for
it (`pdserve.runtime.threads`), which it applies before anything else: the model's
weights load and its thread pools start on the worker's own cores.

Liveness: `stats()` is answered by the actor's event loop, not the engine thread, and says
how the engine thread is (alive, seconds since its loop last beat, why it died); the
controller replaces a worker whose engine is dead or hung.

Refusals travel as values, not exceptions, so the gateway maps them to client errors
without unpickling foreign exception types.

The controller creates these actors from the `pdserve serve` process, so this module is
imported there too; the engines (models, kernels, schedulers) are imported only when an
actor starts, in its own process. The serve process never loads engine code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NamedTuple

import torch

from pdserve.cluster.workers.cache_events import CacheEventLog, CacheSnapshot, EventBatch
from pdserve.cluster.workers.faults import planned_fault
from pdserve.cluster.workers.spec import WorkerSpec
from pdserve.cluster.workers.stats import WorkerStats
from pdserve.kv_transfer.layout import layout_of
from pdserve.kv_transfer.messages import KVTicket, PrefillJob, PrefillResult
from pdserve.kv_transfer.transports.select import PeerInfo, measure, probe, probe_source
from pdserve.runtime.request import TokenDelta
from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.threads import CpuPlacement, apply_placement, format_cores, process_cores

if TYPE_CHECKING:
    from pdserve.engine.engine import EngineCore
    from pdserve.kv_transfer.transports.base import KVListener
    from pdserve.prefill_worker.engine import PrefillEngine
    from pdserve.runtime.loader import LoadedModel
    from pdserve.runtime.scheduler import BatchScheduler

log = logging.getLogger(__name__)


class Refused(NamedTuple):
    """The worker will not take a request. `kind` names an `ErrorKind`. `engine_dead`:
    the worker cannot serve anything any more (its engine thread ended); the request
    belongs on another worker, and this one is to be replaced."""

    kind: str
    message: str
    retry_after: float | None = None
    engine_dead: bool = False


class WorkerInfo(NamedTuple):
    worker_id: str
    role: str
    peer: PeerInfo
    block_size: int
    pid: int
    cores: tuple[int, ...]  # the cores the worker's threads may run on (all of them: the union)
    threads: int  # torch intra-op threads
    num_kv_blocks: int = 0  # its KV pool's blocks (of block_size tokens each)


class _Worker:
    role: str

    def __init__(self, spec: WorkerSpec, worker_id: str, placement: CpuPlacement) -> None:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {worker_id}: %(message)s")
        self.placement = placement.on_node(_node_id())
        apply_placement(self.placement)  # first: the model's threads start on these cores
        # The engine thread runs the model with the placement's threads; this (the actor's)
        # thread loads and compiles it on one, so the process has one multi-threaded
        # OpenMP pool (see pdserve.runtime.engine_thread).
        torch.set_num_threads(1)
        from pdserve.runtime.loader import load_model  # in the actor's process only

        self.spec = spec
        self.worker_id = worker_id
        log.info("%s worker %s: loading %s ...", self.role, worker_id, spec.model)
        self.loaded: LoadedModel = load_model(spec.model, cache=self._cache_config(spec),
                                              max_model_len=spec.max_model_len, device_config=spec.device_config)
        from pdserve.runtime.structured_output import GrammarCompiler

        # Structured outputs: grammars compiled for this model's tokenizer and vocabulary.
        self.grammars = GrammarCompiler(self.loaded.tokenizer, self.loaded.runner.config.vocab_size,
                                        self.loaded.info.eos_token_ids)
        self._events = CacheEventLog()
        self._fault = planned_fault(worker_id)
        self._stats: WorkerStats | None = None
        log.info("%s worker %s ready: %s, %d KV blocks of %d tokens, %d torch thread(s) on core(s) %s",
                 self.role, worker_id, spec.model, self.loaded.info.num_blocks, self.loaded.info.block_size,
                 self.placement.threads, format_cores(process_cores()))

    def _cache_config(self, spec: WorkerSpec):
        return spec.cache_config

    def info(self) -> WorkerInfo:
        """Read now, from inside the process: the cores are what its threads may run on."""
        return WorkerInfo(self.worker_id, self.role, PeerInfo.local(self.loaded.runner.device.type),
                          self.loaded.info.block_size, os.getpid(), process_cores(), self.engine.threads,
                          self.loaded.info.num_blocks)

    def stats(self, acked: int = 0) -> tuple[WorkerStats, EventBatch]:
        """The latest snapshot, the engine thread's health now, and the prefix-cache
        events after seq `acked` (the ones up to it are forgotten)."""
        health = self.engine.health()
        stats = self._stats._replace(
            num_waiting=self.num_waiting, num_waiting_tokens=self._stats.num_waiting_tokens + self._queued_tokens,
            engine_alive=health.alive, engine_heartbeat_age=health.heartbeat_age,
            engine_failure=health.failure, engine_errors=health.num_errors)
        return stats, self._events.since(acked)

    def cache_snapshot(self) -> CacheSnapshot:
        return self._events.snapshot()

    @property
    def _queued_tokens(self) -> int:
        """Prompt tokens of requests submitted but not yet in the scheduler's queue."""
        return 0

    @property
    def num_waiting(self) -> int:
        """Requests queued here: submitted to the engine thread or waiting in its scheduler."""
        return self._stats.num_waiting + self.engine.num_queued_commands

    def _snapshot(self, scheduler: BatchScheduler, **fields) -> WorkerStats:
        """Engine thread only (and the constructor). `num_waiting` counts the scheduler's
        queue; commands not yet applied are added when it is read."""
        self._events.record(scheduler.prefix_cache.drain_events())
        waiting = list(scheduler.waiting)
        allocator = scheduler.allocator
        held = allocator.num_used - scheduler.prefix_cache.num_evictable_blocks
        return WorkerStats(
            role=self.role, worker_id=self.worker_id,
            num_waiting=len(waiting), requests_finished=scheduler.num_finished,
            num_waiting_tokens=sum(r.num_uncomputed_tokens for r in waiting),
            num_running=len(scheduler.running),
            kv_usage=held / self.loaded.info.num_blocks,
            prefix_hit_tokens=scheduler.prefix_hit_tokens,
            prefix_query_tokens=scheduler.prefix_query_tokens,
            **fields,
        )


class DecodeWorker(_Worker):
    role = "decode"

    def __init__(self, spec: WorkerSpec, worker_id: str, placement: CpuPlacement) -> None:
        from pdserve.engine.async_engine import AsyncEngine  # in the actor's process only
        from pdserve.engine.engine import EngineCore
        from pdserve.kv_transfer.decode_side import OnTransferFailure
        from pdserve.kv_transfer.receiver import KVReceiver

        super().__init__(spec, worker_id, placement)
        runner, info = self.loaded.runner, self.loaded.info
        self.receiver = KVReceiver(runner.pool, default_timeout=spec.transfer_timeout,
                                   vocab_size=runner.config.vocab_size)
        core = EngineCore(runner, info, spec.scheduler_config, spec.enable_prefix_caching,
                          kv_receiver=self.receiver, on_transfer_failure=OnTransferFailure(spec.on_transfer_failure),
                          transfer_timeout=spec.transfer_timeout, speculative=spec.speculative,
                          grammars=self.grammars)
        self._listeners: dict[str, KVListener] = {}
        self._publish(core)
        self.engine = AsyncEngine(core, on_iteration=self._publish, threads=self.placement.threads)

    def _cache_config(self, spec: WorkerSpec):
        """The KV memory limit covers the draft model's pool too, when speculation has one."""
        import dataclasses

        from pdserve.engine.draft_model import draft_kv_share
        from pdserve.runtime.weights import load_checkpoint

        if spec.speculative is None or spec.speculative.method != "draft":
            return spec.cache_config
        share = draft_kv_share(spec.speculative, load_checkpoint(spec.model).config)
        return dataclasses.replace(spec.cache_config, draft_kv_share=share)

    def listen(self, kind: str) -> str:
        """The address of this worker's KV listener of `kind`, started on first use.
        Raises TransportError if the transport cannot work here."""
        from pdserve.kv_transfer.transports import listen

        if kind not in self._listeners:
            options = {} if kind == "shm" else {"host": self.spec.kv_host or _node_ip()}
            self._listeners[kind] = listen(kind, self.receiver, **options)
            log.info("KV listener %s", self._listeners[kind].address)
        return self._listeners[kind].address

    def probe_ticket(self, num_pages: int) -> KVTicket:
        """A ticket for a timed test transfer into a scratch pool (see select.measure)."""
        return self.receiver.issue_probe(num_pages)

    def release_probe(self, ticket_id: int) -> None:
        self.receiver.release(ticket_id)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, remote: bool,
                       resume_at: int | None = None,
                       follows: str | None = None) -> AsyncIterator[Refused | TokenDelta | object]:
        """Stream one request (see the module docstring). `remote`: a prefill worker
        computes the prompt; the first item is then the KVTicket (or None: no room, it is
        prefilled here). `resume_at`: a migrated request; `follows`: the leader of its
        group, sent here before it with the same prompt, whose prompt KV it shares (a
        follower is always prefilled here, so never `remote`; see EngineCore.add_request)."""
        if remote and follows is not None:
            raise ValueError(f"request {request_id}: a follower of {follows} shares its leader's KV; "
                             "it cannot have a prefill worker of its own")
        health = self.engine.health()
        if not health.alive:
            yield Refused("UNAVAILABLE", f"decode worker {self.worker_id} cannot serve: {health.failure}",
                          engine_dead=True)
            return
        if self.num_waiting >= self.spec.max_queued_requests:
            yield Refused("OVERLOADED", f"decode worker {self.worker_id} has {self.num_waiting} requests "
                          f"queued (limit {self.spec.max_queued_requests}); retry shortly", 1.0)
            return
        if remote:
            stream = self.engine.generate_remote(prompt_ids, params, request_id, resume_at)
        else:
            stream = self.engine.generate(prompt_ids, params, request_id, resume_at, follows)
        try:
            async for item in stream:
                yield item
        except ValueError as exc:  # RequestRejected: it can never run here
            yield Refused("INVALID_ARGUMENT", str(exc))
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def fail_remote(self, request_id: str, reason: str) -> None:
        self.engine.fail_remote(request_id, reason)

    def shutdown(self) -> None:
        self.engine.shutdown()
        for listener in self._listeners.values():
            listener.close()

    def _publish(self, core: EngineCore) -> None:
        if self._fault is not None:
            self._fault.maybe_fire(core.num_steps)
        remote = core.remote
        spec = core.speculator
        speculation = {} if spec is None else {
            "spec_proposed_tokens": spec.proposed, "spec_accepted_tokens": spec.accepted,
            "spec_verify_steps": spec.steps, "spec_accepted_at": tuple(zip(spec.proposed_at, spec.accepted_at))}
        allocator = getattr(spec.proposer, "allocator", None) if spec is not None else None
        self._stats = self._snapshot(
            core.scheduler, num_waiting_for_kv=len(core.scheduler.waiting_for_kv),
            kv_tickets_live=self.receiver.num_live, kv_rejected=dict(self.receiver.rejected),
            draft_kv_blocks=allocator.num_used if allocator is not None else 0,
            transfer_bytes=self.receiver.bytes_received,
            transfer_seconds=remote.total_receive_seconds if remote else 0.0,
            kv_wait_seconds=remote.total_kv_wait_seconds if remote else 0.0,
            transfer_outcomes=dict(remote.counts) if remote else {},
            num_steps=core.num_steps, step_seconds=core.step_seconds,
            prompt_tokens_computed=core.prompt_tokens_computed, batch_requests_stepped=core.batch_requests_stepped,
            **speculation)
        # Followers of an n > 1 request held until their leader's KV arrives are waiting too.
        self._stats = self._stats._replace(num_waiting=self._stats.num_waiting + core.num_held_followers)


class PrefillWorker(_Worker):
    role = "prefill"

    def __init__(self, spec: WorkerSpec, worker_id: str, placement: CpuPlacement) -> None:
        from pdserve.kv_transfer.pusher import KVPusher  # in the actor's process only
        from pdserve.kv_transfer.transports import connect
        from pdserve.prefill_worker.async_engine import AsyncPrefillEngine
        from pdserve.prefill_worker.engine import PrefillEngine

        super().__init__(spec, worker_id, placement)
        runner, info = self.loaded.runner, self.loaded.info
        self.pusher = KVPusher(runner.pool, lambda address: connect(address, timeout=10.0))
        engine = PrefillEngine(runner, info, self.pusher, spec.scheduler_config, spec.enable_prefix_caching,
                               grammars=self.grammars)
        self._publish(engine)
        self.engine = AsyncPrefillEngine(engine, on_iteration=self._publish, threads=self.placement.threads)

    @property
    def _queued_tokens(self) -> int:
        return self.engine.num_queued_tokens

    def probe(self, address: str) -> None:
        """Prove the KV link to a decode worker's listener works (raises TransportError)."""
        probe(address)

    def measure(self, address: str, ticket: KVTicket) -> float:
        """Seconds a probe transfer to `address` takes (select.measure), sent from a
        scratch pool on this worker's device. Raises TransportError or MessageRejected."""
        pool = self.loaded.runner.pool
        return measure(address, ticket, probe_source(ticket, pool.kv.device, layout_of(pool)))

    async def prefill(self, job: PrefillJob) -> PrefillResult | Refused:
        health = self.engine.health()
        if not health.alive:
            return Refused("UNAVAILABLE", f"prefill worker {self.worker_id} cannot serve: {health.failure}",
                           engine_dead=True)
        if self.num_waiting >= self.spec.max_queued_requests:
            return Refused("OVERLOADED", f"prefill worker {self.worker_id} has {self.num_waiting} jobs queued")
        try:
            return await self.engine.prefill(job)
        except ValueError as exc:
            return Refused("INVALID_ARGUMENT", str(exc))

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id, "aborted by the gateway")

    def shutdown(self) -> None:
        self.engine.shutdown()
        self.pusher.close()

    def _publish(self, engine: PrefillEngine) -> None:
        if self._fault is not None:
            self._fault.maybe_fire(engine.num_steps)
        self._stats = self._snapshot(
            engine.scheduler, num_waiting_for_kv=0,
            transfer_bytes=self.pusher.bytes_sent, transfer_seconds=self.pusher.send_seconds,
            transfer_outcomes=dict(engine.jobs.outcome_counts),
            num_steps=engine.num_steps, step_seconds=engine.step_seconds,
            prompt_tokens_computed=engine.prompt_tokens_computed,
            batch_requests_stepped=engine.batch_requests_stepped, kv_tail_seconds=engine.jobs.sent_tail_seconds)


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
