"""The prefill side of the hop on its own: which pages a job pushes after each chunk, and
how its transfer settles. The pusher is a recorder, so the asserts name exact pages."""

from __future__ import annotations

from pdserve.kv_transfer.messages import KVLayout, KVTicket, PrefillJob
from pdserve.kv_transfer.prefill_side import JobOutcome, PageSend, PrefillJobs
from pdserve.kv_transfer.pusher import SendState
from pdserve.runtime.sampling_params import SamplingParams

BLOCK = 4


class RecordingPusher:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.states: dict[int, SendState] = {}

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


def test_each_page_is_pushed_once_full_and_the_partial_one_again():
    # 18 prompt tokens, pages 0..4; the decode worker had page 0 cached: the ticket holds pages 1..4.
    jobs = PrefillJobs(RecordingPusher(), BLOCK)
    jobs.start(_job("r", 7, first_page=1, num_prompt_tokens=18))
    table = [10, 11, 12, 13, 14]  # this worker's blocks for pages 0..4
    assert jobs.computed("r", table, 3) is None  # inside page 0, which decode has
    assert jobs.computed("r", table, 10) == PageSend(7, 0, [11, 12])  # pages 1, 2 (2 partial)
    assert jobs.computed("r", table, 16) == PageSend(7, 1, [12, 13])  # page 2 again, now full; page 3
    assert jobs.computed("r", table, 18) == PageSend(7, 3, [14])  # the last, partial page


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
