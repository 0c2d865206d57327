"""A worker's prefix-cache events on their way to the router's `PrefixIndex`, numbered so
that a lost one is noticed.

    engine thread:  log.record(radix cache events)
    controller:     log.since(acked) -> EventBatch      (every poll; `acked` = the last seq it applied)
                    log.snapshot() -> CacheSnapshot     (after a gap: the whole cache, to start over)

Invariants: sequence numbers start at 1 and increase by one per event. Events stay in the
log until the controller acknowledges them (a poll whose reply was lost just gets them
again), up to `max_pending`; past that the oldest are dropped (the controller is gone or
far behind), and the next batch starts after a gap. The log also keeps the set of pages
its events leave in the cache, so a snapshot is exact at the seq it names. One lock;
`record` runs on the engine thread, the readers on the actor's thread.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable
from typing import NamedTuple

from pdserve.runtime.radix_cache import CacheEvent

MAX_PENDING_EVENTS = 100_000


class EventBatch(NamedTuple):
    first_seq: int  # the seq of events[0] (the next seq to come when there are none)
    events: tuple[CacheEvent, ...]

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.events) - 1


class CacheSnapshot(NamedTuple):
    seq: int  # the last event the pages include
    pages: frozenset[int]  # chain hashes of every page in the cache


class CacheEventLog:
    def __init__(self, max_pending: int = MAX_PENDING_EVENTS) -> None:
        self._lock = threading.Lock()
        self._pending: collections.deque[CacheEvent] = collections.deque(maxlen=max_pending)
        self._last_seq = 0  # the seq of the newest event recorded
        self._pages: set[int] = set()

    def record(self, events: Iterable[CacheEvent]) -> None:
        with self._lock:
            for event in events:
                self._last_seq += 1
                self._pending.append(event)  # drops the oldest when full
                if event.kind == "stored":
                    self._pages.update(event.page_hashes)
                else:
                    self._pages.difference_update(event.page_hashes)

    def since(self, acked: int) -> EventBatch:
        """Forget the events up to `acked`; the ones after it that are still kept."""
        with self._lock:
            first = self._last_seq - len(self._pending) + 1  # the seq of _pending[0]
            while self._pending and first <= acked:
                self._pending.popleft()
                first += 1
            return EventBatch(first, tuple(self._pending))

    def snapshot(self) -> CacheSnapshot:
        with self._lock:
            return CacheSnapshot(self._last_seq, frozenset(self._pages))
