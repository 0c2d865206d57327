"""`SLOPlanner`: the fewest prefill and decode workers that keep TTFT and TPOT within target.

    SLOPlanner.observe(now, prefill stats, decode stats, counts, unmet_prefill_tokens) -> [Decision]

The same call as `Autoscaler.observe` (the controller holds either), with the same bounds
and anti-flap rules (`CountPolicy`, `CountDamper`: averaged want, up at once per cooldown,
down one at a time after a delay, hysteresis). What it predicted is `last_plan`;
`prediction_error` compares the last window's predictions with what the gateway measured.

Models, fitted only from what the workers' counters grew by between two observations
(`WorkerStats`), pooled over the last `fit_seconds`:
    r     prefill throughput: prompt tokens computed per second of step time, per worker
          (a prior of `prior_prefill_tokens_per_second` counts as one second of step time)
    t     decode step time, t(batch) = a + b * batch: least squares over one point per decode
          worker and observation (requests per step, seconds per step, the time of its local
          prefill chunks taken out at rate r); the slope is shrunk towards the prior's, so
          points all at one batch size (a steady load) fix the intercept and keep that slope
    h     the hop: seconds per transfer sent from a prompt's last prefill step to the decode
          worker's acceptance (`kv_tail_seconds`; the earlier layers went while later ones
          were computed, so this is what the hop adds to TTFT)
    s     prompt tokens per prefill job; S = s / r seconds to compute one
    n     output tokens per request: decode request-steps per request that ended on decode
The load, over the last `window_seconds`:
    lam   prompt tokens per second offered to prefill: computed + growth of the queued ones
          + those routed with no prefill worker up (`unmet_prefill_tokens`)
    g     decode tokens per second: requests stepped per second (one token per request-step;
          speculation makes more, so TPOT comes out lower than predicted)
    q, m  prompt tokens queued on the least busy prefill worker, requests running or
          waiting on the least busy decode worker: averaged over the window, or now if less
          (a worker that just started takes the next requests at once)

Queues are per worker: a prompt or a request stays on the worker it was routed to, and the
router sends new ones to the least busy. So a backlog is not drained faster by workers
added after it, and what a new request meets is the least busy worker's queue.

Predictions at the serving counts, for a request arriving now (f = `target_fraction`):
    TTFT = q_now / r + S + h + t(c)   the least busy prefill worker's queue, its own prompt,
           the transfer, and the decode step that emits the first token
    TPOT = t(c), c = the batch per decode worker: the largest of 1, the requests on decode
           over the workers, and the steady batch that carries g on them (c / t(c) = g / nd,
           so c = a g' / (1 - b g'), g' = g / nd; unbounded when b g' >= 1)
Wanted workers, the fewest that keep the predictions within f x target at the load, as a
continuous number (the damper averages it and compares it with the count, as the
autoscaler's want):
    prefill  lam / (r u), u the utilization at which the mean queue wait fits the TTFT
             budget B = f ttft_slo - S - h - t(c): M/D/1 per worker (each gets a Poisson
             share of the prompts), W = u S / (2 (1 - u)) <= B, so u = 2 B / (S + 2 B),
             never above `max_utilization`; and one more than serving while q > B r (the
             next prompts need an empty worker)
    decode   g f tpot_slo / c_max, c_max = (f tpot_slo - a) / b: a worker at that batch
             steps in f tpot_slo and carries c_max / (f tpot_slo) tokens per second; and
             one more than serving while m + 1 > c_max
A target no count can reach (one prompt alone, or one request alone, takes longer) wants the
role's max while there is load, and says so. Each decision's reason names the prediction
now and the one at the count it chose (prefill: the mean TTFT at the load, q aside).

Suggestions, in the plan (the controller applies them):
    batch_limit              the largest decode batch with t(batch) <= tpot_slo
    local_prefill_threshold  h r prompt tokens: below it a decode worker should prefill the
                             prompt itself. The hop costs the request h seconds on top of the
                             compute and saves the decode worker the prompt's compute, L / r
                             seconds of its steps (a decode worker computes a prompt about as
                             fast as a prefill worker: same model, same cores per worker);
                             below L = h r it costs more than it saves. At most
                             spill_max_tokens (below): a local prompt costs the running
                             requests what a spilled one does.
    spill_backlog_tokens     B r prompt tokens, B the queue wait the TTFT budget leaves: from
                             a prefill backlog that long, a prompt routed behind it would
                             miss its target, so the router may prefill it on its decode
                             worker when it waits less there (the router's spill rule).
    spill_max_tokens         0 (no spilling) while the serving prefill workers are as many
                             as the prefill want; else the prompt tokens a decode worker may
                             have to compute (those it has queued and the new prompt's) and
                             keep its running requests within their TPOT target. TPOT is a request's mean over its
                             n - 1 steps: L prompt tokens computed during them add
                             L / (r (n - 1)) to it, and each step has room for
                             R = (f tpot_slo - t(c)) r prompt tokens, so L <= R (n - 1). A
                             request sees at most d (n - 1) of them (d: the prompt tokens a
                             decode step computes, `decode_prefill_tokens`), so with d <= R
                             no prompt is too long: None, no limit. 0: no spilling (no room;
                             measured before: past the knee, unpriced spills made most
                             misses TPOT misses). Priced per step instead (L <= R), as an
                             inter-token-latency target would need, it allowed ~9 tokens
                             here and the plan never spilled: short prompts then waited
                             behind long ones and missed TTFT.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pdserve.cluster.control.autoscaler import CountDamper, CountPolicy, Decision
from pdserve.cluster.workers.stats import WorkerStats
from pdserve.runtime.config import ConfigError

PRIOR_STEP_SECONDS = 1.0  # the prefill-rate prior weighs as much as this much measured step time
# The step-time slope's prior weighs as much as two points two requests either side of
# the mean batch: a steady load's own wander soon outweighs it.
SLOPE_PRIOR_WEIGHT = 2 * 2.0 ** 2
MAX_DECODE_POINTS = 512


@dataclass(frozen=True, kw_only=True)
class PlannerPolicy(CountPolicy):
    """The targets (required), how close to them to plan, the models' reach and priors;
    bounds and anti-flap knobs as `CountPolicy`."""

    ttft_slo: float  # seconds
    tpot_slo: float  # seconds per output token after the first
    target_fraction: float = 0.8  # plan for predictions within this fraction of each target
    max_utilization: float = 0.85  # of the prefill workers' step time; queues grow without bound near 1
    fit_seconds: float = 120.0  # how far back the models look
    prior_prefill_tokens_per_second: float = 1000.0
    prior_step_seconds: float = 0.02  # decode: t(batch) = this + the next * batch, until measured
    prior_step_seconds_per_request: float = 0.002
    # Prompt tokens a decode worker computes in a step beside its decodes (its local
    # prefills and spills); None: unknown (a whole prompt may go in one step).
    decode_prefill_tokens: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for knob in ("ttft_slo", "tpot_slo", "prior_prefill_tokens_per_second", "prior_step_seconds"):
            if not getattr(self, knob) > 0:
                raise ConfigError(f"{knob} must be > 0, got {getattr(self, knob)}")
        if self.prior_step_seconds_per_request < 0:
            raise ConfigError(f"prior_step_seconds_per_request must be >= 0, got {self.prior_step_seconds_per_request}")
        if not 0 < self.target_fraction <= 1:
            raise ConfigError(f"target_fraction must be in (0, 1], got {self.target_fraction}")
        if not 0 < self.max_utilization < 1:
            raise ConfigError(f"max_utilization must be in (0, 1), got {self.max_utilization}")
        if self.fit_seconds < self.window_seconds:
            raise ConfigError(f"fit_seconds ({self.fit_seconds}) must be at least window_seconds "
                              f"({self.window_seconds}): the models need the window's data")


class StepTimeModel(NamedTuple):
    """A decode step's seconds for a batch of requests: a + b * batch."""

    a: float
    b: float

    def __call__(self, batch: float) -> float:
        return self.a + self.b * batch

    def largest_batch(self, seconds: float) -> float:
        """The batch whose step takes `seconds` (inf when the step does not grow with it)."""
        return math.inf if self.b <= 0 else (seconds - self.a) / self.b


