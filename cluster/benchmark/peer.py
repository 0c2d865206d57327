"""The peer of a serving benchmark (--peer-url): another OpenAI-compatible server (vLLM,
say) that gets the same requests on the same schedule after the server under test, and
the ratios between the two.

`probe_peer` looks at the peer once, before anything is measured, through GET /v1/models
(which also names the model it serves); it never raises, and a peer that cannot be
benchmarked comes back with a `problem` that says why and what to do (how to start a
peer that is not running is the caller's `StartHint`: a source checkout knows a script for
it, an installed pdserve does not). `peer_comparison` is arithmetic on two `RunMetrics`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import urlsplit

import httpx

from pdserve.cluster.benchmark.report import fmt, fmt_ratio, ratio
from pdserve.cluster.benchmark.stats import RunMetrics

StartHint = Callable[[int], str]  # the peer's port -> a sentence on how to start a peer there


class PeerStatus(NamedTuple):
    name: str
    url: str
    model: str | None  # the first model of its /v1/models; None when it has none
    problem: str | None = None  # why it cannot be benchmarked; None when it can

    @property
    def available(self) -> bool:
        return self.problem is None


def generic_start_hint(port: int) -> str:
    return (f"Start an OpenAI-compatible server on port {port} (e.g. `vllm serve MODEL --port {port}`) "
            "and run this again, or leave --peer-url out.")


def not_running(name: str, url: str, start_hint: StartHint = generic_start_hint) -> str:
    port = urlsplit(url).port or 8100
    return (f"The peer {name!r} is not running at {url} (connection refused on {url}/v1/models), or "
            f"it is not installed. {start_hint(port)} Reporting pdserve alone.")


def probe_peer(name: str, url: str, api_key: str | None, timeout: float = 10.0,
               start_hint: StartHint = generic_start_hint) -> PeerStatus:
    """The peer's state: its served model if GET /v1/models answers with one, else a problem."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=timeout, trust_env=False)
    except httpx.ConnectError:
        return PeerStatus(name, url, None, not_running(name, url, start_hint))
    except httpx.TimeoutException:
        return PeerStatus(name, url, None, f"The peer {name!r} at {url} did not answer GET /v1/models within "
                          f"{timeout:g} s; is it still starting? Reporting pdserve alone.")
    except httpx.HTTPError as exc:
        return PeerStatus(name, url, None, f"The peer {name!r} at {url} cannot be reached "
                          f"({type(exc).__name__}: {exc}). Reporting pdserve alone.")
    if response.status_code in (401, 403):
        return PeerStatus(name, url, None, f"The peer {name!r} at {url} refused GET /v1/models (HTTP "
                          f"{response.status_code}): pass its key with --peer-api-key. Reporting pdserve alone.")
    try:
        response.raise_for_status()
        model = response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return PeerStatus(name, url, None, f"The peer {name!r} at {url} answered GET /v1/models with HTTP "
                          f"{response.status_code} but no model ({response.text[:200]!r}); is it an "
                          "OpenAI-compatible server? Reporting pdserve alone.")
    return PeerStatus(name, url, model)


def stat(name: str, q: str):
    return lambda m: getattr(getattr(m, name), q)


# (metric, unit, value, which way is better)
PEER_METRICS = (
    ("output throughput", "tok/s", lambda m: m.output_throughput, "higher"),
    ("request throughput", "req/s", lambda m: m.request_throughput, "higher"),
    *((f"TTFT {q}", "ms", stat("ttft", q), "lower") for q in ("p50", "p90", "p99")),
    *((f"TPOT {q}", "ms", stat("tpot", q), "lower") for q in ("p50", "p90", "p99")),
    *((f"ITL {q}", "ms", stat("itl", q), "lower") for q in ("p50", "p90", "p99")),
    *((f"E2E {q}", "ms", stat("e2el", q), "lower") for q in ("p50", "p99")),
)


def peer_comparison(a: RunMetrics, b: RunMetrics) -> list[dict]:
    """One row per metric of PEER_METRICS: both values, the ratio a/b (`ratio`'s rules) and
    whether higher or lower is better."""
    return [{"metric": name, "unit": unit, "a": value(a), "b": value(b), "ratio": ratio(value(a), value(b)),
             "better": better} for name, unit, value, better in PEER_METRICS]


def print_peer_comparison(a: str, b: str, rows: list[dict]) -> None:
    width = max(14, len(a) + 2, len(b) + 2)
    print(f"{'=' * 22} {a} vs {b} {'=' * 22}")
    print(f"{'':<26}{a:>{width}}{b:>{width}}{a + '/' + b:>{len(a) + len(b) + 3}}   better")
    for row in rows:
        print(f"{row['metric'] + ' (' + row['unit'] + ')':<26}{fmt(row['a'], '.2f'):>{width}}"
              f"{fmt(row['b'], '.2f'):>{width}}{fmt_ratio(row['ratio']):>{len(a) + len(b) + 3}}   {row['better']}")
