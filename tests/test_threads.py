"""CPU placement: how cores are divided among workers (`CoreLedger`, `UnpinnedPlan`), the
`--threads` flag, and a real worker actor on local Ray pinned as the controller decided."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pdserve.cluster.cli import build_parser
from pdserve.cluster.workers.spec import WorkerSpec
from pdserve.runtime.config import ConfigError
from pdserve.runtime.threads import (
    CoreLedger,
    PinnedCores,
    UnpinnedCpus,
    UnpinnedPlan,
    available_cores,
    format_cores,
    parse_threads,
)


def _claims(cores, threads, num_workers, count=None) -> list[PinnedCores]:
    ledger = CoreLedger(cores, threads, num_workers)
    return [ledger.claim(f"w{i}") for i in range(num_workers if count is None else count)]


# ------------------------------------------------------------------ assignment


def test_one_prefill_and_one_decode_on_two_cores_get_one_core_each(caplog):
    with caplog.at_level(logging.WARNING):
        prefill, decode = _claims([0, 1], "auto", 2)
    assert prefill == PinnedCores(1, (0,)) and decode == PinnedCores(1, (1,))
    assert not caplog.records


def test_a_colocated_worker_gets_every_core():
    assert _claims([0, 1], "auto", 1) == [PinnedCores(2, (0, 1))]
    assert _claims([4, 5, 6, 7], "auto", 1) == [PinnedCores(4, (4, 5, 6, 7))]


def test_equal_shares_and_the_leftover_cores_stay_free():
    assert _claims(range(8), "auto", 2) == [PinnedCores(4, (0, 1, 2, 3)), PinnedCores(4, (4, 5, 6, 7))]
    assert _claims([0, 1, 2], "auto", 2) == [PinnedCores(1, (0,)), PinnedCores(1, (1,))]  # core 2: gateway, Ray


def test_more_workers_than_cores_share_them_round_robin_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="pdserve.runtime.threads"):
        placements = _claims([0, 1], "auto", 3)
    assert [p.cores for p in placements] == [(0,), (1,), (0,)]
    assert [p.threads for p in placements] == [1, 1, 1]
    [warning] = caplog.records
    assert "w2 shares core(s) 0" in warning.message and "oversubscribed" in warning.message


def test_an_explicit_thread_count_pins_that_many_cores_when_there_are_enough(caplog):
    assert _claims(range(4), 2, 2) == [PinnedCores(2, (0, 1)), PinnedCores(2, (2, 3))]
    assert _claims(range(4), 1, 2) == [PinnedCores(1, (0,)), PinnedCores(1, (1,))]
    with caplog.at_level(logging.WARNING, logger="pdserve.runtime.threads"):
        [placement] = _claims([0, 1], 3, 1)
    assert placement == PinnedCores(3, (0, 1))  # three threads, but only two cores exist
    assert "3 torch threads on 2 core(s)" in caplog.records[0].message


def test_a_replacement_gets_the_cores_of_the_worker_it_replaces():
    ledger = CoreLedger(range(4), "auto", 2)
    prefill, decode = ledger.claim("prefill-0"), ledger.claim("decode-0")
    ledger.release("prefill-0")
    ledger.release("decode-0")
    # Both slots are free; each replacement takes its predecessor's, whichever claims first.
    assert ledger.claim("decode-1", decode).cores == (2, 3)
    assert ledger.claim("prefill-1", prefill).cores == (0, 1)


def test_an_added_worker_gets_the_least_used_cores():
    ledger = CoreLedger(range(4), "auto", 4)
    assert [ledger.claim(f"w{i}").cores for i in range(3)] == [(0,), (1,), (2,)]
    ledger.release("w1")
    assert ledger.claim("w3").cores == (1,)  # 1 and 3 are free: the lowest id
    assert ledger.claim("w4").cores == (3,)
    assert ledger.users() == {0: 1, 1: 1, 2: 1, 3: 1}


def test_workers_on_other_nodes_are_sized_by_their_cpus_and_not_pinned():
    assert UnpinnedPlan("auto", 4).claim("decode-0") == UnpinnedCpus(threads=4, num_cpus=4)
    assert UnpinnedPlan(8, 2).claim("decode-0") == UnpinnedCpus(threads=8, num_cpus=2)  # no more CPUs to ask for
    assert UnpinnedPlan(1, 4).claim("decode-0") == UnpinnedCpus(threads=1, num_cpus=1)


def test_a_placement_for_another_node_is_applied_unpinned(caplog):
    placement = PinnedCores(2, (0, 1), node_id="node-a")
    assert placement.on_node("node-a") is placement
    with caplog.at_level(logging.WARNING, logger="pdserve.runtime.threads"):
        assert placement.on_node("node-b") == UnpinnedCpus(threads=2, num_cpus=2)
    assert "not pinning" in caplog.records[0].message


def test_core_lists_print_as_ranges():
    assert format_cores([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert format_cores([3]) == "3"


# ------------------------------------------------------------------ the flag


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_threads_defaults_to_auto_and_takes_a_count(command):
    extra = ["--prompt", "hi"] if command == "generate" else []
    assert build_parser().parse_args([command, *extra]).threads == "auto"
    assert build_parser().parse_args([command, *extra, "--threads", "3"]).threads == 3


@pytest.mark.parametrize("bad", ["0", "-2", "abc", "1.5", ""])
def test_a_bad_thread_count_says_what_is_allowed(bad, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--threads", bad])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --threads: must be a positive integer or 'auto'" in err and repr(bad) in err


def test_the_worker_spec_checks_threads_too():
    assert parse_threads("auto") == "auto" and parse_threads(2) == 2
    for bad in (0, True, "2", 1.0):
        with pytest.raises(ConfigError, match="threads must be a positive integer or 'auto'"):
            WorkerSpec(model="m", threads=bad)


# ------------------------------------------------------------------ inside a real worker


@pytest.fixture(scope="module")
def local_ray():
    from pdserve.cluster.cli import _start_ray

    ray = _start_ray(None, 1, 1, 2, threads="auto")
    yield ray
    ray.shutdown()


def test_workers_are_pinned_where_the_controller_placed_them(local_ray, tiny_llama_dir):
    """1 prefill + 1 decode through the controller; each worker reports, from inside its
    process, the union of its threads' affinities and torch's thread count."""
    from pdserve.cluster.control.controller import Controller
    from pdserve.cluster.control.router import PrefixIndex

    cores = available_cores()
    per_worker = max(1, len(cores) // 2)
    assert local_ray.cluster_resources()["CPU"] == max(len(cores), 2 * 2 * per_worker)
    spec = WorkerSpec(model=str(tiny_llama_dir), block_size=4, kv_cache_memory_bytes=1024**2)
    controller = Controller(spec, 1, 1, PrefixIndex())

    async def start_and_stop():
        await controller.start()
        try:
            return sorted(controller.workers.values(), key=lambda w: w.role, reverse=True)
        finally:
            await controller.shutdown()

    prefill, decode = asyncio.run(start_and_stop())
    for worker, first in ((prefill, 0), (decode, per_worker % len(cores))):
        expected = tuple(cores[first:first + per_worker])
        assert worker.placement == PinnedCores(per_worker, expected, worker.placement.node_id)
        assert worker.info.cores == expected, f"{worker.worker_id}: every thread is on its cores"
        assert worker.info.threads == per_worker
    if len(cores) >= 2:
        assert not set(prefill.info.cores) & set(decode.info.cores)


def test_an_explicit_placement_is_what_the_worker_runs_with(local_ray, tiny_llama_dir):
    from pdserve.cluster.workers.actors import DecodeWorker

    core = available_cores()[-1]
    spec = WorkerSpec(model=str(tiny_llama_dir), block_size=4, kv_cache_memory_bytes=1024**2, threads=2)
    node = local_ray.get_runtime_context().get_node_id()
    actor = local_ray.remote(DecodeWorker).options(num_cpus=1, resources={"decode": 1}).remote(
        spec, "decode-x", PinnedCores(2, (core,), node))
    try:
        info = local_ray.get(actor.info.remote(), timeout=120)
    finally:
        local_ray.kill(actor)
    assert (info.cores, info.threads) == ((core,), 2)
