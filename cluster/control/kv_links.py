"""The table of KV links: one entry per (prefill worker, decode worker) pair.

    linking  an attempt is running (the decode worker opens a listener, the prefill
             worker proves it with a ping)
    up       proven; `address` is where the prefill worker sends that decode worker's KV
    down     the last attempt failed (`error` says why); retried at `retry_at`, with the
             delay doubling from RETRY_FIRST_S up to RETRY_MAX_S

Every pair of live workers has an entry from the moment the second of them registers
(the controller guarantees it), so a pair that is not up is visible (`counts()`, the
`pdserve_kv_links` metric, a log line per failed attempt), never silently missing. The
controller owns the table and runs the attempts on its event loop; the table itself
does no I/O.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
STATES = ("linking", "up", "down")

Pair = tuple[str, str]  # (prefill worker id, decode worker id)


@dataclass
class Link:
    state: str = "linking"
    address: str | None = None
    error: str | None = None
    failures: int = 0  # attempts failed in a row
    retry_at: float = 0.0


class KVLinks:
    def __init__(self) -> None:
        self._links: dict[Pair, Link] = {}

    def address(self, prefill_id: str, decode_id: str) -> str | None:
        """Where `prefill_id` sends KV for `decode_id`; None unless that link is up."""
        link = self._links.get((prefill_id, decode_id))
        return link.address if link is not None and link.state == "up" else None

    def addresses(self) -> dict[Pair, str | None]:
        """Every pair's address (None unless up)."""
        return {pair: link.address if link.state == "up" else None for pair, link in self._links.items()}

    def has_up(self, prefill_id: str) -> bool:
        """The prefill worker has at least one working link."""
        return any(p == prefill_id and link.state == "up" for (p, _), link in self._links.items())

    def state(self, pair: Pair) -> str | None:
        link = self._links.get(pair)
        return link.state if link is not None else None

    def begin(self, pair: Pair) -> None:
        self._links.setdefault(pair, Link()).state = "linking"

    def succeeded(self, pair: Pair, address: str) -> None:
        if pair in self._links:  # not forgotten meanwhile (a worker left)
            self._links[pair] = Link("up", address)

    def failed(self, pair: Pair, error: str, now: float) -> float:
        """Record a failed attempt; returns the delay before the next one."""
        link = self._links.get(pair)
        if link is None:
            return 0.0
        delay = min(RETRY_FIRST_S * 2 ** link.failures, RETRY_MAX_S)
        link.state, link.address, link.error = "down", None, error
        link.failures += 1
        link.retry_at = now + delay
        return delay

    def due(self, now: float) -> list[Pair]:
        """Down links whose retry time has come."""
        return [pair for pair, link in self._links.items() if link.state == "down" and link.retry_at <= now]

    def forget(self, worker_id: str) -> None:
        """The worker left: its links go with it."""
        for pair in [pair for pair in self._links if worker_id in pair]:
            del self._links[pair]

    def counts(self) -> dict[str, int]:
        """Links per state (every state present, zeros included)."""
        found = Counter(link.state for link in self._links.values())
        return {state: found.get(state, 0) for state in STATES}
