"""The Grafana dashboard in helm/pdserve: its ConfigMap, its JSON model, and its queries
against the metrics pdserve exports.

Every `pdserve_*` series a panel or variable query names must be one the gateway's
Prometheus registry exports (it exports the workers' and the controller's numbers too; it
is the cluster's only scrape target). The exported names are not written down here: they
come from instantiating `GatewayMetrics` as `pdserve serve` does and expanding each family
it collects into the series Prometheus stores (a counter `x` as `x_total`, a histogram `x`
as `x_bucket`, `x_sum`, `x_count`). Renaming a metric in the code without updating the
dashboard fails here; tests/test_slo_cluster.py checks the same names against the
`/metrics` of a running cluster, from its `# TYPE` lines, which prometheus_client prints
for every registered family even before it has samples.

Rendering, linting and Kubernetes validation reuse tests/test_helm_chart.py's helpers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
from test_helm_chart import CHART, KUBE_VERSION, NAMESPACE, RELEASE, one, render

from pdserve.cluster.gateway.metrics import TTFT_STAGES, GatewayMetrics

DASHBOARD_FILE = CHART / "dashboards" / "pdserve.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ENABLED = {"grafana": {"dashboard": {"enabled": True}}}

# The series Prometheus stores for a family of each type (`_created` left out: scrapers may
# drop it, and no panel should need it).
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
METRIC = re.compile(r"(?<![\w:$])pdserve_[A-Za-z0-9_:]*")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
RANGE_FUNCTION = re.compile(r"\b(?:rate|increase)\(\s*$")


# ------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def load_dashboard(path: Path = DASHBOARD_FILE) -> dict:
    return json.loads(path.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows included, with the panels of collapsed rows (nested under them)."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries(dashboard: dict) -> Iterable[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} ({target['refId']})", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield f"variable ${variable['name']}", query["query"] if isinstance(query, dict) else query


def metric_names(expr: str) -> list[str]:
    """The `pdserve_*` identifiers of a PromQL expression (quoted label values excluded)."""
    return METRIC.findall(STRING.sub('""', expr))


def dashboard_metrics(dashboard: dict | None = None) -> dict[str, list[str]]:
    """Series name -> where the dashboard queries it."""
    used: dict[str, list[str]] = {}
    for where, expr in queries(dashboard or load_dashboard()):
        for name in metric_names(expr):
            used.setdefault(name, []).append(where)
    return used


def gateway_registry() -> GatewayMetrics:
    """The registry `pdserve serve` exports (cluster/serve.py builds it the same way)."""
    metrics = GatewayMetrics()
    metrics.track_in_flight(lambda: 0)
    return metrics


def registry_families() -> dict[str, str]:
    """Family name -> type, as the gateway's registry collects them."""
    return {family.name: family.type for family in gateway_registry().registry.collect()}


def registry_series() -> dict[str, str]:
    """Series name -> its family's name, for every family of the gateway's registry."""
    return {family + suffix: family for family, kind in registry_families().items()
            for suffix in SERIES_SUFFIXES[kind]}


def exposition_series(text: str) -> dict[str, str]:
    """Series name -> family name, from the `# TYPE` lines of a Prometheus text exposition
    (a counter's TYPE line names it with `_total` there)."""
    series = {}
    for match in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        name, kind = match.groups()
        family = name.removesuffix("_total") if kind == "counter" else name
        for suffix in SERIES_SUFFIXES.get(kind, ()):
            series[family + suffix] = family
    return series


def unknown_metrics(used: dict[str, list[str]], exported: Iterable[str]) -> dict[str, list[str]]:
    """The dashboard's series that `exported` lacks, with where each is queried."""
    exported = set(exported)
    return {name: where for name, where in sorted(used.items()) if name not in exported}


def enclosing_call(expr: str, position: int) -> str:
    """The text from the innermost open parenthesis around `position` back to its function
    name, e.g. 'rate(' for a selector inside rate(...)."""
    depth = 0
    for i in range(position - 1, -1, -1):
        if expr[i] == ")":
            depth += 1
        elif expr[i] == "(":
            if depth == 0:
                return re.search(r"[\w]*\s*\($", expr[:i + 1]).group(0)
            depth -= 1
    return ""


# ------------------------------------------------------------------------- the ConfigMap


