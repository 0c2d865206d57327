"""The SLO planner end to end on local Ray: `pdserve serve --autoscale slo --shed-on-slo`.

A TTFT target no prompt can meet (1 ms) makes every outcome certain whatever the machine's
speed: once the planner has its first plan, a new request is refused with 429 and a
Retry-After, its prompt still counts as prefill demand, and the planner, seeing demand
for a target out of reach, wants the most prefill workers and starts one. The planner's
own arithmetic is tested in test_planner.py and test_slo_control.py; this checks the
wiring: flags, controller, gateway, metrics, logs.
"""

from __future__ import annotations

import math

import httpx
import pytest
from serve_process import API_KEY, ServeProcess, wait_for

SLO = ["--autoscale", "slo", "--ttft-slo", "0.001", "--tpot-slo", "5", "--shed-on-slo",
       "--min-prefill", "1", "--max-prefill", "2", "--min-decode", "1", "--max-decode", "1",
       "--autoscale-window", "1", "--autoscale-up-cooldown", "1", "--autoscale-down-delay", "600"]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    process = ServeProcess(str(tiny_llama_dir), "--prefill-workers", "1", "--decode-workers", "1",
                           "--local-prefill-tokens", "8", *SLO)
    yield process
    process.stop_and_check()


def _planned(server: ServeProcess) -> bool:
    predicted = server.metrics().get('pdserve_planner_predicted_seconds{slo="ttft"}')
    return predicted is not None and not math.isnan(predicted)


def test_a_request_that_would_miss_the_ttft_target_gets_429_with_retry_after(server):
    wait_for(lambda: _planned(server), what="the planner's first plan")
    response = httpx.post(f"{server.http_url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": server.model_name, "prompt": list(range(60, 260)), "max_tokens": 4},
                          timeout=60)
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and "TTFT target of 0.001 s (--shed-on-slo)" in error["message"]
    assert server.metrics()["pdserve_requests_shed_total"] >= 1


def test_demand_for_a_target_out_of_reach_scales_prefill_to_its_most(server):
    def scaled_up() -> bool:
        # shed prompts are demand too: keep some coming until the second worker serves
        httpx.post(f"{server.http_url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": server.model_name, "prompt": list(range(60, 260)), "max_tokens": 4}, timeout=60)
        return server.metrics().get('pdserve_workers{role="prefill",state="serving"}') == 2

    wait_for(scaled_up, timeout=180, what="a second prefill worker")
    assert server.metrics()['pdserve_autoscaler_decisions_total{direction="up",role="prefill"}'] >= 1
    decision = next(line for line in server.lines if "SLOPlanner: prefill up 1 -> 2" in line)
    assert "TTFT target 0.001 s out of reach" in decision and "expected with 2 prefill workers" in decision



def test_every_metric_the_grafana_dashboard_queries_is_in_the_scrape(server):
    """The Grafana dashboard shipped in helm/pdserve (tests/test_helm_dashboard.py checks it
    against the gateway's registry) queries only series this cluster's /metrics has: every
    registered family has its `# TYPE` line there even before its first sample. The series
    its panels group by role, and the planner's, carry samples here."""
    from test_helm_dashboard import dashboard_metrics, exposition_series, unknown_metrics

    wait_for(lambda: _planned(server), what="the planner's first plan")
    text = httpx.get(f"{server.http_url}/metrics", timeout=30).text
    assert unknown_metrics(dashboard_metrics(), exposition_series(text)) == {}
    samples = server.metrics()
    for role in ("prefill", "decode"):
        assert any(key.startswith(f'pdserve_worker_kv_usage{{role="{role}",') for key in samples), role
        assert samples[f'pdserve_workers{{role="{role}",state="serving"}}'] >= 1
    assert {'pdserve_planner_prediction_error{slo="ttft"}', 'pdserve_planner_prediction_error{slo="tpot"}',
            "pdserve_requests_in_flight"} <= set(samples)  # in flight: the dashboard's $job variable
