"""CPU threads and core pinning for the processes that run a model.

A worker's placement says how many torch intra-op threads it runs and, where the cores are
known, which cores its process is pinned to:

    PinnedCores(threads, cores, node_id)   pinned to `cores` (ids on node `node_id`)
    UnpinnedCpus(threads, num_cpus)        not pinned; `num_cpus` CPUs are accounted to it

One owner decides placements: the controller (for `pdserve serve`) or `pdserve generate`
(for its own process) claims them from a plan - `CoreLedger` for the cores of the node it
runs on, `UnpinnedPlan` for workers on nodes it cannot see. The process that runs the model
applies its placement first thing, before it loads weights (`apply_placement`): every
thread of the process is pinned, torch gets `threads` intra-op threads (its OpenMP pool)
and one inter-op thread.

`CoreLedger` rules (`threads="auto"`, the default):
  - The cores are those the deciding process may run on (`os.sched_getaffinity(0)`).
  - Each worker gets `len(cores) // num_workers` of them (at least one), distinct while
    there are enough, and as many torch threads as cores. `num_workers` is the most
    workers that may run at once (the autoscaler's maxima when it runs). Leftover cores
    (fewer than the workers) stay free for the gateway and Ray.
    1 prefill + 1 decode on 2 cores: one core each; one colocated decode worker: all.
  - More workers than cores: one core each, shared round-robin, and a warning says so:
    shared cores are oversubscribed and each step waits for the other worker's.
  - An explicit `threads=N`: N threads pinned to min(N, len(cores)) cores.
  - A claim takes the least-used cores (ties: the previous placement's cores first, then
    the lowest ids). A replacement passes the placement it replaces and so gets the same
    cores back once `release` returned them; an autoscaled worker gets the least-used ones.

Workers on other nodes (`UnpinnedPlan`): before an actor starts, Ray has not chosen its
node, and in a container the affinity mask may span the host's cores while the CPU limit is
a quota, so core ids chosen there could stack workers on the same cores. Such a worker is
not pinned; its threads equal the CPUs Ray gives it (`num_cpus`: the node's CPUs per role
slot, as the controller reads them from Ray), or N of an explicit `threads=N` with
min(N, num_cpus) CPUs accounted. A `PinnedCores` placement that reaches a process on
another node than `node_id` is applied unpinned (`on_node`), with a warning.

The gateway (the `pdserve serve` process) is not pinned and runs torch on one thread
(`use_one_thread`): it tokenizes and serves HTTP, and leaves the cores to the workers.

Not thread-safe: each plan belongs to one thread (the controller's event loop).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
Threads = int | Literal["auto"]


def parse_threads(value: object) -> Threads:
    """`"auto"` or a positive integer (given as int or decimal text); else ValueError."""
    if value == AUTO:
        return AUTO
    number = value
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise ValueError(f"threads must be a positive integer or 'auto', got {value!r}")
    return number


def cores_per_worker(num_cores: int, num_workers: int, threads: Threads) -> int:
    """Cores one worker is pinned to when `num_workers` share `num_cores` (module rules)."""
    if threads == AUTO:
        return max(1, num_cores // max(1, num_workers))
    return min(threads, num_cores)


def available_cores() -> tuple[int, ...]:
    """The cores this process may run on, ascending."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def format_cores(cores: Iterable[int]) -> str:
    """`0-3,6`: ascending ranges of core ids."""
    ids = sorted(cores)
    spans: list[str] = []
    start = prev = None
    for core in [*ids, None]:
        if start is not None and core != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if start is None:
            start = core
        prev = core
    return ",".join(spans)


class PinnedCores(NamedTuple):
    threads: int  # torch intra-op threads
    cores: tuple[int, ...]  # ascending core ids the whole process is pinned to
    node_id: str | None = None  # the node those ids are on (None: wherever it runs)

    @property
    def num_cpus(self) -> int:
        """CPUs to account to the worker (Ray's `num_cpus`)."""
        return len(self.cores)

    def on_node(self, node_id: str | None) -> CpuPlacement:
        """This placement for a process on `node_id`: unpinned if the ids are another node's."""
        if self.node_id is None or node_id is None or node_id == self.node_id:
            return self
        log.warning("placed for node %s but running on %s: not pinning, %d torch threads",
                    self.node_id, node_id, self.threads)
        return UnpinnedCpus(self.threads, self.num_cpus)

    def __str__(self) -> str:
        return f"{self.threads} torch thread(s) pinned to core(s) {format_cores(self.cores)}"


class UnpinnedCpus(NamedTuple):
    threads: int  # torch intra-op threads
    num_cpus: int  # CPUs accounted to the worker (Ray's `num_cpus`)

    def on_node(self, node_id: str | None) -> CpuPlacement:
        return self

    def __str__(self) -> str:
        return f"{self.threads} torch thread(s), not pinned"


CpuPlacement = PinnedCores | UnpinnedCpus