def test_the_configmap_renders_only_when_enabled(chart):
    assert "ConfigMap" not in [d["kind"] for d in render(chart)]
    assert "ConfigMap" not in [d["kind"] for d in render(chart, {"grafana": {"dashboard": {"enabled": False}}})]
    configmap = one(render(chart, ENABLED), "ConfigMap")
    assert configmap["metadata"]["name"] == f"{RELEASE}-pdserve-grafana-dashboard"
    assert configmap["metadata"]["namespace"] == NAMESPACE
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert "annotations" not in configmap["metadata"]
    assert list(configmap["data"]) == ["pdserve.json"]
    assert json.loads(configmap["data"]["pdserve.json"]) == load_dashboard()
    assert len(configmap["data"]["pdserve.json"].encode()) < 1024 * 1024  # a ConfigMap holds at most 1 MiB


def test_label_namespace_and_annotations_are_configurable(chart):
    values = {"grafana": {"dashboard": {"enabled": True, "label": "example.com/dashboard", "labelValue": 7,
                                        "namespace": "monitoring", "annotations": {"grafana_folder": "LLM serving"}}}}
    metadata = one(render(chart, values), "ConfigMap")["metadata"]
    assert metadata["labels"]["example.com/dashboard"] == "7"
    assert "grafana_dashboard" not in metadata["labels"]
    assert metadata["namespace"] == "monitoring"
    assert metadata["annotations"] == {"grafana_folder": "LLM serving"}