def fit_step_time(points: Sequence[tuple[float, float]], prior: StepTimeModel) -> StepTimeModel:
    """Least squares over (batch, step seconds) points, the slope shrunk towards the
    prior's by SLOPE_PRIOR_WEIGHT (ridge on the slope only: any one point fixes the
    intercept). The prior itself without points; a and b never negative."""
    if not points:
        return prior
    xs, ys = zip(*points)
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    b = max(0.0, (sxy + SLOPE_PRIOR_WEIGHT * prior.b) / (sxx + SLOPE_PRIOR_WEIGHT))
    return StepTimeModel(max(0.0, mean_y - b * mean_x), b)


class Forecast(NamedTuple):
    """The fitted models and the load at one observation; predicts for any counts."""

    policy: PlannerPolicy
    prefill_rate: float  # r, tokens per second of step time per worker
    step: StepTimeModel  # t
    transfer_seconds: float  # h
    prompt_tokens: float  # s
    queues: tuple[int, ...]  # prompt tokens queued on each serving prefill worker now, least first
    least_queue: float  # the least of them averaged over the window, or now if less (a fresh worker)
    offered_tokens_per_second: float  # lam
    batches: tuple[int, ...]  # requests running or waiting on each serving decode worker now, least first
    least_batch: float  # the least of them averaged over the window, or now if less (a fresh worker)
    decode_tokens_per_second: float  # g
    output_tokens: float  # n; 0 before any request ended on decode

    def decode_batch(self, decode_workers: int) -> float:
        """c: the batch each of `decode_workers` steps (inf: they cannot keep up)."""
        per_worker = self.decode_tokens_per_second / decode_workers
        if self.step.b * per_worker >= 1:
            return math.inf
        steady = self.step.a * per_worker / (1 - self.step.b * per_worker)
        return max(1.0, sum(self.batches) / decode_workers, steady)

    def tpot(self, decode_workers: int) -> float:
        return self.step(self.decode_batch(decode_workers))

    def queue_ahead(self, prefill_workers: int) -> int:
        """Prompt tokens a prompt routed now waits behind with `prefill_workers` workers:
        the least queued of them (the least busy leave first; new ones start empty)."""
        serving = len(self.queues)
        return 0 if prefill_workers > serving else self.queues[serving - prefill_workers]

    def ttft(self, prefill_workers: int, decode_workers: int) -> float:
        return (self.queue_ahead(prefill_workers) / self.prefill_rate
                + self._one_prompt(self.tpot(max(decode_workers, 1))))

    def steady_ttft(self, prefill_workers: int, decode_workers: int) -> float:
        """The mean TTFT the offered load would see on `prefill_workers` workers: the
        queue wait of `_wait` at their utilization, then one prompt."""
        busy = self.offered_tokens_per_second / (prefill_workers * self.prefill_rate)
        return self._wait(busy) + self._one_prompt(self.tpot(max(decode_workers, 1)))

    def _wait(self, busy: float) -> float:
        """Mean queue wait on a prefill worker busy `busy` of the time: M/D/1 (a Poisson share
        of the prompts, each taking S = s / r), W = busy S / (2 (1 - busy)). A least-loaded
        router waits less, so this errs towards more workers."""
        return math.inf if busy >= 1 else busy * self.prompt_tokens / self.prefill_rate / (2 * (1 - busy))

    def _busiest(self, budget: float) -> float:
        """The utilization whose `_wait` is `budget`: 2 budget / (S + 2 budget); at most
        max_utilization."""
        service = self.prompt_tokens / self.prefill_rate
        return min(self.policy.max_utilization, 2 * budget / (service + 2 * budget))

    def _one_prompt(self, first_step: float) -> float:
        """Seconds a request takes with no queue ahead: its prompt, the hop, the first step."""
        return self.prompt_tokens / self.prefill_rate + self.transfer_seconds + first_step

    def queue_budget(self, decode_workers: int) -> tuple[float, float]:
        """(B, alone): the seconds a prompt may wait in a prefill queue and still see its
        first token within target_fraction x ttft_slo (B <= 0: none), and the seconds it
        takes with no queue. Its first step counts at most tpot_slo: a slower decode side
        is the decode want's to fix, not a reason for more prefill workers."""
        p = self.policy
        alone = self._one_prompt(min(self.tpot(max(decode_workers, 1)), p.tpot_slo))
        return p.target_fraction * p.ttft_slo - alone, alone

    def prefill_want(self, decode_workers: int) -> tuple[float, str]:
        p, r = self.policy, self.prefill_rate
        budget, alone = self.queue_budget(decode_workers)
        if budget <= 0:
            if not (any(self.queues) or self.offered_tokens_per_second):
                return 0.0, "no prompts"
            return float(p.max_prefill), (f"TTFT target {p.ttft_slo:g} s out of reach: a {self.prompt_tokens:.0f}-token "
                                          f"prompt alone takes {_seconds(alone)}")
        busiest = self._busiest(budget)
        want = self.offered_tokens_per_second / (r * busiest)
        if self.queues and self.least_queue > r * budget:  # the next prompts need a fresh worker
            want = max(want, len(self.queues) + 1)
        return want, (f"{self.offered_tokens_per_second:.0f} tok/s offered, {r:.0f} tok/s per worker busy at "
                      f"most {busiest:.0%}, {sum(self.queues)} prompt tokens queued ({self.least_queue:.0f} on "
                      f"the least busy worker)")

    def decode_want(self) -> tuple[float, str]:
        p = self.policy
        seconds = p.target_fraction * p.tpot_slo
        most = self.step.largest_batch(seconds)
        if most < 1:
            if not (any(self.batches) or self.decode_tokens_per_second):
                return 0.0, "no requests"
            return float(p.max_decode), (f"TPOT target {p.tpot_slo:g} s out of reach: one request alone steps "
                                         f"in {_seconds(self.step(1))}")
        want = self.decode_tokens_per_second * seconds / most
        if self.batches and self.least_batch + 1 > most:  # the next requests need a fresh worker
            want = max(want, len(self.batches) + 1)
        return want, (f"{self.decode_tokens_per_second:.0f} tok/s, step {self.step.a * 1e3:.1f} ms + "
                      f"{self.step.b * 1e3:.2f} ms/request, {sum(self.batches)} requests on decode "
                      f"({self.least_batch:.1f} on the least busy worker)")


