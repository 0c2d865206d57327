"""`SLOControl`: carries the SLO planner's conclusions to where they act.

    controller poll round -> SLOPlanner.observe -> SLOControl.apply(plan)
                                                    -> router: local-prefill threshold, decode batch cap
                                                    -> gauges: predictions, their error
                                                    -> SLOPlanner.calibrate: the TPOT measured
    gateway, routing a new request -> SLOControl.admit(...) -> 429 + Retry-After (--shed-on-slo)

It owns no worker and no model: the plan (`planner.Plan`) is the planner's, the router's
knobs are the router's, and `apply` hands the plan's suggestions to `Router.tune`, on the
gateway's event loop, as the controller's round ends.

What each suggestion does here:
    local_prefill_threshold  the router's `local_prefill_tokens` (at most
                             MAX_LOCAL_PREFILL_TOKENS): shorter uncached prompts are
                             prefilled by their decode worker, skipping the hop
    batch_limit              the router's `decode_batch_cap`: new requests go to decode
                             workers holding fewer than that many while any does (a soft
                             cap: when all hold that many, the usual choice; the planner
                             wants more decode workers then)
    spill_backlog_tokens     the router's: from a prefill backlog that would cost a prompt its
                             TTFT target, it may be prefilled on its decode worker instead
    spill_max_tokens         the router's: ... while that worker's prompt backlog and the
                             prompt stay within what its running requests' TPOT can absorb

Prediction error (`pdserve_planner_prediction_error{slo}`): the planner's mean prediction
over its last window against the mean TTFT and TPOT the gateway measured for requests that
finished in that window (`GatewayMetrics.recent_latencies`), as predicted / observed - 1.
The measured TPOT also goes back to the planner (`SLOPlanner.calibrate`): its TPOT model is
corrected by what requests saw, from the next round on.

Shedding (`--shed-on-slo`): a new request (not a migration) whose TTFT, predicted from the
prompt tokens ahead of it on the worker that will prefill it, its own uncached tokens, the
measured prefill rate, the hop and the decode step, exceeds the TTFT target is refused at
once with 429 and a Retry-After of the excess (the time the backlog needs to drain that
far), instead of answering late. Before the planner has a plan, nothing is shed.
"""

from __future__ import annotations

import logging
import math
import time

from pdserve.cluster.control.planner import MAX_LOCAL_PREFILL_TOKENS, Plan, SLOPlanner, format_splits
from pdserve.cluster.control.router import Router
from pdserve.cluster.gateway.errors import ErrorKind, RequestError
from pdserve.cluster.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)


class SLOControl:
    def __init__(self, planner: SLOPlanner, router: Router, metrics: GatewayMetrics, shed: bool = False) -> None:
        self.planner = planner
        self.router = router
        self.metrics = metrics
        self.shed = shed
        self.num_shed = 0
        self._last_split: tuple[int, int] | None = None  # the worker budget's split last logged

    def apply(self) -> None:
        """Write the planner's last plan into the router and the gauges."""
        plan = self.planner.last_plan
        if plan is None:
            return
        local = self.router.local_prefill_tokens if plan.local_prefill_threshold is None else \
            min(plan.local_prefill_threshold, MAX_LOCAL_PREFILL_TOKENS)
        knobs = (local, plan.spill_backlog_tokens, plan.spill_max_tokens, plan.batch_limit)
        if plan.split is not None and plan.split != self._last_split:
            self._last_split = plan.split
            log.info("planner: worker budget split %dP+%dD; splits scored %s", *plan.split,
                     format_splits(plan.split_scores))
        if knobs != (self.router.local_prefill_tokens, self.router.spill_backlog_tokens,
                     self.router.spill_max_tokens, self.router.decode_batch_cap):
            spill = ("no spilling" if plan.spill_max_tokens == 0 else
                     f"spill from a {plan.spill_backlog_tokens}-token backlog"
                     + ("" if plan.spill_max_tokens is None else
                        f" up to {plan.spill_max_tokens} prompt tokens on a decode worker"))
            log.info("planner: local prefill up to %d uncached tokens, %s, decode batch cap %s (predicted "
                     "TTFT %s s, TPOT %s s)", local, spill, plan.batch_limit,
                     *(f"{value:.3f}" if value is not None else "-" for value in (plan.ttft, plan.tpot)))
        self.router.tune(*knobs)
        window = self.planner.policy.window_seconds
        observed = self.metrics.recent_latencies(time.monotonic() - window)
        errors = self.planner.prediction_error(observed.ttft, observed.tpot)
        self.metrics.planned(plan.ttft, plan.tpot, errors)
        self.planner.calibrate(observed.tpot, observed.tpot_requests)  # for the next round's plan

    def admit(self, request_id: str, uncached_tokens: int, tokens_ahead: int, remote: bool) -> None:
        """Raise RequestError(OVERLOADED) with Retry-After when shedding is on and the
        request's predicted TTFT exceeds the target; `tokens_ahead`: prompt tokens queued
        before it on the worker that will prefill it, `remote`: that worker is a prefill
        worker (the hop counts)."""
        plan = self.planner.last_plan
        if not self.shed or plan is None:
            return
        predicted = predicted_ttft(plan, uncached_tokens, tokens_ahead, remote)
        target = self.planner.policy.ttft_slo
        if predicted <= target:
            return
        self.num_shed += 1
        self.metrics.shed()
        excess = predicted - target
        raise RequestError(ErrorKind.OVERLOADED,
                           f"request {request_id} would see its first token in about {predicted:.2f} s, over the "
                           f"TTFT target of {target:g} s (--shed-on-slo): {tokens_ahead} prompt tokens are queued "
                           f"ahead of its {uncached_tokens}; retry after the queue drains",
                           # unbounded (decode cannot keep up): look again after the planner's window
                           retry_after=excess if math.isfinite(excess) else self.planner.policy.window_seconds)


def predicted_ttft(plan: Plan, uncached_tokens: int, tokens_ahead: int, remote: bool) -> float:
    """Seconds to the first token of a request routed now: the prompts ahead of it and its
    own at the measured prefill rate, the hop when remote, and the decode step that emits
    the first token (the planner's TPOT prediction; its model's one-request step if no
    decode worker was serving)."""
    forecast = plan.forecast
    first_step = plan.tpot if plan.tpot is not None else forecast.step(1)
    hop = forecast.transfer_seconds if remote else 0.0
    return (tokens_ahead + uncached_tokens) / forecast.prefill_rate + hop + first_step
