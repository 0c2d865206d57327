"""The prefill side of the hop on its own: which pages a job pushes after each chunk, and
how its transfer settles. The pusher is a recorder, so the asserts name exact pages."""

from __future__ import annotations

from pdserve.kv_transfer.messages import KVLayout, KVTicket, PrefillJob
from pdserve.kv_transfer.prefill_side import JobOutcome, PageSend, PrefillJobs
from pdserve.kv_transfer.pusher import SendState
from pdserve.runtime.sampling_params import SamplingParams

BLOCK = 4


class RecordingPusher:
    def __init__(self, reads_pool: bool = False) -> None:
        self.calls: list[tuple] = []
        self.states: dict[int, SendState] = {}
        self.reads_pool = reads_pool

    def holds_pages(self, ticket_id):
        return self.reads_pool

    def start(self, ticket, address):
        self.states[ticket.ticket_id] = SendState.SENDING

    def push(self, ticket_id, layer, page_start, block_ids):
        self.calls.append(("push", ticket_id, layer, page_start, list(block_ids)))

    def finish(self, ticket_id, done):
        self.calls.append(("finish", ticket_id, done.first_token))

    def abort(self, ticket_id, reason):
        self.calls.append(("abort", ticket_id, reason))

    def poll(self, ticket_id):
        return self.states[ticket_id], "refused" if self.states[ticket_id] is SendState.FAILED else ""

    def forget(self, ticket_id):
        self.calls.append(("forget", ticket_id))


def _job(request_id: str, ticket_id: int, first_page: int, num_prompt_tokens: int) -> PrefillJob:
    num_pages = -(-num_prompt_tokens // BLOCK) - first_page
    ticket = KVTicket(request_id, ticket_id, b"s" * 16, tuple(range(100, 100 + num_pages)), first_page,
                      num_prompt_tokens, KVLayout(2, BLOCK, 1, 8, "float32"), 1e18)
    return PrefillJob(ticket, "decode-0", list(range(num_prompt_tokens)), SamplingParams())


def test_each_page_is_pushed_once_when_complete_and_the_last_partial_one_at_the_end():
    # 18 prompt tokens, pages 0..4; the decode worker had page 0 cached: the ticket holds pages 1..4.
    jobs = PrefillJobs(RecordingPusher(), BLOCK)
    jobs.start(_job("r", 7, first_page=1, num_prompt_tokens=18))
    table = [10, 11, 12, 13, 14]  # this worker's blocks for pages 0..4
    assert jobs.computed("r", table, 3) is None  # inside page 0, which decode has
    assert jobs.computed("r", table, 10) == PageSend(7, 0, [11])  # page 1; page 2 is partial: later
    assert jobs.computed("r", table, 11) is None  # page 2 still partial
    assert jobs.computed("r", table, 16) == PageSend(7, 1, [12, 13])  # pages 2 and 3, now complete
    assert jobs.computed("r", table, 18) == PageSend(7, 3, [14])  # the prompt's end: its partial page


def test_pages_read_in_place_are_held_until_the_transfer_settles():
    pusher = RecordingPusher(reads_pool=True)
    jobs = PrefillJobs(pusher, BLOCK)
    jobs.start(_job("r", 7, first_page=0, num_prompt_tokens=10))
    assert jobs.computed("r", [30, 31, 32], 8) == PageSend(7, 0, [30, 31], held=True)
    assert jobs.computed("r", [30, 31, 32], 10) == PageSend(7, 2, [32], held=True)
    jobs.prefilled("r", 5, -0.1, ())
    assert jobs.settled() == []
    pusher.states[7] = SendState.FAILED
    assert jobs.settled() == [JobOutcome("r", False, "refused", (30, 31, 32))]


def test_an_aborted_jobs_held_pages_come_back_when_it_settles():
    pusher = RecordingPusher(reads_pool=True)
    jobs = PrefillJobs(pusher, BLOCK)
    jobs.start(_job("r", 7, first_page=0, num_prompt_tokens=12))
    jobs.computed("r", [40, 41, 42], 8)
    assert jobs.abort("r", "cancelled")
    pusher.states[7] = SendState.FAILED
    assert jobs.settled() == [JobOutcome("r", False, "refused", (40, 41))]


def test_pages_go_out_at_every_layer_and_the_transfer_settles_once():
    pusher = RecordingPusher()
    jobs = PrefillJobs(pusher, BLOCK)
    jobs.start(_job("r", 7, first_page=0, num_prompt_tokens=6))
    sends = [jobs.computed("r", [20, 21], 6)]
    for layer in (0, 1):
        jobs.push_layer(layer, sends)
    jobs.prefilled("r", 42, -0.5, ())
    assert not jobs.is_computing("r") and jobs.has_sending
    assert jobs.settled() == []  # still sending
    pusher.states[7] = SendState.SENT
    assert jobs.settled() == [JobOutcome("r", True, "")]
    assert jobs.settled() == [] and not jobs.has_sending
    assert pusher.calls == [("push", 7, 0, 0, [20, 21]), ("push", 7, 1, 0, [20, 21]), ("finish", 7, 42),
                            ("forget", 7)]
    assert jobs.outcome_counts == {"sent": 1}


def test_a_refused_job_stops_computing_and_reports_its_failure():
    pusher = RecordingPusher()
    jobs = PrefillJobs(pusher, BLOCK)
    jobs.start(_job("a", 1, first_page=0, num_prompt_tokens=8))
    jobs.start(_job("b", 2, first_page=0, num_prompt_tokens=8))
    pusher.states[1] = SendState.FAILED
    assert jobs.stop_failed() == ["a"]  # the caller ends request "a" in its scheduler
    assert jobs.settled() == [JobOutcome("a", False, "refused")]
    assert jobs.abort("b", "cancelled") and not jobs.abort("b-unknown", "cancelled")
    assert ("abort", 2, "cancelled") in pusher.calls
    assert jobs.outcome_counts == {"failed": 1}
