"""How many prefill and how many decode workers the cluster should run, from queue depth.

    Autoscaler.observe(now, prefill stats, decode stats) -> [Decision(role, current, desired, reason)]

It only decides counts; the controller starts or drains workers, and Ray (KubeRay's
autoscaler on Kubernetes) finds nodes for them through the role resources. The SLO
planner (`planner.SLOPlanner`) has the same `observe` and shares the bounds and the
anti-flap rules below (`CountPolicy`, `CountDamper`); only its signals differ.

Signals (the same `WorkerStats` the router and /metrics read):
    prefill  pending prompt tokens on the prefill workers (queued, not yet computed), plus
             the prompt tokens the gateway routed since the last observation that wanted a
             prefill worker and found none up (so a role scaled to 0 comes back);
             wanted workers = ceil(tokens / prefill_tokens_per_worker)
    decode   requests queued on the decode workers for admission (a free batch slot or
             KV memory); wanted workers = ceil(queued / decode_waiting_per_worker), and one
             more than now while the mean KV usage is above `decode_kv_usage_high`.
             Remote requests still waiting for their KV do not count: that backlog
             is the prefill workers' (it shows in their pending tokens).

Against flapping (`CountDamper`), per role:
    - the wanted count (a float: the load over what one worker should carry) is averaged
      over the last `window_seconds`;
    - up: as soon as the averaged want exceeds the count, at most once per `up_cooldown`;
    - down: one worker at a time, only when the averaged want would fit in one worker
      fewer with headroom to spare (want <= (count - 1) * `down_headroom`) for all of
      `down_delay` seconds, and at most once per `down_cooldown`; a want between that and
      the count (the hysteresis band) changes nothing;
    - counts stay within [min, max] per role; a count outside (e.g. at start) is corrected
      at once, without waiting for a cooldown.

A worker budget (`max_workers`, the workers the cluster's cores or GPUs hold at once) caps
the two roles together. Each observation splits it (`split_budget`): the total the wants
ask for (at most the budget) goes to the split the caller's score finds best, the current
split on a tie. A role's share is then the damper's count for it: below the count, the
role comes down one worker at a time after `down_delay` (when its own want would keep the
count, the hysteresis band does not hold it: the budget moved, not the load); above, it
goes up only into room no other worker holds (draining ones hold theirs until they stop).
So a worker is traded from one role to the other by draining first and starting after,
never above the budget. Here (queue depth) the score is the larger averaged want per
worker; the SLO planner scores splits by its predictions.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pdserve.cluster.workers.spec import ROLES
from pdserve.cluster.workers.stats import WorkerStats
from pdserve.runtime.config import ConfigError


@dataclass(frozen=True)
class CountPolicy:
    """Bounds per role and the anti-flap knobs (module docstring), whatever the signal."""

    min_prefill: int = 1
    max_prefill: int = 4
    min_decode: int = 1
    max_decode: int = 4
    window_seconds: float = 10.0
    up_cooldown: float = 30.0
    down_delay: float = 60.0
    down_cooldown: float = 60.0
    down_headroom: float = 0.7
    max_workers: int | None = None  # prefill + decode workers at once, draining ones included; None: no budget

    def __post_init__(self) -> None:
        for role in ROLES:
            low, high = self.bounds(role)
            floor = 0 if role == "prefill" else 1
            if not floor <= low <= high:
                raise ConfigError(f"need {floor} <= min_{role} <= max_{role}, got {low} and {high}")
        if self.window_seconds <= 0:
            raise ConfigError(f"window_seconds must be > 0, got {self.window_seconds}")
        for knob in ("up_cooldown", "down_delay", "down_cooldown"):
            if getattr(self, knob) < 0:
                raise ConfigError(f"{knob} must be >= 0 seconds, got {getattr(self, knob)}")
        if not 0 < self.down_headroom <= 1:
            raise ConfigError(f"down_headroom must be in (0, 1], got {self.down_headroom}")
        if self.max_workers is not None and self.max_workers < self.min_prefill + self.min_decode:
            raise ConfigError(f"max_workers ({self.max_workers}) must be at least min_prefill + min_decode "
                              f"({self.min_prefill + self.min_decode})")

    def bounds(self, role: str) -> tuple[int, int]:
        return getattr(self, f"min_{role}"), getattr(self, f"max_{role}")

    @property
    def most_workers(self) -> int:
        """The most workers that may run at once."""
        both = self.max_prefill + self.max_decode
        return both if self.max_workers is None else min(both, self.max_workers)


Split = tuple[int, int]  # (prefill workers, decode workers)


def split_budget(policy: CountPolicy, wants: Mapping[str, float], current: Split,
                 score: Callable[[int, int], float]) -> Split | None:
    """The budget's split for this observation (module docstring); None without a budget.
    The total is what the wants ask for, each within its bounds, at most the budget; of
    the splits of that total within the bounds, the one of least `score` (the current
    split when it scores no worse than the best)."""
    if policy.max_workers is None:
        return None
    (low_p, high_p), (low_d, high_d) = policy.bounds("prefill"), policy.bounds("decode")
    asked = (min(max(math.ceil(wants["prefill"] - 1e-9), low_p), high_p)
             + min(max(math.ceil(wants["decode"] - 1e-9), low_d), high_d))
    total = min(asked, policy.max_workers)
    splits = [(p, total - p) for p in range(low_p, high_p + 1) if low_d <= total - p <= high_d]
    best = min(splits, key=lambda split: score(*split))
    return current if current in splits and score(*current) <= score(*best) else best


def load_per_worker(wants: Mapping[str, float]) -> Callable[[int, int], float]:
    """The queue-depth score: the larger want per worker of the two roles (a role
    with a want and no worker: unbounded)."""
    def score(prefill: int, decode: int) -> float:
        return max(wants[role] / count if count else (math.inf if wants[role] > 0 else 0.0)
                   for role, count in (("prefill", prefill), ("decode", decode)))
    return score


def current_counts(counts: Mapping[str, int] | None, prefill: Sequence[WorkerStats],
                   decode: Sequence[WorkerStats]) -> dict[str, int]:
    """Each role's count as `observe` takes it: `counts[role]` if given (workers still
    starting count as there), else the number of its stats."""
    return {"prefill": counts["prefill"] if counts is not None else len(prefill),
            "decode": counts["decode"] if counts is not None else len(decode)}


def budget_shares(policy: CountPolicy, split: Split | None, current: Mapping[str, int],
                  draining: Mapping[str, int] | None) -> dict[str, int | None]:
    """Per role, the count the budget gives it now: its part of `split`, but no more than
    the room the other role's workers leave (`current` and `draining`: they hold theirs
    until they stop). None per role without a budget."""
    if policy.max_workers is None or split is None:
        return dict.fromkeys(ROLES, None)
    held = {role: current[role] + (draining or {}).get(role, 0) for role in ROLES}
    shares = dict(zip(("prefill", "decode"), split))
    return {role: min(shares[role], policy.max_workers - sum(n for other, n in held.items() if other != role))
            for role in ROLES}


@dataclass(frozen=True)
class ScalingPolicy(CountPolicy):
    prefill_tokens_per_worker: int = 4096  # pending prompt tokens one prefill worker should hold
    decode_waiting_per_worker: int = 4  # requests waiting per decode worker before adding one
    decode_kv_usage_high: float = 0.85

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefill_tokens_per_worker < 1 or self.decode_waiting_per_worker < 1:
            raise ConfigError("prefill_tokens_per_worker and decode_waiting_per_worker must be >= 1")
        if not 0 < self.decode_kv_usage_high <= 1:
            raise ConfigError(f"decode_kv_usage_high must be in (0, 1], got {self.decode_kv_usage_high}")


class Decision(NamedTuple):
    role: str
    current: int
    desired: int
    reason: str

    @property
    def direction(self) -> str:
        return "up" if self.desired > self.current else "down"


class _RoleState:
    def __init__(self) -> None:
        self.samples: deque[tuple[float, float]] = deque()  # (time, wanted workers)
        self.last_change = -math.inf
        self.below_since: float | None = None  # when the want first fell below the band


class CountDamper:
    """Turns each role's wanted worker count, sampled at every observation (`record`),
    into at most one change per role and observation (`decide`), by the rules in the module
    docstring. It holds the samples and the times of past changes."""

    def __init__(self, policy: CountPolicy) -> None:
        self.policy = policy
        self._roles = {role: _RoleState() for role in ROLES}

    def record(self, role: str, now: float, wanted: float) -> float:
        """Record `wanted` (workers, a float) at `now`; the want averaged over the window.
        Calls come in time order, one per role and observation, before `decide`."""
        state = self._roles[role]
        state.samples.append((now, wanted))
        while state.samples and state.samples[0][0] < now - self.policy.window_seconds:
            state.samples.popleft()
        return self.average(role)

    def average(self, role: str) -> float:
        samples = self._roles[role].samples
        return sum(w for _, w in samples) / len(samples) if samples else 0.0

    def decide(self, role: str, now: float, current: int, why: str, share: int | None = None) -> Decision | None:
        """The change of `role`'s count to make now, if any, from the wants recorded over
        the window; its reason is `why` and the averaged want. `share`: the role's count in
        the budget's split, None without a budget (module docstring)."""
        p, state = self.policy, self._roles[role]
        low, high = p.bounds(role)
        if not low <= current <= high:
            state.last_change = now
            return Decision(role, current, min(max(current, low), high), f"outside [{low}, {high}]")
        average = self.average(role)
        desired = min(max(math.ceil(average - 1e-9), low), high)
        # Down because the budget moved, not the load: the hysteresis band does not hold it.
        traded = share is not None and share < current <= desired
        if share is not None:
            desired = min(max(share, low), high)
            why = f"{why}; its share of the {p.max_workers}-worker budget: {desired}"
        if desired < current and not traded and average > (current - 1) * p.down_headroom:
            desired = current  # inside the hysteresis band
        if desired > current:
            state.below_since = None
            if now - state.last_change < p.up_cooldown:
                return None
            state.last_change = now
            return Decision(role, current, desired, f"{why} (average want {average:.2f} workers)")
        if desired < current:
            state.below_since = state.below_since if state.below_since is not None else now
            if now - state.below_since < p.down_delay or now - state.last_change < p.down_cooldown:
                return None
            state.last_change, state.below_since = now, None
            return Decision(role, current, current - 1, f"{why} (average want {average:.2f} workers "
                            f"for {p.down_delay:.0f} s)")
        state.below_since = None
        return None


