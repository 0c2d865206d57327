"""SLO planner on a simulated cluster: prefill workers computing prompts at a token rate,
decode workers whose step time grows with their batch, requests arriving per a load trace.

Every decision interval the simulator hands the planner the serving workers' stats (the
same `WorkerStats` counters the actors report) and applies its decisions as the controller
does: a new worker serves after a start-up delay (it counts as there meanwhile), a removed
one takes no new request and leaves once empty. Time is simulated: nothing here sleeps.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
import statistics
from collections import deque
from collections.abc import Callable

import pytest

from pdserve.cluster.control.planner import (
    CORRECTION_RANGE,
    MIN_CALIBRATION_REQUESTS,
    SPLIT_MARGIN,
    PlannerPolicy,
    SLOPlanner,
    StepTimeModel,
    fit_step_time,
)
from pdserve.cluster.workers.stats import WorkerStats
from pdserve.runtime.config import ConfigError

PREFILL_RATE = 2000.0  # prompt tokens per second of one prefill worker
CHUNK = 512  # prompt tokens per prefill step
STEP = StepTimeModel(0.02, 0.004, 1 / PREFILL_RATE)  # decode step seconds: a batch, local prompt tokens
TRANSFER = 0.1  # seconds from a prompt's last chunk to its KV on the decode worker
NOISE = 0.1  # every step takes its nominal time times uniform(1 - NOISE, 1 + NOISE)
INTERVAL = 2.0  # seconds between observations
STARTUP = 4.0  # seconds before a new worker serves
TICK = 0.05
LOCAL_CHUNK = 64  # prompt tokens a decode worker computes per step beside its decodes

POLICY = PlannerPolicy(ttft_slo=1.5, tpot_slo=0.1, min_prefill=1, max_prefill=6, min_decode=1, max_decode=6,
                       window_seconds=30, up_cooldown=15, down_delay=60, down_cooldown=30, fit_seconds=60)


class Req:
    def __init__(self, arrival: float, prompt: int, output: int) -> None:
        self.arrival, self.prompt, self.output = arrival, prompt, output
        self.first_token: float | None = None
        self.finished: float | None = None
        self.emitted = 0

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        return (self.finished - self.first_token) / (self.output - 1)


class SimWorker:
    def __init__(self, role: str, worker_id: str, rng: random.Random, now: float) -> None:
        self.role, self.worker_id, self.rng, self.clock = role, worker_id, rng, now
        self.draining = False
        self.steps = self.step_seconds = self.prompt_tokens = self.batch_stepped = 0
        self.transfers, self.transfer_seconds = 0, 0.0

    def _step(self, seconds: float, batch: int) -> float:
        seconds *= self.rng.uniform(1 - NOISE, 1 + NOISE)
        self.clock += seconds
        self.steps += 1
        self.step_seconds += seconds
        self.batch_stepped += batch
        return self.clock


class SimPrefill(SimWorker):
    """FCFS, one prompt per step, in chunks; a finished prompt goes to its decode worker."""

    def __init__(self, *args) -> None:
        super().__init__("prefill", *args)
        self.queue: deque[tuple[Req, SimDecode]] = deque()
        self.current: tuple[Req, SimDecode] | None = None
        self.remaining = 0

    @property
    def load(self) -> int:
        return self.remaining + sum(r.prompt for r, _ in self.queue)

    @property
    def idle(self) -> bool:
        return self.current is None and not self.queue

    def add(self, request: Req, decode: SimDecode, now: float) -> None:
        if self.idle:
            self.clock = max(self.clock, now)
        self.queue.append((request, decode))

    def run_until(self, end: float) -> None:
        while self.clock < end:
            if self.current is None and self.queue:
                self.current = self.queue.popleft()
                self.remaining = self.current[0].prompt
            if self.current is None:
                self.clock = end
                return
            tokens = min(CHUNK, self.remaining)
            done = self._step(tokens / PREFILL_RATE, 1)
            self.prompt_tokens += tokens
            self.remaining -= tokens
            if not self.remaining:
                request, decode = self.current
                decode.kv_arrives(request, done + TRANSFER)
                self.transfers += 1
                self.transfer_seconds += TRANSFER  # accepted TRANSFER after its last step
                self.current = None

    def stats(self) -> WorkerStats:
        return WorkerStats("prefill", self.worker_id, len(self.queue), sum(r.prompt for r, _ in self.queue),
                           int(self.current is not None), 0, 0.0, 0, 0, 0, 0.0, {"sent": self.transfers},
                           self.steps, self.step_seconds, self.prompt_tokens, self.batch_stepped,
                           kv_tail_seconds=self.transfer_seconds)


class SimDecode(SimWorker):
    """Continuous batching: each step gives every running request one token; a request
    joins at the first step after its KV arrived (its first token, sampled by the
    prefill worker, is emitted then). A prompt routed here (local) is computed FCFS,
    LOCAL_CHUNK tokens a step beside the decodes, at the prefill workers' rate; it joins
    the batch when done."""

    # Seconds between steps, per second of step, that no step counts (taking in transfers,
    # handing out tokens, a machine shared with the gateway): TPOT sees it, the model not.
    outside_steps = 0.0

    def __init__(self, *args) -> None:
        super().__init__("decode", *args)
        self.running: list[Req] = []
        self.incoming: list[tuple[float, Req]] = []  # (KV arrival, request)
        self.local: deque[Req] = deque()  # prompts to compute here, first one in progress
        self.local_done = 0  # tokens of the first one computed
        self.assigned = 0  # requests routed here and not finished
        self.finished = 0

    @property
    def idle(self) -> bool:
        return not self.assigned

    def kv_arrives(self, request: Req, at: float) -> None:
        self.incoming.append((at, request))

    def add_local(self, request: Req, now: float) -> None:
        if not self.running and not self.local:
            self.clock = max(self.clock, now)
        self.local.append(request)

    def run_until(self, end: float) -> None:
        while self.clock < end:
            arrived = [r for at, r in self.incoming if at <= self.clock]
            self.incoming = [(at, r) for at, r in self.incoming if at > self.clock]
            for request in arrived:
                request.first_token, request.emitted = self.clock, 1
                self.transfers += 1
                self.transfer_seconds += TRANSFER
            self.running += arrived
            if not self.running and not self.local:
                self.clock = min([end] + [at for at, _ in self.incoming])
                continue
            chunk = min(LOCAL_CHUNK, self.local[0].prompt - self.local_done) if self.local else 0
            done = self._step(STEP(len(self.running), chunk), len(self.running))
            if self.outside_steps:
                self.clock = done = done + STEP(len(self.running)) * self.outside_steps
            self.prompt_tokens += chunk
            self.local_done += chunk
            prompted = []
            if self.local and self.local_done == self.local[0].prompt:
                prompted, self.local_done = [self.local.popleft()], 0
                prompted[0].first_token, prompted[0].emitted = done, 1
            for request in self.running:
                request.emitted += 1
                if request.emitted == request.output:
                    request.finished = done
                    self.assigned -= 1
                    self.finished += 1
            self.running = [r for r in self.running if r.finished is None] + prompted

    def stats(self) -> WorkerStats:
        waiting_for_kv = sum(1 for at, _ in self.incoming if at > self.clock)
        return WorkerStats("decode", self.worker_id, len(self.incoming) - waiting_for_kv + len(self.local),
                           sum(r.prompt for r in self.local) - self.local_done, len(self.running),
                           waiting_for_kv, 0.0, 0, 0, 0, self.transfer_seconds, {"succeeded": self.transfers},
                           self.steps, self.step_seconds, self.prompt_tokens, self.batch_stepped,
                           requests_finished=self.finished)


def uniform_requests(rng: random.Random) -> tuple[int, int]:
    """(prompt tokens, output tokens) of the default load."""
    return rng.randint(600, 1400), rng.randint(60, 140)


class SimCluster:
    """Routes as the gateway does: prompts up to the plan's local-prefill threshold (the
    router's default before there is one), and all while no prefill worker serves, are
    computed on their decode worker."""

    def __init__(self, policy: PlannerPolicy = POLICY, prefill: int = 1, decode: int = 1, seed: int = 0,
                 requests: Callable[[random.Random], tuple[int, int]] = uniform_requests,
                 calibrate: bool = False) -> None:
        self.planner = SLOPlanner(policy)
        self.calibrate = calibrate  # hand the planner the TPOT measured over each window, as SLOControl does
        self.make_request = requests
        self.routed: list[int] = []  # prompt tokens routed since the last observation
        self.most_held = 0  # the most workers held at once (starting, serving, draining)
        self.unmet = 0  # prompt tokens since the last observation that wanted a prefill worker and found none
        self.rng = random.Random(seed)
        self.now = 0.0
        self.workers: list[SimWorker] = []
        self.starting: list[tuple[float, str]] = []  # (serving from, role)
        self.requests: list[Req] = []
        self.history: list[tuple[float, str, int, str]] = []  # (time, role, new count, reason)
        self.timeline: list[tuple[float, dict[str, int]]] = []  # counts after each observation
        self.plans = []
        self._made = 0
        for role, count in (("prefill", prefill), ("decode", decode)):
            for _ in range(count):
                self._add_worker(role)
        self._next_arrival = 0.0

    def _add_worker(self, role: str) -> None:
        self._made += 1
        kind = SimPrefill if role == "prefill" else SimDecode
        self.workers.append(kind(f"{role}-{self._made}", random.Random(self.rng.random()), self.now))

    def serving(self, role: str) -> list[SimWorker]:
        return [w for w in self.workers if w.role == role and not w.draining]

    def count(self, role: str) -> int:
        return len(self.serving(role)) + sum(1 for _, r in self.starting if r == role)

    def run(self, until: float, rate: Callable[[float], float]) -> None:
        """Serve Poisson arrivals at `rate(t)` requests per second until `until`."""
        next_observation = math.floor(self.now / INTERVAL) * INTERVAL + INTERVAL
        while self.now < until:
            while self._next_arrival <= self.now:
                self._route(Req(self._next_arrival, *self.make_request(self.rng)))
                self._next_arrival += self.rng.expovariate(rate(self._next_arrival))
            end = self.now + TICK
            for worker in self.workers:
                worker.run_until(end)
            self.workers = [w for w in self.workers if not (w.draining and w.idle)]
            self.now = end
            for at, role in [s for s in self.starting if s[0] <= self.now]:
                self.starting.remove((at, role))
                self._add_worker(role)
            if self.now >= next_observation - 1e-9:
                self._observe()
                next_observation += INTERVAL

    def _route(self, request: Req) -> None:
        decode = min(self.serving("decode"), key=lambda w: w.assigned)
        decode.assigned += 1
        plan = self.planner.last_plan
        local = self.planner.policy.local_prefill_tokens if plan is None or plan.local_prefill_threshold is None \
            else plan.local_prefill_threshold
        if not self.serving("prefill") or request.prompt <= local:
            decode.add_local(request, self.now)
            if request.prompt > local:  # it wanted a prefill worker
                self.unmet += request.prompt
        else:
            min(self.serving("prefill"), key=lambda w: w.load).add(request, decode, self.now)
        self.routed.append(request.prompt)
        self.requests.append(request)

    def held(self) -> int:
        """Workers holding their share of a budget: starting, serving and draining."""
        return len(self.workers) + len(self.starting)

    def _observe(self) -> None:
        counts = {role: self.count(role) for role in ("prefill", "decode")}
        draining = {role: sum(1 for w in self.workers if w.role == role and w.draining) for role in counts}
        decisions = self.planner.observe(self.now, [w.stats() for w in self.serving("prefill")],
                                         [w.stats() for w in self.serving("decode")], counts,
                                         unmet_prefill_tokens=self.unmet, draining=draining, prompts=self.routed)
        self.routed, self.unmet = [], 0
        self.plans.append(self.planner.last_plan)
        if self.calibrate:
            window = [r.tpot for r in self.requests
                      if r.finished is not None and r.finished >= self.now - self.planner.policy.window_seconds]
            self.planner.calibrate(statistics.mean(window) if window else None, len(window))
        for d in decisions:
            assert d.current == counts[d.role]
            self.history.append((self.now, d.role, d.desired, d.reason))
            if d.desired > d.current:
                self.starting += [(self.now + STARTUP, d.role)] * (d.desired - d.current)
            else:
                victims = sorted(self.serving(d.role), key=lambda w: (w.load if d.role == "prefill" else w.assigned))
                for worker in victims[:d.current - d.desired]:
                    worker.draining = True
        self.timeline.append((self.now, {role: self.count(role) for role in ("prefill", "decode")}))
        self.most_held = max(self.most_held, self.held())

    def counts_at(self, when: float) -> dict[str, int]:
        return next(counts for t, counts in self.timeline if t >= when)

    def changes(self, role: str, since: float = 0.0) -> list[tuple[float, int]]:
        return [(t, n) for t, r, n, _ in self.history if r == role and t >= since]

    def observed(self, start: float, end: float) -> tuple[float, float]:
        """Mean TTFT of the requests that arrived in [start, end), mean TPOT of those that
        finished in it."""
        ttft = [r.ttft for r in self.requests if start <= r.arrival < end and r.first_token is not None]
        tpot = [r.tpot for r in self.requests if r.finished is not None and start <= r.finished < end]
        return statistics.mean(ttft), statistics.mean(tpot)


def steady(rate: float) -> Callable[[float], float]:
    return lambda t: rate


def no_up_down_up(changes: list[tuple[float, int]], start: int) -> bool:
    counts = [start] + [n for _, n in changes]
    directions = [b > a for a, b in itertools.pairwise(counts)]
    return not any(d1 and not d2 and d3 for d1, d2, d3 in zip(directions, directions[1:], directions[2:]))


# ---------------------------------------------------------------------------- the cluster


@pytest.mark.parametrize("seed", range(4))
def test_steady_load_settles_and_never_flaps(seed):
    """From one worker each, 3 requests/s: the counts rise to what the load needs within
    the first three minutes (less when the first burst happens to be mild), then change at
    most once more (one step down, when the noise of a 30 s window lets the want stay
    below the band for down_delay); they never go up, down and up again."""
    cluster = SimCluster(seed=seed)
    cluster.run(900, steady(3.0))
    for role in ("prefill", "decode"):
        assert no_up_down_up(cluster.changes(role), 1), cluster.history
        assert len(cluster.changes(role, since=180)) <= 1, cluster.history
    # 3000 prompt tokens/s on 2000 tok/s workers busy at most ~70% (for a queue wait within
    # the TTFT budget) want 2.2 workers; 300 decode tokens/s at 15 requests a step want 1.6
    assert cluster.count("prefill") == 3 and cluster.count("decode") in (2, 3)
    served = [r for r in cluster.requests if r.arrival > 180 and r.finished is not None]
    assert statistics.quantiles([r.ttft for r in served], n=10)[-1] <= POLICY.ttft_slo
    assert statistics.quantiles([r.tpot for r in served], n=10)[-1] <= POLICY.tpot_slo


@pytest.mark.parametrize("seed", range(3))
def test_a_step_up_in_load_is_followed_within_two_windows_and_a_step_down_eventually(seed):
    low, high, up_at, down_at = 2.5, 4.5, 300, 500
    cluster = SimCluster(seed=seed)
    cluster.run(800, lambda t: high if up_at <= t < down_at else low)
    within = up_at + 2 * POLICY.window_seconds
    # what the planner wants at the high load once its window holds only that load
    needed = {role: math.ceil(statistics.mean(p.want[role] for p in cluster.plans if within <= p.at < down_at))
              for role in ("prefill", "decode")}
    before, after, peak = cluster.counts_at(up_at - 1), cluster.counts_at(within), cluster.counts_at(down_at - 1)
    assert all(before[role] < needed[role] for role in needed), (before, needed)  # the step asks for more
    assert all(after[role] >= needed[role] for role in needed), (after, needed, cluster.history)
    for role in ("prefill", "decode"):
        during = [n for t, n in cluster.changes(role, since=up_at) if t < down_at]
        assert during == sorted(during) and during[0] > before[role]  # only up while the load is high
        downs = cluster.changes(role, since=down_at)
        counts = [peak[role]] + [n for _, n in downs]
        assert len(counts) > 1 and all(b == a - 1 for a, b in itertools.pairwise(counts))  # one at a time
        assert downs[0][0] >= down_at + POLICY.down_delay  # only once the want stayed low for down_delay


@pytest.mark.parametrize("rate", [2.5, 4.5])
def test_predictions_converge_to_what_the_cluster_does(rate):
    """Window by window after the first three minutes, the mean prediction of the window's
    observations against the mean TTFT of the requests that arrived in it and the mean
    TPOT of those that finished in it.

    Bound: 30% per window, 15% over the run (the worst of 40 such runs, 4 loads x 10
    seeds, was 26% and 12%). TTFT: a worker's `num_waiting_tokens` counts queued prompts
    only, not the rest of the one it is computing, so the prediction misses part of the
    wait (5-12% low), against a whole decode step allowed for the first token where a
    request waits half of one on average. TPOT: the steady batch stands for a batch that
    wanders around it (within 5%). A 30 s window's mean TTFT wanders by another ~10%
    around its expectation (Poisson arrivals queueing)."""
    cluster = SimCluster(seed=2)
    cluster.run(900, steady(rate))
    totals = {"ttft": ([], []), "tpot": ([], [])}
    for start in range(180, 870, int(POLICY.window_seconds)):
        end = start + POLICY.window_seconds
        plans = [p for p in cluster.plans if start <= p.at < end]
        observed = dict(zip(("ttft", "tpot"), cluster.observed(start, end)))
        for slo in ("ttft", "tpot"):
            predicted = statistics.mean(getattr(p, slo) for p in plans)
            assert abs(predicted / observed[slo] - 1) < 0.30, (slo, start, predicted, observed[slo])
            totals[slo][0].append(predicted)
            totals[slo][1].append(observed[slo])
    for slo, (predicted, observed) in totals.items():
        assert abs(sum(predicted) / sum(observed) - 1) < 0.15, slo


def test_suggested_batch_limit_and_local_prefill_threshold_come_from_the_fitted_models():
    cluster = SimCluster(seed=3)
    cluster.run(300, steady(3.0))
    plan = cluster.plans[-1]
    # largest batch with t(batch) <= tpot_slo: (0.1 - 0.02) / 0.004 = 20 on the true model
    assert 18 <= plan.batch_limit <= 22
    # the hop (0.1 s) is worth 200 prompt tokens of compute at 2000 tok/s
    assert 180 <= plan.local_prefill_threshold <= 220
    assert plan.forecast.prefill_rate == pytest.approx(PREFILL_RATE, rel=0.05)
    assert plan.forecast.transfer_seconds == pytest.approx(TRANSFER)


def test_decisions_name_the_prediction_behind_them():
    cluster = SimCluster()
    cluster.run(60, steady(3.0))
    first_up = {role: next(reason for _, r, _, reason in cluster.history if r == role) for role in ("prefill", "decode")}
    assert re.search(r"TTFT [\d.]+ s predicted now .*; TTFT [\d.]+ s expected with \d prefill workers",
                     first_up["prefill"]), first_up
    assert re.search(r"TPOT [\d.]+ s predicted now .*; TPOT [\d.]+ s expected with \d decode workers",
                     first_up["decode"]), first_up
    assert "target 1.5 s" in first_up["prefill"] and "target 0.1 s" in first_up["decode"]


# ---------------------------------------------------------------------------- the planner alone


def stats(role: str, worker_id: str = "w0", *, waiting: int = 0, tokens: int = 0, running: int = 0,
          steps: int = 0, seconds: float = 0.0, computed: int = 0, stepped: int = 0, transfers: int = 0,
          tail_seconds: float = 0.0) -> WorkerStats:
    outcomes = {"sent" if role == "prefill" else "succeeded": transfers}
    return WorkerStats(role, worker_id, waiting, tokens, running, 0, 0.0, 0, 0, 0, 0.0, outcomes,
                       steps, seconds, computed, stepped, kv_tail_seconds=tail_seconds)


def test_the_fit_recovers_a_and_b_from_noisy_points():
    """200 points at batches 1..32, step time noise of 3 ms (sd): the standard error of b
    is 3 ms / sqrt(sum (x - mean)^2) ~ 0.02 ms (0.6% of b), of a ~0.4 ms (2% of a), and the
    slope prior (weight 8 against a spread of ~17000) pulls b by under 0.1%: 5% and 10%
    are several standard errors wide."""
    rng = random.Random(0)
    truth = StepTimeModel(0.02, 0.004)
    points = [(x, 0, truth(x) + rng.gauss(0, 0.003)) for x in (rng.randint(1, 32) for _ in range(200))]
    fitted = fit_step_time(points, StepTimeModel(0.1, 0.0))
    assert fitted.b == pytest.approx(truth.b, rel=0.05)
    assert fitted.a == pytest.approx(truth.a, rel=0.10)


def test_the_fit_separates_the_cost_of_local_prompt_tokens_from_the_batch():
    """Steps of 1..32 requests, some carrying 0..128 prompt tokens of a local prefill at
    6 ms a token (twice the prior's 3 ms): e comes out near 6 ms, b and a stay where
    they were; the batch and the prompt tokens vary independently, so neither slope
    takes the other's time."""
    rng = random.Random(1)
    truth = StepTimeModel(0.02, 0.004, 0.006)
    points = []
    for _ in range(300):
        x, z = rng.randint(1, 32), rng.choice([0, 0, 0, rng.randint(1, 128)])
        points.append((x, z, truth(x, z) + rng.gauss(0, 0.003)))
    fitted = fit_step_time(points, StepTimeModel(0.1, 0.0, 0.003))
    assert fitted.e == pytest.approx(truth.e, rel=0.05)
    assert fitted.b == pytest.approx(truth.b, rel=0.05)
    assert fitted.a == pytest.approx(truth.a, rel=0.15)


def test_the_fit_keeps_the_prior_slope_until_the_batch_varies():
    prior = StepTimeModel(0.05, 0.003, 0.001)
    assert fit_step_time([], prior) == prior
    fitted = fit_step_time([(8, 0, 0.06), (8, 0, 0.062), (8, 0, 0.058)], prior)
    assert fitted.b == pytest.approx(prior.b) and fitted.e == pytest.approx(prior.e)
    assert fitted(8) == pytest.approx(0.06)
    falling = fit_step_time([(1, 0, 0.001), (2, 0, 0.0005), (1, 50, 0.001), (2, 60, 0.0001)], prior)
    assert falling.b >= 0 and falling.e >= 0 and falling.a >= 0  # never a falling step time


def test_decode_points_leave_out_the_time_of_local_prefills():
    planner = SLOPlanner(POLICY)
    # the prefill workers compute 2000 tokens per second of step time
    planner.observe(0.0, [stats("prefill")], [stats("decode")])
    # 100 steps of 8 requests at 0.052 s, plus 2000 prompt tokens prefilled locally (1 s at 2000 tok/s)
    planner.observe(2.0, [stats("prefill", steps=100, seconds=100.0, computed=200000, transfers=200)],
                    [stats("decode", steps=100, seconds=100 * 0.052 + 1.0, computed=2000, stepped=800)])
    forecast = planner.last_plan.forecast
    assert forecast.prefill_rate == pytest.approx(2000, rel=0.01)  # the prior weighs 1 s against 100
    assert forecast.step(8) == pytest.approx(0.052, rel=0.01)


def test_a_worker_whose_counters_start_over_is_a_new_baseline():
    planner = SLOPlanner(POLICY)
    busy = stats("prefill", steps=500, seconds=100.0, computed=200000, transfers=200)
    planner.observe(0.0, [busy], [stats("decode")])
    planner.observe(2.0, [stats("prefill", steps=3, seconds=1.0, computed=1000, transfers=1)], [stats("decode")])
    assert planner.last_plan.forecast.prefill_rate == POLICY.prior_prefill_tokens_per_second  # no data yet
    assert planner.last_plan.forecast.offered_tokens_per_second == 0


def test_prefill_comes_back_from_zero_for_tokens_that_found_no_prefill_worker():
    policy = PlannerPolicy(ttft_slo=1.5, tpot_slo=0.1, min_prefill=0, max_prefill=2, window_seconds=1, up_cooldown=0)
    planner = SLOPlanner(policy)
    counts = {"prefill": 0, "decode": 1}
    assert planner.observe(0.0, [], [stats("decode")], counts) == []
    decisions = planner.observe(2.0, [], [stats("decode")], counts, unmet_prefill_tokens=3000)
    # 1500 tok/s offered, at the prior 1000 tok/s per worker and 85% utilization: 1.76 workers
    assert [(d.role, d.current, d.desired) for d in decisions] == [("prefill", 0, 2)]
    assert "1500 tok/s offered" in decisions[0].reason


def test_a_backlog_asks_for_one_empty_worker_not_for_as_many_as_would_drain_it():
    """Prompts stay on the worker they were routed to: workers added later take the next
    prompts, not the backlog."""
    policy = PlannerPolicy(ttft_slo=1.5, tpot_slo=0.1, max_prefill=8, window_seconds=1, up_cooldown=0)
    planner = SLOPlanner(policy)

    def worker(i: int, t: int, queued: int) -> WorkerStats:  # busy half the time at 2000 tok/s, 1000-token prompts
        return stats("prefill", f"p{i}", waiting=queued // 1000, tokens=queued, steps=5 * t, seconds=0.5 * t,
                     computed=1000 * t, transfers=t)

    # one worker with a long queue, the other empty: the next prompt waits for nothing
    planner.observe(0.0, [worker(0, 0, 20000), worker(1, 0, 0)], [stats("decode")])
    assert planner.observe(2.0, [worker(0, 2, 20000), worker(1, 2, 0)], [stats("decode")]) == []
    rate = (4000 + POLICY.prior_prefill_tokens_per_second) / (2 + 1)  # the prior weighs one second
    assert planner.last_plan.ttft == pytest.approx(1000 / rate + STEP_PRIOR(1))  # its own prompt, one step
    # both queued: one more worker, though 10000 tokens would take far more to drain in 1.2 s
    decisions = planner.observe(4.0, [worker(0, 4, 5000), worker(1, 4, 5000)], [stats("decode")])
    assert [(d.role, d.current, d.desired) for d in decisions] == [("prefill", 2, 3)]
    assert "5000 on the least busy worker" in decisions[0].reason


STEP_PRIOR = StepTimeModel(POLICY.prior_step_seconds, POLICY.prior_step_seconds_per_request)


def test_a_target_out_of_reach_wants_the_most_workers_and_says_so():
    policy = PlannerPolicy(ttft_slo=1.5, tpot_slo=0.02, window_seconds=1, up_cooldown=0)  # a 1-request step is 22 ms
    planner = SLOPlanner(policy)
    planner.observe(0.0, [stats("prefill")], [stats("decode")])
    decisions = planner.observe(2.0, [stats("prefill")], [stats("decode", running=3, steps=50, seconds=50 * 0.032,
                                                                        stepped=150)])
    assert [(d.role, d.desired) for d in decisions] == [("decode", policy.max_decode)]
    assert "TPOT target 0.02 s out of reach" in decisions[0].reason
    assert planner.last_plan.batch_limit == 1


def _tpot_per_window(cluster: SimCluster, start: float, end: float) -> list[tuple[float, float]]:
    """(mean predicted, mean observed) TPOT of each window in [start, end)."""
    out = []
    for at in range(int(start), int(end), int(POLICY.window_seconds)):
        plans = [p.tpot for p in cluster.plans if at <= p.at < at + POLICY.window_seconds]
        out.append((statistics.mean(plans), cluster.observed(at, at + POLICY.window_seconds)[1]))
    return out


@pytest.mark.parametrize("seed", range(2))
def test_the_tpot_requests_see_corrects_the_model(seed, monkeypatch):
    # Decode workers lose 0.8 s between steps per second of step: requests see TPOT 1.8x
    # what the step times say. Told what the gateway measured, the planner predicts what
    # requests see and holds the decode workers that keep TPOT within target; not told,
    # it predicts ~45% low and holds too few.
    monkeypatch.setattr(SimDecode, "outside_steps", 0.8)
    rate = 3.0
    runs = {}
    for calibrate in (False, True):
        cluster = SimCluster(seed=seed, calibrate=calibrate)
        cluster.run(600, steady(rate))
        runs[calibrate] = cluster
    windows = {calibrate: _tpot_per_window(cluster, 300, 600) for calibrate, cluster in runs.items()}
    assert all(predicted / observed < 0.7 for predicted, observed in windows[False]), windows[False]
    assert all(abs(predicted / observed - 1) < 0.25 for predicted, observed in windows[True]), windows[True]
    assert runs[True].planner.tpot_correction == pytest.approx(1.8, rel=0.2)
    within = {calibrate: statistics.mean(r.tpot <= POLICY.tpot_slo for r in cluster.requests
                                         if r.finished is not None and r.finished >= 300)
              for calibrate, cluster in runs.items()}
    assert runs[True].counts_at(590)["decode"] > runs[False].counts_at(590)["decode"]
    assert within[True] >= 0.9 > within[False], within
    reasons = [reason for _, role, _, reason in runs[True].history if role == "decode"]
    assert any("TPOT as measured" in reason for reason in reasons), reasons


def test_the_correction_needs_enough_requests_is_bounded_and_does_not_feed_on_itself():
    cluster = SimCluster(seed=1)
    cluster.run(120, steady(3.0))
    planner = cluster.planner
    model = statistics.mean(p.tpot for p in planner._plans)
    planner.calibrate(model * 2, MIN_CALIBRATION_REQUESTS - 1)
    assert planner.tpot_correction == 1.0  # too few requests measured
    planner.calibrate(None, 50)
    assert planner.tpot_correction == 1.0
    planner.calibrate(model * 2, MIN_CALIBRATION_REQUESTS)
    assert planner.tpot_correction == pytest.approx(2.0, rel=0.01)
    cluster.run(240, steady(3.0))  # plans made with k = 2 predict twice the model
    assert cluster.plans[-1].tpot_correction == planner.tpot_correction
    observed = statistics.mean(p.tpot for p in planner._plans)
    planner.calibrate(observed, 50)  # what it predicts is what was seen: k stays, it does not double
    assert planner.tpot_correction == pytest.approx(2.0, rel=0.15)
    planner.calibrate(model * 100, 50)
    assert planner.tpot_correction == CORRECTION_RANGE[1]
    planner.calibrate(model / 100, 50)
    assert planner.tpot_correction == CORRECTION_RANGE[0]


def test_prediction_error_compares_the_last_windows_predictions_with_the_observed():
    cluster = SimCluster(seed=4)
    cluster.run(100, steady(3.0))
    planner = cluster.planner
    window = [p for p in cluster.plans if p.at >= cluster.plans[-1].at - POLICY.window_seconds]
    ttft = statistics.mean(p.ttft for p in window)
    tpot = statistics.mean(p.tpot for p in window)
    errors = planner.prediction_error(ttft * 0.8, tpot * 1.25)
    assert errors["ttft"] == pytest.approx(0.25) and errors["tpot"] == pytest.approx(-0.2)
    assert planner.prediction_error(None, 0.0) == {"ttft": None, "tpot": None}
    assert SLOPlanner(POLICY).prediction_error(1.0, 0.1) == {"ttft": None, "tpot": None}


@pytest.mark.parametrize("bad, message", [
    ({"ttft_slo": 0, "tpot_slo": 0.1}, "ttft_slo must be > 0"),
    ({"ttft_slo": 1, "tpot_slo": -0.1}, "tpot_slo must be > 0"),
    ({"ttft_slo": 1, "tpot_slo": 0.1, "target_fraction": 1.5}, "target_fraction must be in"),
    ({"ttft_slo": 1, "tpot_slo": 0.1, "max_utilization": 1.0}, "max_utilization must be in"),
    ({"ttft_slo": 1, "tpot_slo": 0.1, "fit_seconds": 5, "window_seconds": 10}, "fit_seconds .* at least window"),
    ({"ttft_slo": 1, "tpot_slo": 0.1, "prior_step_seconds": 0}, "prior_step_seconds must be > 0"),
    ({"ttft_slo": 1, "tpot_slo": 0.1, "min_decode": 0}, "min_decode"),
    ({"ttft_slo": 1, "tpot_slo": 0.1, "min_prefill": 3, "max_prefill": 2}, "min_prefill"),
    ({"ttft_slo": 1, "tpot_slo": 0.1, "down_headroom": 0}, "down_headroom"),
    ({"ttft_slo": 1, "tpot_slo": 0.1, "max_workers": 1}, "max_workers .* at least min_prefill"),
    ({"ttft_slo": 1, "tpot_slo": 0.1, "attainment": 1.0}, "attainment must be in"),
])
def test_bad_policies_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        PlannerPolicy(**bad)


def test_the_targets_have_no_default():
    with pytest.raises(TypeError, match="ttft_slo"):
        PlannerPolicy(tpot_slo=0.1)


# ---------------------------------------------------------------------------- a worker budget

BUDGET = dataclasses.replace(POLICY, min_prefill=0, max_prefill=2, max_decode=2, max_workers=2)


def short_prompts(rng: random.Random) -> tuple[int, int]:
    """Multi-turn chat with its history cached: little to compute per prompt, long answers."""
    return rng.randint(50, 150), rng.randint(100, 200)


def some_long_prompts(rng: random.Random) -> tuple[int, int]:
    """One prompt in ten of 4,000 tokens (2 s of compute), short answers."""
    return (4000 if rng.random() < 0.1 else 100), rng.randint(20, 40)


def attainment(cluster: SimCluster, since: float) -> float:
    served = [r for r in cluster.requests if r.arrival > since and r.finished is not None]
    return sum(1 for r in served if r.ttft <= POLICY.ttft_slo and r.tpot <= POLICY.tpot_slo) / len(served)


def fixed(prefill: int, decode: int) -> PlannerPolicy:
    return dataclasses.replace(POLICY, min_prefill=prefill, max_prefill=prefill, min_decode=decode, max_decode=decode)


@pytest.mark.parametrize("requests, rate, better, worse", [
    (short_prompts, 1.5, (0, 2), (1, 1)),  # decode-bound: one decode worker cannot keep up
    (some_long_prompts, 1.0, (1, 1), (0, 2)),  # a 4,000-token prompt on a decode worker spoils TPOT
])
def test_the_split_the_planner_scores_better_serves_more_requests_within_target(requests, rate, better, worse):
    """The budget's score (`Forecast.split_score`) against the simulator: each split run
    with fixed counts on the same load; the one scored lower meets both targets for more
    requests."""
    runs = {}
    for split in (better, worse):
        cluster = SimCluster(fixed(*split), *split, seed=5, requests=requests)
        cluster.run(400, steady(rate))
        runs[split] = cluster
    plan = runs[better].plans[-1]
    local = POLICY.local_prefill_tokens if plan.local_prefill_threshold is None else plan.local_prefill_threshold
    scores = {split: plan.forecast.split_score(*split, local) for split in (better, worse)}
    assert scores[better] < scores[worse]
    assert attainment(runs[better], 100) > attainment(runs[worse], 100)


@pytest.mark.parametrize("seed", range(3))
def test_a_worker_budget_goes_to_decode_when_the_prompts_are_short(seed):
    """1.5 requests/s of short prompts and long answers (~225 decode tokens/s: one decode
    worker cannot step that many within TPOT, two can, and the prompts are cheap to
    compute beside the decodes). From 1P+1D on a budget of 2, the prefill worker is
    drained first and a second decode worker starts once it has gone: never more than 2
    workers held. Then TPOT is met."""
    cluster = SimCluster(BUDGET, seed=seed, requests=short_prompts)
    cluster.run(400, steady(1.5))
    assert (cluster.count("prefill"), cluster.count("decode")) == (0, 2), cluster.history
    assert cluster.most_held <= 2
    [(drained_at, _)], [(added_at, _)] = cluster.changes("prefill"), cluster.changes("decode")
    assert drained_at < added_at
    assert drained_at >= BUDGET.down_delay  # a trade waits like any scale-down
    reason = next(why for _, role, _, why in cluster.history if role == "decode")
    assert "share of the 2-worker budget: 2" in reason
    served = [r for r in cluster.requests if r.arrival > added_at + 60 and r.finished is not None]
    assert statistics.quantiles([r.tpot for r in served], n=10)[-1] <= POLICY.tpot_slo


@pytest.mark.parametrize("start", [(1, 1), (0, 2)])
def test_a_worker_budget_keeps_a_prefill_worker_while_long_prompts_would_spoil_tpot(start):
    """1 request/s, one prompt in ten 4,000 tokens: on a decode worker such a prompt takes
    more than a running request's whole TPOT slack (20-40 tokens at ~30 ms), and about one
    request in five would meet one. From 1P+1D nothing changes; from 0P+2D a decode worker
    is traded for a prefill worker."""
    cluster = SimCluster(BUDGET, *start, seed=1, requests=some_long_prompts)
    cluster.run(400, steady(1.0))
    assert (cluster.count("prefill"), cluster.count("decode")) == (1, 1), cluster.history
    assert cluster.most_held <= 2
    if start == (1, 1):
        assert cluster.history == []
    scores = cluster.plans[-1].split_scores
    assert scores[(1, 1)] < SPLIT_MARGIN * scores[(0, 2)]


def test_without_a_budget_no_split_is_scored():
    cluster = SimCluster(seed=0)
    cluster.run(60, steady(2.0))
    assert all(plan.split is None and plan.split_scores is None for plan in cluster.plans)


def test_a_burst_that_overloads_the_prefill_worker_for_a_window_scores_its_cost_not_infinity():
    """Three 4,000-token prompts in a 30 s window on a prefill worker of 2,000 tok/s would be
    20% busy; thirty are 2x its rate. The split keeps a finite score that grows with the
    burst, so a split that pools the same prompts over more workers does not win by default."""
    def scores(long_prompts: int) -> dict:
        cluster = SimCluster(BUDGET, seed=2, requests=some_long_prompts)
        cluster.run(100, steady(1.0))
        cluster.planner.observe(cluster.now + 1, [w.stats() for w in cluster.serving("prefill")],
                                [w.stats() for w in cluster.serving("decode")],
                                prompts=[4000] * long_prompts)
        return cluster.planner.last_plan.split_scores

    calm, burst = scores(3), scores(30)
    assert math.isfinite(burst[(1, 1)]) and burst[(1, 1)] > calm[(1, 1)]
