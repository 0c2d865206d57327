"""Faults a test injects into a worker's engine thread, to prove the cluster notices a
dead or hung engine and replaces its worker.

Off unless the environment of the worker's process names one (local Ray passes the
`pdserve serve` process's environment to its workers):

    PDSERVE_FAULT_PLAN="decode-0:hang@20,decode-1:crash@20"

`worker:kind@step`: once that worker's engine has run `step` steps, its engine thread
hangs (blocks forever) or crashes (ends with an uncaught `InjectedCrash`). Each entry
names one worker id; a replacement gets a new id, so it runs clean unless named too.
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple

ENV = "PDSERVE_FAULT_PLAN"
KINDS = ("hang", "crash")


class InjectedCrash(BaseException):
    """Ends an engine thread: a BaseException, so the loop's own error handling (which
    survives any Exception) lets it through, as it would a real fatal error."""


class EngineFault(NamedTuple):
    kind: str
    at_step: int

    def maybe_fire(self, num_steps: int) -> None:
        """Called on the engine thread after each iteration."""
        if num_steps < self.at_step:
            return
        if self.kind == "hang":
            threading.Event().wait()  # never set: this thread makes no more progress
        raise InjectedCrash(f"injected crash after {num_steps} steps ({ENV})")


def planned_fault(worker_id: str, plan: str | None = None) -> EngineFault | None:
    """The fault `plan` (default: the environment's) names for `worker_id`, if any.
    Raises ValueError on a malformed plan, so a typo in a test fails loudly."""
    plan = os.environ.get(ENV, "") if plan is None else plan
    for entry in filter(None, (e.strip() for e in plan.split(","))):
        worker, sep, rest = entry.partition(":")
        kind, at, step = rest.partition("@")
        if not sep or not at or kind not in KINDS or not step.isdigit():
            raise ValueError(f"{ENV}: cannot read {entry!r}; expected worker:kind@step with kind in {KINDS}")
        if worker == worker_id:
            return EngineFault(kind, int(step))
    return None
