"""The decode worker's scheduler: the shared batch scheduler plus decode-first admission
of requests prefilled elsewhere.

    reserve_for_transfer: match the prefix cache (m tokens), reserve blocks for the rest
        of the prompt -> WAITING_FOR_KV (no prefill work anywhere for a request that
        decode cannot hold)
    complete_transfer: KV for [m, n) arrived with the first token -> RUNNING
    fall_back_to_local: the transfer failed -> WAITING, to be prefilled here
"""

from __future__ import annotations

from pdserve.runtime.request import Request, RequestState
from pdserve.runtime.scheduler import BatchScheduler, RequestRejected, ScheduledChunk

__all__ = ["DecodeScheduler", "RequestRejected", "ScheduledChunk"]


class DecodeScheduler(BatchScheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waiting_for_kv: dict[str, Request] = {}

    def reserve_for_transfer(self, request: Request) -> bool:
        """Reuse the cached prefix and reserve blocks for the rest of the prompt. On
        success the request is WAITING_FOR_KV, its block table covers the whole prompt,
        and KV for positions [request.num_computed_tokens, num_prompt_tokens) must be
        written into those blocks before `complete_transfer`. False (nothing held) when
        the blocks are not free."""
        self._validate(request)
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self._attach_prefix(request)
        if not self._allocate_for(request, request.num_prompt_tokens):
            self._detach(request)
            return False
        request.state = RequestState.WAITING_FOR_KV
        self.requests[request.request_id] = request
        self.waiting_for_kv[request.request_id] = request
        return True

    def complete_transfer(self, request_id: str, first_token: int) -> Request:
        """The prompt's KV has arrived with the first sampled token: start decoding."""
        request = self.waiting_for_kv.pop(request_id)
        request.num_computed_tokens = request.num_prompt_tokens
        request.output_ids.append(first_token)
        request.state = RequestState.RUNNING
        self.running.append(request)
        self.running.sort(key=lambda r: r.arrival)
        if request.num_prompt_tokens // self.block_size:
            self._cache_computed_pages(request)
        return request

    def fall_back_to_local(self, request_id: str) -> Request:
        """The transfer failed: drop the reserved blocks (their content is unknown) and
        queue the request to be prefilled here, ahead of newer arrivals."""
        request = self.waiting_for_kv.pop(request_id)
        self._release(request, cache_pages=False)
        request.num_computed_tokens = 0
        request.state = RequestState.WAITING
        index = next((i for i, r in enumerate(self.waiting) if r.arrival > request.arrival), len(self.waiting))
        self.waiting.insert(index, request)
        return request

    def _unqueue(self, request: Request) -> None:
        if request.state is RequestState.WAITING_FOR_KV:
            del self.waiting_for_kv[request.request_id]
        else:
            super()._unqueue(request)

    def _pages_are_valid(self, request: Request) -> bool:
        # A transfer that did not complete may have left pages half written.
        return request.state is not RequestState.WAITING_FOR_KV
