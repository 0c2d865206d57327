"""Autoscaler decisions on synthetic metric series (one observation per second)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from pdserve.cluster.control.autoscaler import Autoscaler, ScalingPolicy, split_budget
from pdserve.cluster.workers.stats import WorkerStats
from pdserve.runtime.config import ConfigError

POLICY = ScalingPolicy(min_prefill=1, max_prefill=3, min_decode=1, max_decode=3, prefill_tokens_per_worker=1000,
                       decode_waiting_per_worker=4, window_seconds=5, up_cooldown=10, down_delay=30,
                       down_cooldown=20)


def stats(role: str, count: int, *, tokens: int = 0, waiting: int = 0, kv: float = 0.0,
          for_kv: int = 0) -> list[WorkerStats]:
    """`count` workers sharing the load evenly."""
    return [WorkerStats(role, f"{role}-{i}", waiting // count, tokens // count, 0, for_kv // count, kv, 0, 0, 0,
                        0.0, {}, 0, 0.0) for i in range(count)]


class Cluster:
    """Applies decisions at once, as the controller would (ignoring start-up time)."""

    def __init__(self, policy: ScalingPolicy = POLICY, prefill: int = 1, decode: int = 1) -> None:
        self.autoscaler = Autoscaler(policy)
        self.count = {"prefill": prefill, "decode": decode}
        self.history: list[tuple[int, str, int, str]] = []

    def run(self, start: int, seconds: int, tokens=lambda t: 0, waiting=lambda t: 0, kv=lambda t: 0.0) -> None:
        for t in range(start, start + seconds):
            for d in self.autoscaler.observe(
                    float(t), stats("prefill", self.count["prefill"], tokens=tokens(t)),
                    stats("decode", self.count["decode"], waiting=waiting(t), kv=kv(t))):
                assert d.current == self.count[d.role]
                self.count[d.role] = d.desired
                self.history.append((t, d.role, d.desired, d.reason))


def test_long_prompt_burst_scales_prefill_up_then_down_after_it():
    cluster = Cluster()
    cluster.run(0, 60, tokens=lambda t: 2500 if t < 40 else 0)
    ups = [h for h in cluster.history if h[1] == "prefill"]
    assert ups[0][2] == 3 and "prompt tokens pending" in ups[0][3]  # ceil(2500 / 1000) at once
    assert cluster.count["decode"] == 1  # decode saw nothing
    cluster.run(60, 200)
    assert cluster.count["prefill"] == 1
    downs = [h for h in cluster.history if h[1] == "prefill"][1:]
    assert [d[2] for d in downs] == [2, 1]  # one step at a time
    assert downs[0][0] >= 40 + POLICY.down_delay  # only after the want stayed low long enough
    assert downs[1][0] - downs[0][0] >= POLICY.down_cooldown


def test_many_concurrent_decodes_scale_decode_up():
    cluster = Cluster()
    cluster.run(0, 30, waiting=lambda t: 10)
    assert cluster.count["decode"] == 3 and cluster.count["prefill"] == 1
    cluster.run(30, 10, waiting=lambda t: 0, kv=lambda t: 0.95)  # nobody waits but the KV is full
    assert cluster.count["decode"] == 3  # at max already: stays


def test_full_kv_adds_a_decode_worker_even_without_a_queue():
    cluster = Cluster()
    cluster.run(0, 3, kv=lambda t: 0.95)
    assert cluster.count["decode"] == 2
    assert "KV usage 95%" in cluster.history[0][3]


def test_respects_max_and_min_and_fixes_counts_outside_them():
    cluster = Cluster(prefill=5, decode=0)
    cluster.run(0, 1)
    assert cluster.count == {"prefill": 3, "decode": 1}
    cluster.run(1, 100, tokens=lambda t: 10**6, waiting=lambda t: 1000)
    assert cluster.count == {"prefill": 3, "decode": 3}
    cluster.run(101, 500)
    assert cluster.count == {"prefill": 1, "decode": 1}


def test_up_cooldown_limits_how_fast_it_grows():
    cluster = Cluster()
    cluster.run(0, 12, waiting=lambda t: 5 if t < 6 else 12)  # wants 2, then 3
    times = [h[0] for h in cluster.history if h[1] == "decode"]
    assert len(times) == 2 and times[1] - times[0] >= POLICY.up_cooldown


def test_noise_around_a_threshold_does_not_flap():
    rng = random.Random(0)
    load = [rng.choice((3, 5)) for _ in range(600)]  # wants 0.75 or 1.25 workers, averaging ~1
    cluster = Cluster(decode=2)
    cluster.run(0, 600, waiting=lambda t: load[t])
    decode_changes = [h for h in cluster.history if h[1] == "decode"]
    assert len(decode_changes) <= 2, decode_changes  # settles; no up/down cycling


def test_bad_policies_are_refused():
    with pytest.raises(ConfigError, match="min_decode"):
        ScalingPolicy(min_decode=0)
    with pytest.raises(ConfigError, match="min_prefill"):
        ScalingPolicy(min_prefill=3, max_prefill=2)
    with pytest.raises(ConfigError, match="window_seconds must be > 0"):
        ScalingPolicy(window_seconds=0)
    with pytest.raises(ConfigError, match="down_delay must be >= 0"):
        ScalingPolicy(down_delay=-1)
    with pytest.raises(ConfigError, match="decode_kv_usage_high"):
        ScalingPolicy(decode_kv_usage_high=1.5)
    with pytest.raises(ConfigError, match="max_workers .* at least min_prefill"):
        ScalingPolicy(min_prefill=2, max_workers=2)


def test_requests_waiting_for_their_kv_are_a_prefill_backlog_not_a_decode_one():
    autoscaler = Autoscaler(POLICY)
    for t in range(10):
        decisions = autoscaler.observe(float(t), stats("prefill", 1, tokens=2500), stats("decode", 1, for_kv=40))
        assert all(d.role == "prefill" for d in decisions)


# ------------------------------------------------------------------ a worker budget

BUDGET = dataclasses.replace(POLICY, max_workers=3)


def test_the_most_workers_at_once_is_the_budget_when_it_binds():
    assert POLICY.most_workers == 6  # 3 + 3
    assert BUDGET.most_workers == 3
    assert dataclasses.replace(POLICY, max_workers=10).most_workers == 6


def test_a_split_is_the_least_scored_of_the_total_the_wants_ask_for():
    scores = {(1, 2): 2.0, (2, 1): 1.0}
    wants = {"prefill": 2.5, "decode": 2.5}  # 3 + 3 asked, 3 in the budget
    assert split_budget(BUDGET, wants, (1, 1), lambda p, d: scores[(p, d)]) == (2, 1)
    assert split_budget(BUDGET, wants, (1, 2), lambda p, d: 1.0) == (1, 2)  # a tie keeps the serving split
    assert split_budget(BUDGET, {"prefill": 0.5, "decode": 0.5}, (1, 1), lambda p, d: 0.0) == (1, 1)  # within budget
    assert split_budget(POLICY, wants, (1, 1), lambda p, d: 0.0) is None  # no budget


def test_a_worker_budget_goes_to_the_role_with_the_most_load_per_worker_and_is_traded_by_draining_first():
    cluster = Cluster(BUDGET)
    held = []

    def run(start: int, seconds: int, **load) -> None:
        for t in range(start, start + seconds):
            cluster.run(t, 1, **load)
            held.append(sum(cluster.count.values()))

    # prefill wants 2.5 workers, decode 1.25: (2, 1) carries 1.25 a worker, (1, 2) 2.5
    run(0, 60, tokens=lambda t: 2500, waiting=lambda t: 5)
    assert cluster.count == {"prefill": 2, "decode": 1}
    # the load turns: decode now wants 2.5 and prefill 1.5; (1, 2) is better but decode
    # has no room until a prefill worker is gone, which waits like any scale-down
    turned = len(cluster.history)
    run(60, 120, tokens=lambda t: 1500, waiting=lambda t: 10)
    assert cluster.count == {"prefill": 1, "decode": 2}
    assert max(held) <= 3
    (t_down, role_down, _, why), (t_up, role_up, _, _) = cluster.history[turned:]
    assert (role_down, role_up) == ("prefill", "decode") and t_down < t_up
    assert t_down >= 60 + BUDGET.down_delay
    assert "share of the 3-worker budget: 1" in why  # prefill's own want (1.5) would have kept 2