@pytest.mark.parametrize("values", [ENABLED, {"grafana": {"dashboard": {
    "enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "pdserve"}}}}])
def test_the_configmap_validates_and_the_chart_lints(chart, values):
    for doc in render(chart, values):
        if doc["kind"] == "ConfigMap":
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(("dashboard", "message"), [
    ({"enabled": "yes"}, "/grafana/dashboard/enabled"),
    ({"label": "not a label"}, "/grafana/dashboard/label"),
    ({"labelValue": "has space"}, "/grafana/dashboard/labelValue"),
    ({"namespace": "Monitoring"}, "/grafana/dashboard/namespace"),
    ({"folder": "pdserve"}, "folder"),
])
def test_bad_dashboard_values_fail_with_the_reason(chart, dashboard, message):
    with pytest.raises(helm.HelmError) as caught:
        render(chart, {"grafana": {"dashboard": {"enabled": True, **dashboard}}})
    assert message in str(caught.value)


# ------------------------------------------------------------------------- the JSON model


def test_the_dashboard_is_a_grafana_model_over_a_templated_prometheus():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "pdserve-overview" and dashboard["title"] == "pdserve"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["datasource"] == DATASOURCE
    assert "__inputs" not in dashboard, "the Grafana sidecar loads the model as it is: no import inputs"


def test_every_panel_has_the_datasource_and_queries():
    panels = all_panels(load_dashboard())
    rows = [p for p in panels if p["type"] == "row"]
    assert len(rows) >= 6
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["title"] and panel["description"], panel["id"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert metric_names(target["expr"]), f"{panel['title']}: queries no pdserve metric"


def test_panels_tile_the_grid_without_overlap():
    taken: set[tuple[int, int]] = set()
    for panel in all_panels(load_dashboard()):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


# ------------------------------------------------------------------------- the queries


def test_every_metric_the_dashboard_queries_is_exported_by_the_gateway():
    used = dashboard_metrics()
    assert len(used) >= 30
    assert unknown_metrics(used, registry_series()) == {}


def test_a_renamed_metric_is_caught():
    """The check above fails both ways round: a dashboard query with a name the code does
    not export, and a code that no longer exports a name the dashboard queries."""
    dashboard = load_dashboard()
    target = next(t for p in all_panels(dashboard) for t in p.get("targets", [])
                  if "pdserve_request_ttft_seconds_bucket" in t["expr"])
    target["expr"] = target["expr"].replace("pdserve_request_ttft_seconds_bucket",
                                            "pdserve_request_time_to_first_token_seconds_bucket")
    assert list(unknown_metrics(dashboard_metrics(dashboard), registry_series())) == [
        "pdserve_request_time_to_first_token_seconds_bucket"]
    without_kv_usage = {s for s, family in registry_series().items() if family != "pdserve_worker_kv_usage"}
    assert list(unknown_metrics(dashboard_metrics(), without_kv_usage)) == ["pdserve_worker_kv_usage"]


def test_metric_names_skip_label_values():
    expr = 'sum by (role) (rate(pdserve_worker_steps_total{job=~"pdserve_x", role="decode"}[$__rate_interval]))'
    assert metric_names(expr) == ["pdserve_worker_steps_total"]


def test_the_exposition_parser_agrees_with_the_registry():
    """The live check (tests/test_slo_cluster.py) reads the scrape's TYPE lines; on the
    gateway's own rendering, that gives exactly the series the registry says."""
    text = gateway_registry().render().decode()
    from_text = {s: f for s, f in exposition_series(text).items() if not f.endswith("_created")}
    assert from_text == registry_series()


def test_counters_and_histograms_are_rated_and_gauges_are_not():
    """A counter or histogram series only means something as a rate or an increase; a
    gauge under rate() is a mistake; a histogram quantile aggregates by `le`."""
    series = registry_series()
    kinds = registry_families()
    for where, expr in queries(load_dashboard()):
        bare = STRING.sub('""', expr)
        for match in METRIC.finditer(bare):
            name = match.group(0)
            kind = kinds[series[name]]
            call = enclosing_call(bare, match.start())
            if kind == "gauge":
                assert not RANGE_FUNCTION.search(call), f"{where}: gauge {name} under {call}"
            else:
                assert RANGE_FUNCTION.search(call), f"{where}: {kind} series {name} outside rate()/increase()"
                assert "[$__rate_interval]" in bare[match.end():].split(")")[0], f"{where}: {name} window"
            if name.endswith("_bucket"):
                assert re.search(r"histogram_quantile\(0\.\d+, sum by \(le\b[^)]*\) \(rate\(" + name, bare), where


def test_brackets_balance_in_every_query():
    pairs = {")": "(", "]": "[", "}": "{"}
    for where, expr in queries(load_dashboard()):
        stack = []
        for char in STRING.sub('""', expr):
            if char in "([{":
                stack.append(char)
            elif char in pairs:
                assert stack and stack.pop() == pairs[char], where
        assert stack == [], where


# The topics the dashboard exists for, as the families that carry them: a panel dropped or
# a query rewritten away from one fails here.
COVERED = {
    "TTFT and its split": ["pdserve_request_ttft_seconds", "pdserve_request_ttft_split_seconds"],
    "TPOT": ["pdserve_request_tpot_seconds"],
    "end-to-end latency": ["pdserve_request_e2e_seconds"],
    "request rate, finish reasons, rejections": ["pdserve_requests_finished", "pdserve_request_errors",
                                                 "pdserve_requests_shed"],
    "queue depth per role": ["pdserve_worker_queue_requests", "pdserve_worker_queue_tokens",
                             "pdserve_worker_waiting_for_kv_requests"],
    "running requests": ["pdserve_worker_running_requests"],
    "KV pool usage": ["pdserve_worker_kv_usage"],
    "KV transfer": ["pdserve_worker_transfer_bytes", "pdserve_worker_transfer_seconds",
                    "pdserve_worker_transfer_outcomes"],
    "prefix-cache hit rate": ["pdserve_worker_prefix_hit_tokens", "pdserve_worker_prefix_query_tokens"],
    "speculative acceptance": ["pdserve_worker_spec_accepted_tokens", "pdserve_worker_spec_proposed_tokens"],
    "autoscaler and planner": ["pdserve_workers", "pdserve_autoscaler_decisions",
                               "pdserve_planner_prediction_error", "pdserve_planner_predicted_seconds"],
}


@pytest.mark.parametrize("topic", sorted(COVERED))
def test_the_dashboard_covers(topic):
    series = registry_series()
    queried = {series[name] for name in dashboard_metrics() if name in series}
    assert [f for f in COVERED[topic] if f not in queried] == []


def test_the_ttft_split_panels_cover_every_stage_the_gateway_observes():
    """The split panels group by `stage`; the gateway's stages are the four the design names."""
    assert TTFT_STAGES == ("prefill_queue", "prefill_compute", "kv_transfer", "first_decode_step")
    split = [expr for _, expr in queries(load_dashboard()) if "pdserve_request_ttft_split_seconds" in expr]
    assert split and all(re.search(r"by \((le, )?stage\)", expr) for expr in split)
