"""The prefill side of the hop on its own: which pages a job pushes after each chunk, and
how its transfer settles. The pusher is a recorder, so the asserts name exact pages."""

from __future__ import annotations

import time

import pytest

from pdserve.kv_transfer.messages import (
    KVLayout,
    KVTicket,
    PrefillJob,
    TransferDone,
    decode,
    done_bytes_bound,
    encode,
)
from pdserve.kv_transfer.prefill_side import JobOutcome, PageSend, PrefillJobs
from pdserve.kv_transfer.pusher import SendState
from pdserve.runtime.sampling_params import SamplingParams

BLOCK = 4


class RecordingPusher:
    """Records calls; sends are numbered from 101 in start order (ticket ids play no part)."""

    def __init__(self, reads_pool: bool = False) -> None:
        self.calls: list[tuple] = []
        self.states: dict[int, SendState] = {}
        self.dones: dict[int, TransferDone] = {}
        self.reads_pool = reads_pool

    def holds_pages(self, send_id):
        return self.reads_pool

    def start(self, ticket, address):
        send_id = 101 + len(self.states)
        self.states[send_id] = SendState.SENDING
        return send_id

    def push(self, send_id, layer, page_start, block_ids):
        self.calls.append(("push", send_id, layer, page_start, list(block_ids)))

    def finish(self, send_id, done):
        self.calls.append(("finish", send_id, done.first_token))
        self.dones[send_id] = done

    def abort(self, send_id, reason):
        self.calls.append(("abort", send_id, reason))

    def poll(self, send_id):
        return self.states[send_id], "refused" if self.states[send_id] is SendState.FAILED else ""

    def bytes_sent_for(self, send_id):
        """A made-up size per page pushed: 10 bytes."""
        return sum(10 * len(c[4]) for c in self.calls if c[0] == "push" and c[1] == send_id)

    def forget(self, send_id):
        self.calls.append(("forget", send_id))


