"""`SLOPlanner`: the fewest prefill and decode workers that keep TTFT and TPOT within target.

    SLOPlanner.observe(now, prefill stats, decode stats, counts, unmet_prefill_tokens) -> [Decision]

    SLOPlanner.calibrate(observed mean TPOT, requests)   the gateway's, over the last window

The same call as `Autoscaler.observe` (the controller holds either), with the same bounds
and anti-flap rules (`CountPolicy`, `CountDamper`: averaged want, up at once per cooldown,
down one at a time after a delay, hysteresis). What it predicted is `last_plan`;
`prediction_error` compares the last window's predictions with what the gateway measured.

Models, fitted only from what the workers' counters grew by between two observations
(`WorkerStats`), pooled over the last `fit_seconds`:
    r     prefill throughput: prompt tokens computed per second of step time, per worker
          (a prior of `prior_prefill_tokens_per_second` counts as one second of step time)
    t     decode step time, t(batch, z) = a + b * batch + e * z for a step that also computes
          z prompt tokens (local prefills): least squares over one point per decode worker
          and observation (requests, prompt tokens and seconds per step); the slopes are
          shrunk towards the priors' (e's: 1 / r, what a prompt token costs a prefill
          worker), so points all at one batch size (a steady load) fix the intercept and
          keep the prior's slope
    h     the hop: seconds per transfer sent from a prompt's last prefill step to the decode
          worker's acceptance (`kv_tail_seconds`; the earlier layers went while later ones
          were computed, so this is what the hop adds to TTFT)
    s     prompt tokens per prefill job; S = s / r seconds to compute one
    n     output tokens per request: decode request-steps per request that ended on decode
r and h are the last measured while no prefill worker serves (before any has: r = 1 / e
when decode workers computed prompts, the prior otherwise).
    k     TPOT correction: the mean TPOT the gateway measured over the window over the mean
          the model predicted for it (`calibrate`, from MIN_CALIBRATION_REQUESTS requests;
          within CORRECTION_RANGE; 1 before). A decode worker's tokens come further apart
          than its steps last: between steps it takes in KV transfers, hands out tokens,
          and shares the machine with the gateway (measured on a multi-turn load with one
          decode worker: 66 ms seen, 31 ms predicted). The step model's a and b are
          multiplied by k, so every TPOT prediction, the decode want and the batch limit
          are priced at what requests see; e (prompt tokens) is measured apart.
The load, over the last `window_seconds`:
    lam   prompt tokens per second offered to prefill: computed + growth of the queued ones
          + those routed with no prefill worker up (`unmet_prefill_tokens`)
    g     decode tokens per second: requests stepped per second (one token per request-step;
          speculation makes more, so TPOT comes out lower than predicted)
    z     prompt tokens per second the decode workers compute (local prefills); a share
          u = e z / nd of each decode worker's time
    q, m  prompt tokens queued on the least busy prefill worker, requests running or
          waiting on the least busy decode worker: averaged over the window, or now if less
          (a worker that just started takes the next requests at once)

Queues are per worker: a prompt or a request stays on the worker it was routed to, and the
router sends new ones to the least busy. So a backlog is not drained faster by workers
added after it, and what a new request meets is the least busy worker's queue.

Predictions at the serving counts, for a request arriving now (f = `target_fraction`):
    TTFT = q_now / r + S + h + t(c)   the least busy prefill worker's queue, its own prompt,
           the transfer, and the decode step that emits the first token
    TPOT = t(c) / (1 - u), c = the batch a request steps in: the larger of the requests on
           decode over the workers, and itself plus the steady batch k that carries g on
           them in the time prompts leave (k (1 - u) / t(k) = g / nd, so
           k = a g' / (1 - u - b g'), g' = g / nd; unbounded when u + b g' >= 1; with
           Poisson arrivals the others a request sees number k on average)
Wanted workers, the fewest that keep the predictions within f x target at the load, as a
continuous number (the damper averages it and compares it with the count, as the
autoscaler's want):
    prefill  lam / (r u), u the utilization at which the mean queue wait fits the TTFT
             budget B = f ttft_slo - S - h - t(c): M/D/1 per worker (each gets a Poisson
             share of the prompts), W = u S / (2 (1 - u)) <= B, so u = 2 B / (S + 2 B),
             never above `max_utilization`; and one more than serving while q > B r (the
             next prompts need an empty worker)
    decode   g f tpot_slo / c_max, c_max = (f tpot_slo (1 - u) - a) / b: a worker at that
             batch emits a token every f tpot_slo and carries c_max / (f tpot_slo) tokens
             per second; and one more than serving while m + 1 > c_max
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

A worker budget (`max_workers`: the cores or GPUs both roles share). The wants above set
how many workers in all (at most the budget); which split of them is the question a fixed
pool asks: a prefill worker spares the decode workers the prompts, a decode worker more
room per batch. Each split (p, d) of the total is scored at the load of the window, from
the uncached size of every prompt routed in it (whatever its route), at steady state
(today's backlogs are the serving split's, not the load's):
    on decode  every prompt when p = 0, else those up to the local-prefill threshold; their
               tokens per second are the z of d workers: TPOT as above
    TTFT       the mean over the prompts: a remote one waits M/D/1 behind the mean prompt on
               p workers at r (over OVERLOAD_BUSY, a burst: plus half the excess work of the
               window, not an unbounded wait), then the hop and one step (as the prefill want; deadline
               order lets short prompts pass long ones, so a mixed load's FCFS tail is not
               what they wait); a local one waits M/D/1 on the decode worker's prompt share
               u and takes e s plus one decode step per chunk of `decode_prefill_tokens`
    overlap    a long prompt on a decode worker stretches every request running there: a
               request of n tokens at TPOT T has slack (f tpot_slo - T) (n - 1) seconds, so
               a prompt over that much compute (at e per token) makes it miss. Such prompts
               reach a worker at rate k / d; a request meets one with probability
               1 - exp(-rate (n T + the prompt's time)): the share of requests missing TPOT
               though the mean is met. The mean alone cannot see this: a load of mostly short
               prompts with a few long ones colocates well on average and badly at the
               attainment percentile.
    score      the largest of TTFT / (f ttft_slo), TPOT / (f tpot_slo) and the overlap share
               over (1 - attainment): below 1 is within the plan
Scores are averaged over the window, as the wants are. The split of least score wins; the
serving split's score counts SPLIT_MARGIN less (a trade costs a drain and a start). The damper then moves workers to it (autoscaler.py: drained
from one role after `down_delay`, started in the other once the room is free).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pdserve.cluster.control.autoscaler import (
    CountDamper,
    CountPolicy,
    Decision,
    budget_shares,
    current_counts,
    split_budget,
)
from pdserve.cluster.workers.stats import WorkerStats
from pdserve.runtime.config import ConfigError

PRIOR_STEP_SECONDS = 1.0  # the prefill-rate prior weighs as much as this much measured step time
# The step-time slope's prior weighs as much as two points two requests either side of
# the mean batch: a steady load's own wander soon outweighs it.
SLOPE_PRIOR_WEIGHT = 2 * 2.0 ** 2
# The prompt-token slope's, as much as two points 32 prompt tokens either side.
PROMPT_PRIOR_WEIGHT = 2 * 32.0 ** 2
# The router's local-prefill threshold is the plan's h r, at most this: a slow measured
# hop must not turn every prompt local.
MAX_LOCAL_PREFILL_TOKENS = 1024
# With a worker budget, the workers move to another split only when it scores below this
# fraction of the serving split's score (the models are estimates; a trade costs a drain
# and a start).
SPLIT_MARGIN = 0.9
# A queue busier than this over the window scores a wait that grows with the excess (a burst).
OVERLOAD_BUSY = 0.9
# The TPOT correction k: measured over at least this many requests of the window, and held
# within this range (a model that far off is a bug to fix, not a factor to learn).
MIN_CALIBRATION_REQUESTS = 6
CORRECTION_RANGE = (0.5, 3.0)
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
    # The router's local-prefill threshold until the plan sets one (no hop measured yet).
    local_prefill_tokens: int = 32
    # With a worker budget: the share of requests a split must keep within TPOT when long
    # prompts are computed on decode workers (DistServe's attainment).
    attainment: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        for knob in ("ttft_slo", "tpot_slo", "prior_prefill_tokens_per_second", "prior_step_seconds"):
            if not getattr(self, knob) > 0:
                raise ConfigError(f"{knob} must be > 0, got {getattr(self, knob)}")
        if self.prior_step_seconds_per_request < 0:
            raise ConfigError(f"prior_step_seconds_per_request must be >= 0, got {self.prior_step_seconds_per_request}")
        if not 0 < self.target_fraction <= 1:
            raise ConfigError(f"target_fraction must be in (0, 1], got {self.target_fraction}")
        if not 0 < self.attainment < 1:
            raise ConfigError(f"attainment must be in (0, 1), got {self.attainment}")
        if self.local_prefill_tokens < 0:
            raise ConfigError(f"local_prefill_tokens must be >= 0, got {self.local_prefill_tokens}")
        if not 0 < self.max_utilization < 1:
            raise ConfigError(f"max_utilization must be in (0, 1), got {self.max_utilization}")
        if self.fit_seconds < self.window_seconds:
            raise ConfigError(f"fit_seconds ({self.fit_seconds}) must be at least window_seconds "
                              f"({self.window_seconds}): the models need the window's data")


class StepTimeModel(NamedTuple):
    """A decode step's seconds for a batch of requests and the prompt tokens it computes
    beside them (local prefills): a + b * batch + e * prompt_tokens."""

    a: float
    b: float
    e: float = 0.0  # seconds per prompt token computed on a decode worker

    def __call__(self, batch: float, prompt_tokens: float = 0.0) -> float:
        return self.a + self.b * batch + self.e * prompt_tokens

    def largest_batch(self, seconds: float) -> float:
        """The batch whose step takes `seconds` (inf when the step does not grow with it)."""
        return math.inf if self.b <= 0 else (seconds - self.a) / self.b


def fit_step_time(points: Sequence[tuple[float, float, float]], prior: StepTimeModel) -> StepTimeModel:
    """Least squares over (batch, prompt tokens, step seconds) points, the slopes b and e
    shrunk towards the prior's by SLOPE_PRIOR_WEIGHT and PROMPT_PRIOR_WEIGHT (ridge on the
    slopes only: any one point fixes the intercept). The prior itself without points; a,
    b and e never negative (a slope that comes out negative is held at 0 and the other
    refitted)."""
    if not points:
        return prior
    n = len(points)
    mean_x, mean_z, mean_y = (sum(column) / n for column in zip(*points))
    dx, dz, dy = ([v - mean for v in column] for column, mean in zip(zip(*points), (mean_x, mean_z, mean_y)))
    sxx, szz, sxz = (sum(u * v for u, v in zip(us, vs)) for us, vs in ((dx, dx), (dz, dz), (dx, dz)))
    sxy, szy = (sum(u * v for u, v in zip(us, dy)) for us in (dx, dz))
    # the normal equations of the ridge fit: [sxx + wb, sxz; sxz, szz + we] [b; e] = rhs
    xx, zz = sxx + SLOPE_PRIOR_WEIGHT, szz + PROMPT_PRIOR_WEIGHT
    rx, rz = sxy + SLOPE_PRIOR_WEIGHT * prior.b, szy + PROMPT_PRIOR_WEIGHT * prior.e
    det = xx * zz - sxz * sxz
    b, e = (rx * zz - sxz * rz) / det, (xx * rz - sxz * rx) / det
    if b < 0:
        b, e = 0.0, max(0.0, rz / zz)
    elif e < 0:
        b, e = max(0.0, rx / xx), 0.0
    return StepTimeModel(max(0.0, mean_y - b * mean_x - e * mean_z), b, e)


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
    decode_prompt_tokens_per_second: float = 0.0  # z: prompt tokens the decode workers compute (local prefills)
    prompts: tuple[int, ...] = ()  # uncached tokens of each prompt routed over the window (any route)
    window_seconds: float = 0.0  # the time `prompts` and the load cover
    tpot_correction: float = 1.0  # k: `step`'s a and b are the fit's times this

    def prompt_share(self, decode_workers: int, prompt_tokens_per_second: float | None = None) -> float:
        """The share of each decode worker's time that goes to computing prompts:
        e z / workers (z: the measured local prefills unless given)."""
        z = self.decode_prompt_tokens_per_second if prompt_tokens_per_second is None else prompt_tokens_per_second
        return self.step.e * z / decode_workers

    def decode_batch(self, decode_workers: int, prompt_tokens_per_second: float | None = None,
                     steady: bool = False) -> float:
        """c: the batch a request steps in on each of `decode_workers` (inf: they cannot keep
        up). Of each second, a share u goes to prompts and the rest steps the batch: its
        time-average k carries g', k (1 - u) / t(k) = g'. A request steps with itself and
        the others, k of them on average (Poisson arrivals: the others a request sees are
        the time-average), so c = 1 + k. At least the requests on decode now over the
        workers, unless `steady` (the load's own batch, a backlog aside)."""
        per_worker = self.decode_tokens_per_second / decode_workers
        free = 1 - self.prompt_share(decode_workers, prompt_tokens_per_second) - self.step.b * per_worker
        if free <= 0:
            return math.inf
        return max(0.0 if steady else sum(self.batches) / decode_workers, 1 + self.step.a * per_worker / free)

    def tpot(self, decode_workers: int, prompt_tokens_per_second: float | None = None, steady: bool = False) -> float:
        """t(c) / (1 - u): a token per step, the steps spread over the time prompts leave."""
        share = self.prompt_share(decode_workers, prompt_tokens_per_second)
        if share >= 1:
            return math.inf
        return self.step(self.decode_batch(decode_workers, prompt_tokens_per_second, steady)) / (1 - share)

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
        return _queue_wait(busy, self.prompt_tokens / self.prefill_rate)

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
        # the batch whose steps, spread over the time local prefills leave, come every `seconds`
        most = self.step.largest_batch(seconds * (1 - self.prompt_share(max(len(self.batches), 1))))
        if most < 1:
            if not (any(self.batches) or self.decode_tokens_per_second):
                return 0.0, "no requests"
            return float(p.max_decode), (f"TPOT target {p.tpot_slo:g} s out of reach: one request alone steps "
                                         f"in {_seconds(self.step(1))}")
        want = self.decode_tokens_per_second * seconds / most
        if self.batches and self.least_batch + 1 > most:  # the next requests need a fresh worker
            want = max(want, len(self.batches) + 1)
        corrected = "" if self.tpot_correction == 1 else f" (x{self.tpot_correction:.2f}: TPOT as measured)"
        return want, (f"{self.decode_tokens_per_second:.0f} tok/s, step {self.step.a * 1e3:.1f} ms + "
                      f"{self.step.b * 1e3:.2f} ms/request{corrected}, {sum(self.batches)} requests on decode "
                      f"({self.least_batch:.1f} on the least busy worker), "
                      f"{self.decode_prompt_tokens_per_second:.0f} prompt tok/s prefilled there")

    def split_score(self, prefill_workers: int, decode_workers: int, local_tokens: int) -> float:
        """How far from the plan a split of the worker budget would be (module docstring,
        "A worker budget"): the largest of the mean TTFT over f ttft_slo, the TPOT over
        f tpot_slo, and the share of requests a long prompt computed beside them would push
        over TPOT, over the share the attainment allows. 0 without prompts in the window.
        At the load's steady state: the backlogs now are the serving split's, not the load's."""
        p = self.policy
        if not (self.prompts and self.window_seconds):
            return 0.0
        local = [s for s in self.prompts if not prefill_workers or s <= local_tokens]
        remote = [s for s in self.prompts if prefill_workers and s > local_tokens]
        local_rate = sum(local) / self.window_seconds
        tpot = self.tpot(decode_workers, local_rate, steady=True)
        if math.isinf(tpot):
            return math.inf
        prompt_share = self.prompt_share(decode_workers, local_rate)
        ttfts = []
        if remote:
            service = sum(remote) / len(remote) / self.prefill_rate
            busy = sum(remote) / self.window_seconds / (prefill_workers * self.prefill_rate)
            ttfts += [(len(remote), self._split_wait(busy, service) + service + self.transfer_seconds + tpot)]
        if local:
            # each prompt chunk rides on a decode step: the prompt also waits for those steps
            chunk = p.decode_prefill_tokens or max(local)
            mean = sum(local) / len(local)
            step = tpot * (1 - prompt_share)  # t(c), the step itself
            service = self.step.e * mean + math.ceil(mean / chunk) * step
            ttfts += [(len(local), self._split_wait(prompt_share, service) + service + tpot)]
        ttft = sum(n * t for n, t in ttfts) / len(self.prompts)
        return max(ttft / (p.target_fraction * p.ttft_slo), tpot / (p.target_fraction * p.tpot_slo),
                   self._overlap_misses(local, decode_workers, tpot) / (1 - p.attainment))

    def _split_wait(self, busy: float, service: float) -> float:
        """The mean queue wait of `_queue_wait`, but finite when a burst of the window
        overloads the queue: past OVERLOAD_BUSY, it grows by the work the window brings
        beyond what the workers compute, half of it waited on average. A burst then
        weighs what it costs instead of ruling a split out (splits that pool the same
        prompts over more workers would always win it)."""
        if busy <= OVERLOAD_BUSY:
            return _queue_wait(busy, service)
        return _queue_wait(OVERLOAD_BUSY, service) + (busy - OVERLOAD_BUSY) * self.window_seconds / 2

    def _overlap_misses(self, local: Sequence[int], decode_workers: int, tpot: float) -> float:
        """The share of requests whose mean TPOT a long prompt computed on their decode worker
        during their life pushes over the target: a request of n tokens at `tpot` has
        (f tpot_slo - tpot) (n - 1) seconds of slack; prompts longer than that slack's worth
        (at e per token) come to each worker at rate k / workers, and a request meets one
        with probability 1 - exp(-rate (n tpot + the prompt's time)). 0 before n is known."""
        p, n = self.policy, self.output_tokens
        if n <= 1 or not self.step.e or not local:
            return 0.0
        slack_tokens = (p.target_fraction * p.tpot_slo - tpot) * (n - 1) / self.step.e
        long = [s for s in local if s > slack_tokens]
        if not long:
            return 0.0
        rate = len(long) / self.window_seconds / decode_workers
        return 1 - math.exp(-rate * (n * tpot + self.step.e * sum(long) / len(long)))


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
    # with a worker budget: each split's score (`Forecast.split_score`) and the one chosen
    split_scores: dict[tuple[int, int], float] | None = None
    split: tuple[int, int] | None = None
    tpot_correction: float = 1.0  # k, by which `tpot` (and the forecast's step model) was corrected


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
    decode_prompt_tokens: int = 0  # computed on decode workers (local prefills)


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
        # (time, requests per step, prompt tokens per step, seconds per step)
        self._points: deque[tuple[float, float, float, float]] = deque(maxlen=MAX_DECODE_POINTS)
        self._prompts: deque[tuple[float, int]] = deque()  # (routed at, uncached tokens) over window_seconds
        self._split_scores: deque[tuple[float, tuple[int, int], float]] = deque()  # (at, split, score) over the window
        self._plans: deque[Plan] = deque()  # over window_seconds
        self.last_plan: Plan | None = None
        # The last prefill rate and hop measured: kept while no prefill worker serves (a
        # budget that traded them all away still prices their return by what they did).
        self._measured_rate: float | None = None
        self._measured_hop: float | None = None
        self.tpot_correction = 1.0  # k (module docstring); `calibrate` sets it

    def calibrate(self, observed_tpot: float | None, requests: int) -> None:
        """Set k from the mean TPOT the gateway measured over the last window (`requests`
        of them measured it) against the mean of that window's predictions, each divided
        by the k it was made with: k does not compound, and it settles where the corrected
        prediction is what was measured. Fewer requests, or no prediction: k stays."""
        model = [plan.tpot / plan.tpot_correction for plan in self._plans
                 if plan.tpot is not None and math.isfinite(plan.tpot) and plan.tpot > 0]
        if observed_tpot is None or observed_tpot <= 0 or requests < MIN_CALIBRATION_REQUESTS or not model:
            return
        low, high = CORRECTION_RANGE
        self.tpot_correction = min(high, max(low, observed_tpot / (sum(model) / len(model))))

    def observe(self, now: float, prefill: Sequence[WorkerStats], decode: Sequence[WorkerStats],
                counts: dict[str, int] | None = None, unmet_prefill_tokens: int = 0,
                draining: Mapping[str, int] | None = None, prompts: Sequence[int] = ()) -> list[Decision]:
        """Take one snapshot of the serving workers' stats (calls in time order); update the
        models and `last_plan`; return the changes to make now (at most one per role). The
        current count of a role is `counts[role]` if given (workers still starting count as
        there), else the number of its stats; `draining`: workers per role being drained
        (they hold their part of a worker budget until they stop); `prompts`: the uncached
        tokens of each prompt routed since the last call, whatever its route."""
        self._prompts.extend((now, tokens) for tokens in prompts)
        forecast = self._forecast(now, prefill, decode, unmet_prefill_tokens)
        wants = {"prefill": forecast.prefill_want(len(decode)), "decode": forecast.decode_want()}
        current = current_counts(counts, prefill, decode)
        averaged = {role: self._damper.record(role, now, want) for role, (want, _) in wants.items()}
        plan = self._plan(now, forecast, len(prefill), len(decode), {role: w for role, (w, _) in wants.items()})
        plan = self._keep(self._split(plan, averaged, current))
        shares = budget_shares(self.policy, plan.split, current, draining)
        splits = "" if not plan.split_scores else f"; splits scored {format_splits(plan.split_scores)}"
        decisions = []
        for role, (_, why) in wants.items():
            decision = self._damper.decide(role, now, current[role], f"{self._predicted(plan, role)}: {why}",
                                           shares[role])
            if decision is not None:
                decisions.append(decision._replace(reason=f"{decision.reason}; "
                                                   f"{_predicted_at(forecast, role, decision.desired, len(decode))}"
                                                   f"{splits}"))
        return decisions

    def _split(self, plan: Plan, averaged: dict[str, float], current: dict[str, int]) -> Plan:
        """`plan` with the worker budget's split and the scores of the splits weighed, each
        averaged over the window as the wants are (as it was without a budget)."""
        p, forecast = self.policy, plan.forecast
        local = min(MAX_LOCAL_PREFILL_TOKENS, plan.local_prefill_threshold
                    if plan.local_prefill_threshold is not None else p.local_prefill_tokens)
        serving = (current["prefill"], current["decode"])
        scores: dict[tuple[int, int], float] = {}

        def score(prefill_workers: int, decode_workers: int) -> float:
            split = (prefill_workers, decode_workers)
            if split not in scores:
                self._split_scores.append((plan.at, split, forecast.split_score(prefill_workers, decode_workers, local)))
                over_window = [value for _, seen, value in self._split_scores if seen == split]
                scores[split] = sum(over_window) / len(over_window)
            return scores[split] * (SPLIT_MARGIN if split == serving else 1.0)

        while self._split_scores and self._split_scores[0][0] <= plan.at - p.window_seconds:
            self._split_scores.popleft()

        split = split_budget(p, averaged, serving, score)
        return plan if split is None else plan._replace(split_scores=scores, split=split)

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
        self._add_points(now, decode_pairs)
        points = [(x, z, y) for _, x, z, y in self._points]
        prior_rate = self._measured_rate or p.prior_prefill_tokens_per_second
        if self._measured_rate is None and any(z for _, z, _ in points):
            # No prefill worker has served yet, but decode workers computed prompts: a
            # prompt token costs about the same on either (same model, same cores per worker).
            local_cost = fit_step_time(points, StepTimeModel(p.prior_step_seconds, p.prior_step_seconds_per_request,
                                                             1 / prior_rate)).e
            prior_rate = 1 / local_cost if local_cost > 0 else prior_rate
        rate = ((fit.prompt_tokens + prior_rate * PRIOR_STEP_SECONDS) / (fit.prefill_step_seconds + PRIOR_STEP_SECONDS))
        if fit.prefill_step_seconds:
            self._measured_rate = rate
        if fit.transfers_sent:
            self._measured_hop = fit.transfer_tail_seconds / fit.transfers_sent
        while self._prompts and self._prompts[0][0] <= now - p.window_seconds:
            self._prompts.popleft()
        offered = load.prompt_tokens + load.pending_tokens + load.unmet_tokens
        # a prompt token on a decode worker costs what it does on a prefill worker until measured
        step = fit_step_time(points, StepTimeModel(p.prior_step_seconds, p.prior_step_seconds_per_request, 1 / rate))
        k = self.tpot_correction
        return Forecast(
            p, rate, step._replace(a=step.a * k, b=step.b * k),
            transfer_seconds=self._measured_hop or 0.0,
            prompt_tokens=fit.prompt_tokens / fit.prefill_jobs if fit.prefill_jobs else 0.0,
            queues=queues, least_queue=min(sum(sample.least_queue for sample in window) / len(window), window[-1].least_queue),
            offered_tokens_per_second=max(0.0, offered / load.seconds) if load.seconds else 0.0,
            batches=batches, least_batch=min(sum(sample.least_batch for sample in window) / len(window), window[-1].least_batch),
            decode_tokens_per_second=load.decode_requests_stepped / load.seconds if load.seconds else 0.0,
            output_tokens=(fit.decode_requests_stepped / fit.decode_requests_finished
                           if fit.decode_requests_finished else 0.0),
            decode_prompt_tokens_per_second=load.decode_prompt_tokens / load.seconds if load.seconds else 0.0,
            prompts=tuple(tokens for _, tokens in self._prompts), window_seconds=load.seconds, tpot_correction=k)

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
            fields["decode_prompt_tokens"] += after.prompt_tokens_computed - before.prompt_tokens_computed
        return _Growth(**fields), decode_pairs

    def _add_points(self, now: float, decode_pairs: list[tuple[WorkerStats, WorkerStats]]) -> None:
        """One (requests per step, prompt tokens per step, seconds per step) point per
        decode worker that stepped since the last observation; points older than
        fit_seconds leave."""
        for before, after in decode_pairs:
            steps = after.num_steps - before.num_steps
            seconds = (after.step_seconds - before.step_seconds) / steps if steps > 0 else 0.0
            if seconds > 0:
                self._points.append((now, (after.batch_requests_stepped - before.batch_requests_stepped) / steps,
                                     (after.prompt_tokens_computed - before.prompt_tokens_computed) / steps, seconds))
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
            spill_max_tokens=spill_max, tpot_correction=self.tpot_correction)
        return plan

    def _keep(self, plan: Plan) -> Plan:
        """Make `plan` the last; plans older than a window leave."""
        self.last_plan = plan
        self._plans.append(plan)
        while self._plans and self._plans[0].at < plan.at - self.policy.window_seconds:
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


def format_splits(scores: dict[tuple[int, int], float]) -> str:
    """A budget's split scores for a log line: "0P+2D 0.50, 1P+1D 0.65"."""
    return ", ".join(f"{p}P+{d}D {score:.2f}" for (p, d), score in sorted(scores.items()))


def _queue_wait(busy: float, service: float) -> float:
    """M/D/1: the mean wait in a queue busy `busy` of the time with jobs of `service` seconds."""
    return math.inf if busy >= 1 else busy * service / (2 * (1 - busy))


def _seconds(value: float) -> str:
    return "unbounded (the queue grows)" if math.isinf(value) else f"{value:.3g} s"