class Autoscaler:
    def __init__(self, policy: ScalingPolicy) -> None:
        self.policy = policy
        self._damper = CountDamper(policy)

    def observe(self, now: float, prefill: Sequence[WorkerStats], decode: Sequence[WorkerStats],
                counts: dict[str, int] | None = None, unmet_prefill_tokens: int = 0,
                draining: Mapping[str, int] | None = None, prompts: Sequence[int] = ()) -> list[Decision]:
        """Take one snapshot of the serving workers' stats; return the changes to make now
        (at most one per role). The current count of a role is `counts[role]` if given
        (workers still starting count as there), else the number of its stats.
        `unmet_prefill_tokens`: see the prefill signal in the module docstring; `draining`:
        workers per role being drained (they hold their share of the budget until they
        stop); `prompts` (the planner's signal) is not read here."""
        current = current_counts(counts, prefill, decode)
        wants = {"prefill": self._prefill_want(prefill, unmet_prefill_tokens), "decode": self._decode_want(decode)}
        averaged = {role: self._damper.record(role, now, want) for role, (want, _) in wants.items()}
        split = split_budget(self.policy, averaged, (current["prefill"], current["decode"]), load_per_worker(averaged))
        shares = budget_shares(self.policy, split, current, draining)
        decisions = []
        for role, (_, why) in wants.items():
            decision = self._damper.decide(role, now, current[role], why, shares[role])
            if decision is not None:
                decisions.append(decision)
        return decisions

    # ------------------------------------------------------------------ signals

    def _prefill_want(self, stats: Sequence[WorkerStats], unmet_tokens: int) -> tuple[float, str]:
        tokens = sum(s.num_waiting_tokens for s in stats)
        why = f"{tokens} prompt tokens pending on prefill"
        if unmet_tokens:
            why += f", {unmet_tokens} that found no prefill worker"
        return (tokens + unmet_tokens) / self.policy.prefill_tokens_per_worker, why

    def _decode_want(self, stats: Sequence[WorkerStats]) -> tuple[float, str]:
        waiting = sum(s.num_waiting for s in stats)
        wanted = waiting / self.policy.decode_waiting_per_worker
        usage = sum(s.kv_usage for s in stats) / len(stats) if stats else 0.0
        why = f"{waiting} requests waiting on decode, KV usage {usage:.0%}"
        if usage > self.policy.decode_kv_usage_high:
            wanted = max(wanted, len(stats) + 1)
        return wanted, why
