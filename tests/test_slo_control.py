"""The SLO planner's plan where it acts (`slo_control`): the router's knobs, the prediction
gauges, shedding with Retry-After; and the flags that turn it on. The planner's own
decisions are tested on a simulated cluster in test_planner.py; the gateway path of a shed
request in test_control_plane.py."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest

from pdserve.cluster.cli import DECODE_PREFILL_TOKENS, _scaling_policy, build_parser
from pdserve.cluster.control.autoscaler import ScalingPolicy
from pdserve.cluster.control.planner import MIN_CALIBRATION_REQUESTS, PlannerPolicy, SLOPlanner
from pdserve.cluster.control.router import PrefixIndex, RoundRobin, Router, WorkerView
from pdserve.cluster.control.slo_control import MAX_LOCAL_PREFILL_TOKENS, SLOControl, predicted_ttft
from pdserve.cluster.gateway.errors import ErrorKind, RequestError
from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.cluster.serve import GatewayConfig
from pdserve.cluster.workers.spec import WorkerSpec
from pdserve.cluster.workers.stats import WorkerStats
from pdserve.runtime.config import ConfigError

POLICY = PlannerPolicy(ttft_slo=2.0, tpot_slo=0.1, window_seconds=10, fit_seconds=60)


def _prefill(queued_tokens=0, computed=0, step_seconds=0.0, jobs=0, tail_seconds=0.0) -> WorkerStats:
    """`jobs` prompts computed and their KV sent, `tail_seconds` after their last steps in all."""
    return WorkerStats("prefill", "prefill-0", 0, queued_tokens, 0, 0, 0.0, 0, 0, 0, 0.0, {"sent": jobs}, jobs,
                       step_seconds, computed, jobs, kv_tail_seconds=tail_seconds)


def _planned(queued_tokens=2000) -> SLOPlanner:
    """A planner that has seen 10 s of a prefill worker computing 2,000 tokens/s (plus its
    prior), transfers of 50 ms, and decode steps of 30 ms at a batch of 4."""
    planner = SLOPlanner(POLICY)
    planner.observe(0.0, [_prefill()], [_decode()])
    planner.observe(10.0, [_prefill(queued_tokens, computed=10_000, step_seconds=5.0, jobs=10, tail_seconds=0.5)],
                    [_decode(running=4, steps=100, step_seconds=3.0, stepped=400, finished=10)])
    return planner


def _decode(running=0, steps=0, step_seconds=0.0, stepped=0, finished=0) -> WorkerStats:
    return WorkerStats("decode", "decode-0", 0, 0, running, 0, 0.0, 0, 0, 0, 0.0, {}, steps, step_seconds, 0,
                       stepped, requests_finished=finished)


@pytest.mark.parametrize(("chunk", "finished", "spill_max"), [
    (None, 0, "room"),  # n unknown: as if a request lived one step
    (None, 10, "room x 39"),  # 400 request-steps over 10 requests: n = 40
    (64, 10, None),  # a step computes 64 prompt tokens, within the room: no limit
    (128, 10, "room x 39"),
])
def test_spilling_is_priced_in_the_running_requests_mean_tpot(chunk, finished, spill_max, caplog):
    """Decode steps of ~30 ms against 0.8 x 100 ms leave ~50 ms, ~95 prompt tokens at the
    measured rate, in each of a request's n - 1 steps: a decode worker may take on that many
    prompt tokens per step of a request's life. The local-prefill threshold (h r, ~100
    tokens here) is capped at the same limit."""
    planner = SLOPlanner(dataclasses.replace(POLICY, decode_prefill_tokens=chunk))
    planner.observe(0.0, [_prefill()], [_decode()])
    planner.observe(10.0, [_prefill(2000, computed=10_000, step_seconds=5.0, jobs=10, tail_seconds=0.5)],
                    [_decode(running=4, steps=100, step_seconds=3.0, stepped=400, finished=finished)])
    plan = planner.last_plan
    room = (0.8 * 0.1 - plan.tpot) * plan.forecast.prefill_rate
    assert 64 < room < 128
    expected = {"room": math.floor(room), "room x 39": math.floor(room * 39), None: None}[spill_max]
    assert plan.spill_max_tokens == expected
    # the spill backlog: what the TTFT budget leaves a queue, whatever the limit
    assert plan.spill_backlog_tokens == round(plan.forecast.queue_budget(1)[0] * plan.forecast.prefill_rate)
    hop_tokens = round(plan.forecast.transfer_seconds * plan.forecast.prefill_rate)
    assert hop_tokens > room
    assert plan.local_prefill_threshold == (hop_tokens if expected is None else min(hop_tokens, expected))
    router = _router()
    with caplog.at_level(logging.INFO, logger="pdserve.cluster.control.slo_control"):
        SLOControl(planner, router, GatewayMetrics()).apply()
    assert (router.spill_backlog_tokens, router.spill_max_tokens) == (plan.spill_backlog_tokens, expected)
    assert ("prompt tokens on a decode worker" in caplog.text) == (expected is not None)


def test_no_spilling_while_the_prefill_workers_carry_the_load():
    """1,000 prompt tokens/s offered to a worker computing 2,000: the prefill want stays
    below the one serving, so nothing spills (a spill would cost the decode batch TPOT for
    a TTFT the prefill worker meets anyway); the local-prefill threshold is still h r."""
    planner = SLOPlanner(POLICY)
    planner.observe(0.0, [_prefill()], [_decode()])
    planner.observe(10.0, [_prefill(0, computed=10_000, step_seconds=5.0, jobs=10, tail_seconds=0.5)],
                    [_decode(running=4, steps=100, step_seconds=3.0, stepped=400, finished=10)])
    plan = planner.last_plan
    assert plan.want["prefill"] < 1
    assert plan.spill_max_tokens == 0
    assert plan.local_prefill_threshold == round(0.05 * plan.forecast.prefill_rate)
    # the same worker with a backlog the TTFT target cannot wait for: spill, priced in TPOT
    planner.observe(20.0, [_prefill(20_000, computed=20_000, step_seconds=10.0, jobs=20, tail_seconds=1.0)],
                    [_decode(running=4, steps=200, step_seconds=6.0, stepped=800, finished=20)])
    plan = planner.last_plan
    assert plan.want["prefill"] > 1
    assert plan.spill_max_tokens > 0


def test_no_room_in_the_decode_steps_no_spilling(caplog):
    """Decode steps already over 0.8 x the TPOT target: nothing spills, nothing is local."""
    planner = SLOPlanner(POLICY)
    planner.observe(0.0, [_prefill()], [_decode()])
    planner.observe(10.0, [_prefill(2000, computed=10_000, step_seconds=5.0, jobs=10, tail_seconds=0.5)],
                    [_decode(running=4, steps=100, step_seconds=9.0, stepped=400, finished=10)])
    plan = planner.last_plan
    assert plan.tpot > 0.08
    assert (plan.spill_max_tokens, plan.local_prefill_threshold) == (0, 0)
    router = _router()
    with caplog.at_level(logging.INFO, logger="pdserve.cluster.control.slo_control"):
        SLOControl(planner, router, GatewayMetrics()).apply()
    assert "no spilling" in caplog.text
    busy_prefill = WorkerView("p", 1, 50_000, 0.1)
    idle_decode = WorkerView("d", 0, 0, 0.1)
    assert not router._waits_less_locally(200, idle_decode, busy_prefill)


def _router() -> Router:
    return Router(RoundRobin(), 4, PrefixIndex(), local_prefill_tokens=32)


def test_a_plan_sets_the_routers_threshold_and_batch_cap_and_the_gauges(caplog):
    planner, router, metrics = _planned(), _router(), GatewayMetrics()
    plan = planner.last_plan
    assert plan.local_prefill_threshold == round(0.05 * plan.forecast.prefill_rate)  # h r
    assert plan.batch_limit is not None and plan.tpot == pytest.approx(0.03, rel=0.05)
    metrics.finished("stop", 1.0, ttft=0.5, tpot=0.04, num_tokens=10)
    control = SLOControl(planner, router, metrics)
    with caplog.at_level(logging.INFO, logger="pdserve.cluster.control.slo_control"):
        control.apply()
        control.apply()  # the same plan again: logged once, when the knobs change
    assert router.local_prefill_tokens == plan.local_prefill_threshold
    assert router.decode_batch_cap == plan.batch_limit
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("planner:")]
    assert len(changes) == 1
    assert f"local prefill up to {plan.local_prefill_threshold} uncached tokens" in changes[0]
    assert f"decode batch cap {plan.batch_limit}" in changes[0]
    # spill once the backlog is what the TTFT budget leaves: 0.8 x 2 s - (one prompt, hop, step)
    alone = 1000 / plan.forecast.prefill_rate + 0.05 + plan.tpot
    assert router.spill_backlog_tokens == round((0.8 * 2.0 - alone) * plan.forecast.prefill_rate)
    text = metrics.render().decode()
    assert f'pdserve_planner_predicted_seconds{{slo="tpot"}} {plan.tpot}' in text
    # the window's predictions (the prior's at 0 s, 30 ms at 10 s) against the 40 ms measured
    errors = planner.prediction_error(0.5, 0.04)
    assert errors["tpot"] == pytest.approx((0.022 + 0.03) / 2 / 0.04 - 1)
    assert f'pdserve_planner_prediction_error{{slo="tpot"}} {errors["tpot"]}' in text
    assert f'pdserve_planner_prediction_error{{slo="ttft"}} {errors["ttft"]}' in text


def test_the_tpot_the_gateway_measured_corrects_the_planners_next_plan():
    planner, metrics = _planned(), GatewayMetrics()
    control = SLOControl(planner, _router(), metrics)
    model = (0.022 + 0.03) / 2  # the window's predictions: the prior's at 0 s, 30 ms at 10 s
    for _ in range(MIN_CALIBRATION_REQUESTS - 1):
        metrics.finished("stop", 1.0, ttft=0.5, tpot=0.06, num_tokens=10)
    control.apply()
    assert planner.tpot_correction == 1.0  # too few requests measured yet
    metrics.finished("stop", 1.0, ttft=0.5, tpot=0.06, num_tokens=10)
    control.apply()
    assert planner.tpot_correction == pytest.approx(0.06 / model)
    before = planner.last_plan.tpot
    planner.observe(20.0, [_prefill(computed=20_000, step_seconds=10.0, jobs=20, tail_seconds=1.0)],
                    [_decode(running=4, steps=200, step_seconds=6.0, stepped=800, finished=20)])
    assert planner.last_plan.tpot == pytest.approx(before * 0.06 / model, rel=0.05)


def test_a_worker_budgets_split_is_logged_when_it_changes(caplog):
    planner = SLOPlanner(dataclasses.replace(POLICY, min_prefill=0, max_decode=2, max_workers=2))
    control = SLOControl(planner, _router(), GatewayMetrics())
    with caplog.at_level(logging.INFO, logger="pdserve.cluster.control.slo_control"):
        planner.observe(0.0, [_prefill()], [_decode()])
        control.apply()
        planner.observe(10.0, [_prefill(0, computed=10_000, step_seconds=5.0, jobs=10, tail_seconds=0.5)],
                        [_decode(running=4, steps=100, step_seconds=3.0, stepped=400, finished=10)],
                        prompts=[1000] * 10)
        control.apply()
        control.apply()
    splits = [r.getMessage() for r in caplog.records if "worker budget split" in r.getMessage()]
    assert planner.last_plan.split is not None and len(splits) == 2  # (0, 1) with no load, then the plan's
    split = planner.last_plan.split
    assert f"split {split[0]}P+{split[1]}D" in splits[-1] and "0P+2D" in splits[-1] and "1P+1D" in splits[-1]


def test_a_slow_measured_hop_does_not_turn_every_prompt_local():
    planner = SLOPlanner(POLICY)
    planner.observe(0.0, [_prefill()], [_decode()])
    planner.observe(10.0, [_prefill(computed=10_000, step_seconds=5.0, jobs=1, tail_seconds=30.0)],
                    [_decode(steps=100, step_seconds=2.0, stepped=100, finished=1)])  # one transfer, 30 s after its last step
    router = _router()
    SLOControl(planner, router, GatewayMetrics()).apply()
    assert router.local_prefill_tokens == MAX_LOCAL_PREFILL_TOKENS


def test_no_plan_yet_changes_nothing_and_sheds_nothing():
    planner, router = SLOPlanner(POLICY), _router()
    control = SLOControl(planner, router, GatewayMetrics(), shed=True)
    control.apply()
    control.admit("r", 100, 10**9, remote=True)
    assert router.local_prefill_tokens == 32 and router.decode_batch_cap is None and control.num_shed == 0


def test_shedding_refuses_what_would_miss_the_ttft_target_with_the_excess_as_retry_after():
    planner, metrics = _planned(), GatewayMetrics()
    plan = planner.last_plan
    rate = plan.forecast.prefill_rate
    control = SLOControl(planner, _router(), metrics, shed=True)
    control.admit("fits", 500, 0, remote=True)  # ~0.3 s
    ahead = int(3 * rate)  # three seconds of prompts queued ahead
    predicted = predicted_ttft(plan, 500, ahead, remote=True)
    assert predicted == pytest.approx((ahead + 500) / rate + plan.forecast.transfer_seconds + plan.tpot)
    with pytest.raises(RequestError) as refused:
        control.admit("late", 500, ahead, remote=True)
    assert refused.value.kind is ErrorKind.OVERLOADED and "TTFT target of 2 s" in str(refused.value)
    assert refused.value.retry_after == pytest.approx(predicted - POLICY.ttft_slo)
    assert control.num_shed == 1 and "pdserve_requests_shed_total 1.0" in metrics.render().decode()
    # the same request without shedding asked for: admitted, however late
    SLOControl(planner, _router(), metrics).admit("late", 500, ahead, remote=True)


def test_a_local_prefill_pays_no_hop():
    plan = _planned().last_plan
    assert predicted_ttft(plan, 100, 0, remote=True) - predicted_ttft(plan, 100, 0, remote=False) == \
        pytest.approx(plan.forecast.transfer_seconds)


def test_recent_latencies_are_means_over_the_requests_finished_since():
    metrics = GatewayMetrics()
    assert metrics.recent_latencies(0.0) == (None, None, 0, 0)
    metrics.finished("stop", 1.0, ttft=1.0, tpot=None, num_tokens=1)  # one token: no TPOT
    metrics.finished("stop", 1.0, ttft=3.0, tpot=0.2, num_tokens=5)
    assert metrics.recent_latencies(0.0) == (2.0, 0.2, 2, 1)
    assert metrics.recent_latencies(math.inf) == (None, None, 0, 0)


def test_the_decode_batch_cap_is_soft():
    router = _router()
    router.local_prefill_tokens = 10**6  # every prompt local: only the decode choice matters
    views = [WorkerView("decode-0", 8, 0, 0.0), WorkerView("decode-1", 2, 0, 0.0)]
    router.decode_batch_cap = 4
    assert {router.route([1, 2, 3], views, []).decode for _ in range(4)} == {"decode-1"}
    router.decode_batch_cap = 2  # all at the cap: the policy's usual choice (round robin)
    assert {router.route([1, 2, 3], views, []).decode for _ in range(4)} == {"decode-0", "decode-1"}


# ------------------------------------------------------------------ flags


def _policy(*flags: str):
    return _scaling_policy(build_parser().parse_args(["serve", *flags]))


def test_autoscale_flags_choose_the_policy():
    assert _policy() is None
    assert isinstance(_policy("--autoscale"), ScalingPolicy)
    assert isinstance(_policy("--autoscale", "queue"), ScalingPolicy)
    planned = _policy("--autoscale", "slo", "--ttft-slo", "2", "--tpot-slo", "0.1", "--max-decode", "3")
    assert isinstance(planned, PlannerPolicy)
    assert (planned.ttft_slo, planned.tpot_slo, planned.max_decode) == (2.0, 0.1, 3)
    assert planned.decode_prefill_tokens == DECODE_PREFILL_TOKENS  # what its decode workers compute a step


@pytest.mark.parametrize(("flags", "message"), [
    (["--autoscale", "slo", "--ttft-slo", "2"], "--autoscale slo needs its targets: --tpot-slo"),
    (["--autoscale", "slo"], "--ttft-slo and --tpot-slo"),
    (["--ttft-slo", "2"], "--ttft-slo need the SLO planner: add --autoscale slo"),
    (["--autoscale", "--shed-on-slo"], "--shed-on-slo need the SLO planner"),
])
def test_slo_flags_that_do_not_go_together_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        _policy(*flags)


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_a_target_must_be_a_positive_number(value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--autoscale", "slo", "--ttft-slo", value, "--tpot-slo", "1"])
    assert "must be a number > 0" in capsys.readouterr().err


def test_shedding_needs_the_planner_in_the_config_too():
    with pytest.raises(ValueError, match="--shed-on-slo"):
        GatewayConfig(spec=WorkerSpec(model="unused"), scaling=ScalingPolicy(), shed_on_slo=True)