class Plan(NamedTuple):
    """What the planner concluded at one observation."""

    at: float
    forecast: Forecast
    ttft: float | None  # predicted at the serving counts; None: no worker of a role serving
    tpot: float | None
    want: dict[str, float]  # workers per role, before the damper
    batch_limit: int | None  # decode; None: the step time does not grow with the batch
    local_prefill_threshold: int | None  # prompt tokens; None: no transfer measured yet
    spill_backlog_tokens: int  # prefill backlog from which prompts may be prefilled on decode
    spill_max_tokens: int | None  # prompt tokens a decode worker may have to compute; None: no limit


class _Growth(NamedTuple):
    """Between two observations: the time, what the counters of the workers seen at both
    grew by (summed), and the prompt tokens that found no prefill worker."""

    seconds: float = 0.0
    prompt_tokens: int = 0  # prefill
    prefill_step_seconds: float = 0.0
    prefill_jobs: int = 0
    pending_tokens: int = 0  # the growth of the prefill queue (negative when it shrank)
    unmet_tokens: int = 0
    transfers_sent: int = 0
    transfer_tail_seconds: float = 0.0
    decode_requests_stepped: int = 0  # decode
    decode_requests_finished: int = 0


class _Sample(NamedTuple):
    at: float
    growth: _Growth  # since the observation before
    least_queue: int  # prompt tokens queued on the least busy prefill worker (0: none serving)
    least_batch: int  # requests running or waiting on the least busy decode worker (0: none serving)


