"""What the KV transport tests share: well-formed chunks to send, the rejections a
receiver counted, and bounded waits."""

from __future__ import annotations

import dataclasses
import queue
import time

from pdserve.kv_transfer import layout
from pdserve.kv_transfer.messages import KVTicket, PagesHeader
from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.runtime.kv_pool import KVPool

CALL_S = 10.0  # every channel call and every wait in the transport tests is bounded by this


def chunk(source: KVPool, ticket: KVTicket, layer: int, page_start: int, src_blocks: list[int],
          **overrides) -> tuple[PagesHeader, memoryview]:
    """A well-formed chunk carrying `src_blocks` of `source` to the ticket's pages from
    `page_start`; `overrides` replace header fields after the checksum is taken."""
    payload = layout.to_bytes(layout.read_pages(source, layer, src_blocks))
    header = layout.pages_header(ticket, layout.layout_of(source), layer, page_start, len(src_blocks),
                                 layout.checksum(payload))
    assert header.nbytes == payload.nbytes
    return dataclasses.replace(header, **overrides), payload


def rejections(receiver: KVReceiver) -> dict[str, int]:
    """The receiver's rejection counts that are not zero, by reason."""
    return {reason: count for reason, count in receiver.rejected.items() if count}


def eventually(predicate, what: str, limit: float = CALL_S) -> None:
    """Wait (bounded) until `predicate()` holds; fail saying `what` never happened."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {limit} s"
        time.sleep(0.02)


def child_answer(results, process, timeout: float, what: str, who: str):
    """The next ("ok", value) a child process put on `results`, its value; fails naming
    `who` when it answers otherwise or not within `timeout`."""
    try:
        status, value = results.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"{who} (exit code {process.exitcode}) did not answer {what!r} within {timeout} s") from None
    assert status == "ok", f"{who} failed on {what!r}: {value}"
    return value