def _job(request_id: str, ticket_id: int, first_page: int, num_prompt_tokens: int) -> PrefillJob:
    num_pages = -(-num_prompt_tokens // BLOCK) - first_page
    ticket = KVTicket(request_id, ticket_id, b"s" * 16, tuple(range(100, 100 + num_pages)), first_page,
                      num_prompt_tokens, KVLayout(2, BLOCK, 1, 8, "float32"), 1e18)
    return PrefillJob(ticket, "decode-0", list(range(num_prompt_tokens)), SamplingParams())


def test_each_page_is_pushed_once_when_complete_and_the_last_partial_one_at_the_end():
    # 18 prompt tokens, pages 0..4; the decode worker had page 0 cached: the ticket holds pages 1..4.
    jobs = PrefillJobs(RecordingPusher(), BLOCK)
    job = jobs.start(_job("r", 7, first_page=1, num_prompt_tokens=18))
    table = [10, 11, 12, 13, 14]  # this worker's blocks for pages 0..4
    assert jobs.computed("r", table, 3) is None  # inside page 0, which decode has
    assert jobs.computed("r", table, 10) == PageSend(job, 0, [11])  # page 1; page 2 is partial: later
    assert jobs.computed("r", table, 11) is None  # page 2 still partial
    assert jobs.computed("r", table, 16) == PageSend(job, 1, [12, 13])  # pages 2 and 3, now complete
    assert jobs.computed("r", table, 18) == PageSend(job, 3, [14])  # the prompt's end: its partial page


def test_pages_read_in_place_are_held_until_the_transfer_settles():
    pusher = RecordingPusher(reads_pool=True)
    jobs = PrefillJobs(pusher, BLOCK)
    job = jobs.start(_job("r", 7, first_page=0, num_prompt_tokens=10))
    assert jobs.computed("r", [30, 31, 32], 8) == PageSend(job, 0, [30, 31], held=True)
    assert jobs.computed("r", [30, 31, 32], 10) == PageSend(job, 2, [32], held=True)
    jobs.prefilled("r", 5, -0.1, ())
    assert jobs.settled() == []
    pusher.states[job] = SendState.FAILED
    assert jobs.settled() == [JobOutcome(job, "r", False, "refused", (30, 31, 32))]


def test_an_aborted_jobs_held_pages_come_back_when_it_settles():
    pusher = RecordingPusher(reads_pool=True)
    jobs = PrefillJobs(pusher, BLOCK)
    job = jobs.start(_job("r", 7, first_page=0, num_prompt_tokens=12))
    jobs.computed("r", [40, 41, 42], 8)
    assert jobs.abort("r", "cancelled")
    pusher.states[job] = SendState.FAILED
    assert jobs.settled() == [JobOutcome(job, "r", False, "refused", (40, 41))]


def test_jobs_are_told_apart_by_their_own_id_not_their_ticket_or_request():
    """Two decode workers number their tickets alike, and a migrated request may come back
    for a second prefill while its first, aborted transfer still settles: each job settles
    on its own and gives back exactly its own held pages."""
    pusher = RecordingPusher(reads_pool=True)
    jobs = PrefillJobs(pusher, BLOCK)
    first = jobs.start(_job("r", 3, first_page=0, num_prompt_tokens=8))  # to decode-0
    other = jobs.start(_job("s", 3, first_page=0, num_prompt_tokens=4))  # to decode-1: the same ticket id
    jobs.computed("r", [50, 51], 8)
    jobs.computed("s", [60], 4)
    assert jobs.abort("r", "its decode worker died")
    again = jobs.start(_job("r", 1, first_page=0, num_prompt_tokens=8))  # "r" migrated: a second job
    assert len({first, other, again}) == 3
    jobs.computed("r", [70, 71], 8)
    jobs.prefilled("r", 9, -0.2, ())
    jobs.prefilled("s", 8, -0.2, ())
    pusher.states[first] = SendState.FAILED
    pusher.states[again] = SendState.SENT
    assert sorted(jobs.settled()) == [JobOutcome(first, "r", False, "refused", (50, 51)),
                                      JobOutcome(again, "r", True, "", (70, 71))]
    pusher.states[other] = SendState.SENT
    assert jobs.settled() == [JobOutcome(other, "s", True, "", (60,))] and not jobs.has_sending


def test_a_second_job_of_a_request_still_computing_is_refused():
    jobs = PrefillJobs(RecordingPusher(), BLOCK)
    jobs.start(_job("r", 1, first_page=0, num_prompt_tokens=8))
    with pytest.raises(ValueError, match="already computing"):
        jobs.start(_job("r", 2, first_page=0, num_prompt_tokens=8))


def test_pages_go_out_at_every_layer_and_the_transfer_settles_once():
    pusher = RecordingPusher()
    jobs = PrefillJobs(pusher, BLOCK)
    job = jobs.start(_job("r", 7, first_page=0, num_prompt_tokens=6))
    sends = [jobs.computed("r", [20, 21], 6)]
    for layer in (0, 1):
        jobs.push_layer(layer, sends)
    jobs.prefilled("r", 42, -0.5, ())
    prefilled_at = time.monotonic()
    assert not jobs.is_computing("r") and jobs.has_sending
    assert jobs.settled() == []  # still sending
    time.sleep(0.05)
    pusher.states[job] = SendState.SENT
    assert jobs.settled() == [JobOutcome(job, "r", True, "", kv_bytes=2 * 2 * 10)]  # what went out: 2 layers x 2 pages
    assert jobs.settled() == [] and not jobs.has_sending
    assert pusher.calls == [("push", job, 0, 0, [20, 21]), ("push", job, 1, 0, [20, 21]), ("finish", job, 42),
                            ("forget", job)]
    assert jobs.outcome_counts == {"sent": 1}
    # its tail: from the prompt's last step to the decode worker's acceptance
    assert 0.05 <= jobs.sent_tail_seconds <= time.monotonic() - prefilled_at + 0.01


def test_a_refused_job_stops_computing_and_reports_its_failure():
    pusher = RecordingPusher()
    jobs = PrefillJobs(pusher, BLOCK)
    a = jobs.start(_job("a", 1, first_page=0, num_prompt_tokens=8))
    b = jobs.start(_job("b", 2, first_page=0, num_prompt_tokens=8))
    pusher.states[a] = SendState.FAILED
    assert jobs.stop_failed() == ["a"]  # the caller ends request "a" in its scheduler
    assert jobs.settled() == [JobOutcome(a, "a", False, "refused")]
    assert jobs.abort("b", "cancelled") and not jobs.abort("b-unknown", "cancelled")
    assert ("abort", b, "cancelled") in pusher.calls
    assert jobs.outcome_counts == {"failed": 1} and jobs.sent_tail_seconds == 0  # failures have no tail


def test_the_requests_trace_context_crosses_the_kv_plane_in_its_done():
    pusher = RecordingPusher()
    jobs = PrefillJobs(pusher, BLOCK)
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    job = jobs.start(_job("r", 7, first_page=0, num_prompt_tokens=4)._replace(traceparent=traceparent))
    jobs.prefilled("r", 42, -0.5, ())
    done = pusher.dones[job]
    assert done.traceparent == traceparent
    assert decode(encode(done), TransferDone).traceparent == traceparent  # on the wire, within the done's bound
    assert len(encode(done)) <= done_bytes_bound("r", 0, 0)
    oversized = jobs.start(_job("s", 8, first_page=0, num_prompt_tokens=4)._replace(traceparent="0" * 56))
    jobs.prefilled("s", 42, -0.5, ())
    assert pusher.dones[oversized].traceparent == ""  # not a W3C traceparent: dropped, the done stays bounded