def _total(growths: Iterable[_Growth]) -> _Growth:
    return _Growth(*(sum(field) for field in zip(*growths, _Growth())))


def _pairs(last: dict[str, WorkerStats], stats: Sequence[WorkerStats]) -> list[tuple[WorkerStats, WorkerStats]]:
    """(previous, now) per worker seen both times; a worker whose counters went back
    (restarted under the same id) starts over. Replaces `last` by `stats`."""
    pairs = [(last[s.worker_id], s) for s in stats
             if s.worker_id in last and s.num_steps >= last[s.worker_id].num_steps]
    last.clear()
    last.update((s.worker_id, s) for s in stats)
    return pairs


class SLOPlanner:
    """Holds the last stats per worker, the samples and fit points of the last fit_seconds,
    the plans of the last window, and the damper's state; `observe` is its only mutator."""

    def __init__(self, policy: PlannerPolicy) -> None:
        self.policy = policy
        self._damper = CountDamper(policy)
        self._last: dict[str, dict[str, WorkerStats]] = {"prefill": {}, "decode": {}}
        self._last_time: float | None = None
        self._samples: deque[_Sample] = deque()  # over fit_seconds
        self._points: deque[tuple[float, float, float]] = deque(maxlen=MAX_DECODE_POINTS)  # (time, batch, step s)
        self._plans: deque[Plan] = deque()  # over window_seconds
        self.last_plan: Plan | None = None

    def observe(self, now: float, prefill: Sequence[WorkerStats], decode: Sequence[WorkerStats],
                counts: dict[str, int] | None = None, unmet_prefill_tokens: int = 0) -> list[Decision]:
        """Take one snapshot of the serving workers' stats (calls in time order); update the
        models and `last_plan`; return the changes to make now (at most one per role). The
        current count of a role is `counts[role]` if given (workers still starting count as
        there), else the number of its stats."""
        forecast = self._forecast(now, prefill, decode, unmet_prefill_tokens)
        wants = {"prefill": forecast.prefill_want(len(decode)), "decode": forecast.decode_want()}
        plan = self._plan(now, forecast, len(prefill), len(decode), {role: w for role, (w, _) in wants.items()})
        decisions = []
        for role, stats in (("prefill", prefill), ("decode", decode)):
            want, why = wants[role]
            current = counts[role] if counts is not None else len(stats)
            decision = self._damper.decide(role, now, current, want, f"{self._predicted(plan, role)}: {why}")
            if decision is not None:
                decisions.append(decision._replace(
                    reason=f"{decision.reason}; {_predicted_at(forecast, role, decision.desired, len(decode))}"))
        return decisions

    def prediction_error(self, observed_ttft: float | None, observed_tpot: float | None) -> dict[str, float | None]:
        """Relative error (predicted / observed - 1) of the mean of the last window's
        predictions against what was observed over it (the gateway's TTFT and TPOT of the
        requests of that window), per SLO: {"ttft": ..., "tpot": ...}. None where there is
        no observation or no bounded prediction."""
        errors: dict[str, float | None] = {}
        for slo, observed in (("ttft", observed_ttft), ("tpot", observed_tpot)):
            predicted = [v for plan in self._plans if (v := getattr(plan, slo)) is not None and math.isfinite(v)]
            errors[slo] = (sum(predicted) / len(predicted) / observed - 1
                           if predicted and observed is not None and observed > 0 else None)
        return errors

    # ------------------------------------------------------------------ models

    def _forecast(self, now: float, prefill: Sequence[WorkerStats], decode: Sequence[WorkerStats],
                  unmet_tokens: int) -> Forecast:
        """Record this observation and fit the models (module docstring): over fit_seconds;
        the load averaged over window_seconds."""
        p = self.policy
        growth, decode_pairs = self._growth_since_last(now, prefill, decode, unmet_tokens)
        queues = tuple(sorted(s.num_waiting_tokens for s in prefill))
        batches = tuple(sorted(s.num_running + s.num_waiting for s in decode))
        self._samples.append(_Sample(now, growth, queues[0] if queues else 0, batches[0] if batches else 0))
        while self._samples[0].at < now - p.fit_seconds:
            self._samples.popleft()
        fit = _total(sample.growth for sample in self._samples)
        window = [sample for sample in self._samples if sample.at > now - p.window_seconds]
        load = _total(sample.growth for sample in window)
        rate = ((fit.prompt_tokens + p.prior_prefill_tokens_per_second * PRIOR_STEP_SECONDS)
                / (fit.prefill_step_seconds + PRIOR_STEP_SECONDS))
        self._add_points(now, decode_pairs, rate)
        offered = load.prompt_tokens + load.pending_tokens + load.unmet_tokens
        return Forecast(
            p, rate,
            fit_step_time([(x, y) for _, x, y in self._points],
                          StepTimeModel(p.prior_step_seconds, p.prior_step_seconds_per_request)),
            transfer_seconds=fit.transfer_tail_seconds / fit.transfers_sent if fit.transfers_sent else 0.0,
            prompt_tokens=fit.prompt_tokens / fit.prefill_jobs if fit.prefill_jobs else 0.0,
            queues=queues, least_queue=min(sum(sample.least_queue for sample in window) / len(window), window[-1].least_queue),
            offered_tokens_per_second=max(0.0, offered / load.seconds) if load.seconds else 0.0,
            batches=batches, least_batch=min(sum(sample.least_batch for sample in window) / len(window), window[-1].least_batch),
            decode_tokens_per_second=load.decode_requests_stepped / load.seconds if load.seconds else 0.0,
            output_tokens=(fit.decode_requests_stepped / fit.decode_requests_finished
                           if fit.decode_requests_finished else 0.0))

    def _growth_since_last(self, now: float, prefill: Sequence[WorkerStats], decode: Sequence[WorkerStats],
                           unmet_tokens: int) -> tuple[_Growth, list[tuple[WorkerStats, WorkerStats]]]:
        """What grew since the last observation; and the decode workers' (then, now) stats."""
        fields: dict[str, float] = dict.fromkeys(_Growth._fields, 0)
        fields["seconds"] = now - self._last_time if self._last_time is not None else 0.0
        fields["unmet_tokens"] = unmet_tokens if self._last_time is not None else 0
        self._last_time = now
        for before, after in _pairs(self._last["prefill"], prefill):
            fields["prompt_tokens"] += after.prompt_tokens_computed - before.prompt_tokens_computed
            fields["prefill_step_seconds"] += after.step_seconds - before.step_seconds
            fields["prefill_jobs"] += sum(after.transfer_outcomes.values()) - sum(before.transfer_outcomes.values())
            fields["pending_tokens"] += after.num_waiting_tokens - before.num_waiting_tokens
            fields["transfers_sent"] += after.transfer_outcomes.get("sent", 0) - before.transfer_outcomes.get("sent", 0)
            fields["transfer_tail_seconds"] += after.kv_tail_seconds - before.kv_tail_seconds
        decode_pairs = _pairs(self._last["decode"], decode)
        for before, after in decode_pairs:
            fields["decode_requests_stepped"] += after.batch_requests_stepped - before.batch_requests_stepped
            fields["decode_requests_finished"] += after.requests_finished - before.requests_finished
        return _Growth(**fields), decode_pairs

    def _add_points(self, now: float, decode_pairs: list[tuple[WorkerStats, WorkerStats]],
                    prefill_rate: float) -> None:
        """One (requests per step, seconds per step) point per decode worker that stepped
        since the last observation, its local prefill chunks' time taken out at
        `prefill_rate`; points older than fit_seconds leave."""
        for before, after in decode_pairs:
            steps = after.num_steps - before.num_steps
            if steps <= 0:
                continue
            local_prefill = (after.prompt_tokens_computed - before.prompt_tokens_computed) / prefill_rate
            seconds = (after.step_seconds - before.step_seconds - local_prefill) / steps
            if seconds > 0:
                self._points.append((now, (after.batch_requests_stepped - before.batch_requests_stepped) / steps,
                                     seconds))
        while self._points and self._points[0][0] < now - self.policy.fit_seconds:
            self._points.popleft()

    # ------------------------------------------------------------------ plan

    def _spill_max_tokens(self, forecast: Forecast, decode_workers: int) -> int | None:
        """The prompt tokens a decode worker can take on within its requests' TPOT target:
        R (n - 1), or None when a decode step's prompt chunk fits R (module docstring);
        before a request has ended (n unknown), R: as if each request lived one step."""
        if not decode_workers:
            return None
        p = self.policy
        room = (p.target_fraction * p.tpot_slo - forecast.tpot(decode_workers)) * forecast.prefill_rate
        if room <= 0:
            return 0
        if p.decode_prefill_tokens is not None and p.decode_prefill_tokens <= room:
            return None
        return math.floor(room * max(1.0, forecast.output_tokens - 1))

    def _local_prefill_threshold(self, forecast: Forecast, spill_max_tokens: int | None) -> int | None:
        """h r, the prompt a decode worker computes in the time the hop would take (module
        docstring), at most what its running requests' TPOT allows."""
        if not forecast.transfer_seconds:
            return None
        threshold = round(forecast.transfer_seconds * forecast.prefill_rate)
        return threshold if spill_max_tokens is None else min(threshold, spill_max_tokens)

    def _plan(self, now: float, forecast: Forecast, prefill_workers: int, decode_workers: int,
              want: dict[str, float]) -> Plan:
        p = self.policy
        limit = forecast.step.largest_batch(p.tpot_slo)
        # Spill only while the serving prefill workers are fewer than the load wants: a spill
        # costs the decode batch TPOT, and with enough prefill workers the prompts meet their
        # TTFT there (a prefill worker serving prompts by deadline lets a short one overtake
        # a long backlog; measured: spilling then turned TTFT hits into TPOT misses).
        absorbable = self._spill_max_tokens(forecast, decode_workers)
        spill_max = absorbable if want["prefill"] > prefill_workers else 0
        plan = Plan(
            now, forecast,
            ttft=forecast.ttft(prefill_workers, decode_workers) if prefill_workers else None,
            tpot=forecast.tpot(decode_workers) if decode_workers else None,
            want=want,
            batch_limit=None if math.isinf(limit) else max(1, math.floor(limit)),
            local_prefill_threshold=self._local_prefill_threshold(forecast, absorbable),
            spill_backlog_tokens=max(0, round(forecast.queue_budget(decode_workers)[0] * forecast.prefill_rate)),
            spill_max_tokens=spill_max)
        self.last_plan = plan
        self._plans.append(plan)
        while self._plans and self._plans[0].at < now - p.window_seconds:
            self._plans.popleft()
        return plan

    def _predicted(self, plan: Plan, role: str) -> str:
        slo, value = ("TTFT", plan.ttft) if role == "prefill" else ("TPOT", plan.tpot)
        target = self.policy.ttft_slo if role == "prefill" else self.policy.tpot_slo
        now = "no worker serving" if value is None else f"{_seconds(value)} predicted now"
        return f"{slo} {now} (target {target:g} s)"


def _predicted_at(forecast: Forecast, role: str, count: int, decode_workers: int) -> str:
    if count == 0:
        return f"no {role} workers"
    if role == "prefill":
        return f"TTFT {_seconds(forecast.steady_ttft(count, decode_workers))} expected with {count} prefill workers"
    return f"TPOT {_seconds(forecast.tpot(count))} expected with {count} decode workers"


def _seconds(value: float) -> str:
    return "unbounded (the queue grows)" if math.isinf(value) else f"{value:.3g} s"