class CoreLedger:
    """The one owner of which worker is pinned to which cores of one node (module rules).

    `claim` records and returns a worker's placement; `release` forgets it (the worker
    stopped). Invariant: `held` maps each live worker to the cores it was given."""

    def __init__(self, cores: Sequence[int], threads: Threads, num_workers: int,
                 node_id: str | None = None) -> None:
        if not cores:
            raise ValueError("no cores to place workers on")
        self.cores = tuple(sorted(set(cores)))
        self.threads = parse_threads(threads)
        self.num_workers = num_workers
        self.node_id = node_id
        self.held: dict[str, tuple[int, ...]] = {}

    @property
    def cores_per_worker(self) -> int:
        return cores_per_worker(len(self.cores), self.num_workers, self.threads)

    def users(self) -> dict[int, int]:
        """Core id -> number of live workers pinned to it."""
        count = dict.fromkeys(self.cores, 0)
        for cores in self.held.values():
            for core in cores:
                count[core] = count.get(core, 0) + 1
        return count

    def claim(self, worker_id: str, previous: CpuPlacement | None = None) -> PinnedCores:
        """Cores for `worker_id` (as many as `previous` had, if it was pinned here)."""
        if worker_id in self.held:
            raise ValueError(f"worker {worker_id} already holds cores {format_cores(self.held[worker_id])}")
        before = set(previous.cores) if isinstance(previous, PinnedCores) else set()
        size = min(len(before), len(self.cores)) if before else self.cores_per_worker
        users = self.users()
        ranked = sorted(self.cores, key=lambda core: (users[core], core not in before, core))
        chosen = tuple(sorted(ranked[:size]))
        self.held[worker_id] = chosen
        threads = size if self.threads == AUTO else self.threads
        shared = [core for core in chosen if users[core]]
        if shared:
            log.warning("worker %s shares core(s) %s with other workers (%d workers on %d cores): the cores "
                        "are oversubscribed and steps wait for each other; run fewer workers or give them "
                        "more cores", worker_id, format_cores(shared), len(self.held), len(self.cores))
        elif threads > size:
            log.warning("worker %s runs %d torch threads on %d core(s): they oversubscribe them",
                        worker_id, threads, size)
        return PinnedCores(threads, chosen, self.node_id)

    def release(self, worker_id: str) -> None:
        """Forget `worker_id`'s cores (no-op if it holds none)."""
        self.held.pop(worker_id, None)


class UnpinnedPlan:
    """Placements for workers on nodes this process cannot see (module rules): not pinned,
    `num_cpus` CPUs each; threads = `num_cpus`, or N of an explicit `threads=N`."""

    def __init__(self, threads: Threads, num_cpus: int) -> None:
        self.threads = parse_threads(threads)
        self.num_cpus = max(1, num_cpus)

    def claim(self, worker_id: str, previous: CpuPlacement | None = None) -> UnpinnedCpus:
        if self.threads == AUTO:
            return UnpinnedCpus(self.num_cpus, self.num_cpus)
        return UnpinnedCpus(self.threads, min(self.threads, self.num_cpus))

    def release(self, worker_id: str) -> None:
        """Nothing is held per worker."""


def pin_process(cores: Sequence[int]) -> None:
    """Pin every thread of this process to `cores`; threads started later inherit it.
    Raises OSError naming the cores if the kernel refuses them."""
    if not hasattr(os, "sched_setaffinity"):
        log.warning("this platform cannot pin threads to cores; not pinning")
        return
    wanted = set(cores)
    try:
        os.sched_setaffinity(0, wanted)
        done: set[int] = set()
        for _ in range(3):  # threads may start while we pin; a few passes catch them
            todo = {int(tid) for tid in os.listdir("/proc/self/task")} - done
            if not todo:
                break
            for tid in todo:
                try:
                    os.sched_setaffinity(tid, wanted)
                except ProcessLookupError:
                    pass  # it ended meanwhile
            done |= todo
    except OSError as exc:
        raise OSError(exc.errno, f"cannot pin to core(s) {format_cores(wanted)}: {exc.strerror}; this "
                      f"process may use core(s) {format_cores(available_cores())}") from exc


def process_cores() -> tuple[int, ...]:
    """The cores any thread of this process may run on (the union of their affinities)."""
    if not hasattr(os, "sched_getaffinity"):
        return available_cores()
    cores = set(os.sched_getaffinity(0))
    for tid in os.listdir("/proc/self/task"):
        try:
            cores |= os.sched_getaffinity(int(tid))
        except ProcessLookupError:
            pass
    return tuple(sorted(cores))


def apply_placement(placement: CpuPlacement) -> None:
    """Pin this process (if `placement` is pinned) and size torch's thread pools. Call it
    before the model loads, so no pool starts with another size or on other cores."""
    if isinstance(placement, PinnedCores):
        pin_process(placement.cores)
    torch.set_num_threads(placement.threads)
    _one_interop_thread()


def use_one_thread() -> None:
    """torch in this process uses one intra-op and one inter-op thread (the gateway: it
    tokenizes and serves HTTP, and must not compete with the workers' cores)."""
    torch.set_num_threads(1)
    _one_interop_thread()


def _one_interop_thread() -> None:
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # torch allows it once, before inter-op work starts; the pool stays as is
        log.debug("torch's inter-op pool is already sized (%d threads)", torch.get_num_interop_threads())
