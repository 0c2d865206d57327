"""One generation request of the HTTP API, from admission to the last byte: one choice or
several (OpenAI's `n`, completions' `best_of`), as one JSON body or as SSE chunks.

    answer = await serve(request, frontend, prepared, plan)

A `ChoicePlan` says how many sequences to generate (`num_sequences`), how many choices to
return (`num_choices`: the best by mean token logprob when fewer, as `best_of` asks) and
builds the body builder of each choice. Several sequences come from
`Frontend.open_group`, which shares the prompt's KV among them; their stream chunks are
sent as they come, each with its choice's `index`.

Invariant: whatever ends the request (its end, an error, the client going away) closes
every sequence's `OutputStream`, which aborts it on the workers and frees its KV.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import NamedTuple

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from pdserve.cluster.gateway.errors import ErrorKind, RequestError
from pdserve.cluster.gateway.frontend import Frontend
from pdserve.cluster.gateway.openai.bodies import ChatBodies, CompletionBodies, merge_deltas, merge_responses
from pdserve.cluster.gateway.openai.errors import INTERNAL_MESSAGE, error_body
from pdserve.cluster.gateway.output_stream import OutputDelta, OutputStream, PreparedRequest, Usage
from pdserve.cluster.gateway.streaming import (
    SSE_DONE,
    EventStreamResponse,
    json_response,
    sse_event,
    until_disconnected,
)

log = logging.getLogger(__name__)

_CLIENT_CLOSED_REQUEST = 499  # a status nobody reads: the client has gone (nginx's convention)

BodiesFor = Callable[[int], CompletionBodies | ChatBodies]  # choice index -> its body builder


class ChoicePlan(NamedTuple):
    bodies_for: BodiesFor
    stream: bool
    include_usage: bool
    num_sequences: int = 1
    num_choices: int = 1


async def serve(request: Request, frontend: Frontend, prepared: PreparedRequest, plan: ChoicePlan) -> Response:
    """Admit the prepared request and answer it. Every refusal (overload, no worker,
    timeout before the first output) raises RequestError here, before a response starts."""
    outputs = await until_disconnected(request.receive, _open(frontend, prepared, plan.num_sequences))
    if outputs is None:
        return Response(status_code=_CLIENT_CLOSED_REQUEST)

    async def close() -> None:
        await asyncio.gather(*(output.aclose() for output in outputs))

    if plan.stream:  # the headers tell what is known at the first token: the route, TTFT
        bodies = [plan.bodies_for(i) for i in range(len(outputs))]
        return EventStreamResponse(_events(outputs, bodies, plan.include_usage), close, _record_headers(outputs))
    try:
        answer = await until_disconnected(request.receive, _collect(outputs, prepared, plan))
    finally:
        await close()
    if answer is None:
        return Response(status_code=_CLIENT_CLOSED_REQUEST)
    return json_response(answer, headers=_record_headers(outputs))


def _record_headers(outputs: list[OutputStream]) -> dict[str, str]:
    """The request's `x-pdserve-*` headers (sequence 0's, for n > 1) and its traceparent."""
    record = outputs[0].record
    headers = record.headers()
    if record.traceparent:
        headers["traceparent"] = record.traceparent
    return headers


async def _open(frontend: Frontend, prepared: PreparedRequest, n: int) -> list[OutputStream]:
    if n == 1:
        return [await frontend.open(prepared)]
    return await frontend.open_group(prepared, n)


async def _collect(outputs: list[OutputStream], prepared: PreparedRequest, plan: ChoicePlan) -> BaseModel:
    async def drain(output: OutputStream) -> OutputDelta:
        return merge_deltas([delta async for delta in output])

    merged = await asyncio.gather(*(drain(output) for output in outputs))
    chosen = list(range(len(merged)))
    if plan.num_choices < len(merged):  # best_of: the best by mean token logprob, in their order
        chosen = sorted(sorted(chosen, key=lambda i: -_mean_logprob(merged[i]))[:plan.num_choices])
    responses = [plan.bodies_for(index).response(merged[i], prepared.prompt_ids) for index, i in enumerate(chosen)]
    if len(merged) == 1:
        return responses[0]
    # Usage counts every sequence generated (best_of's discarded ones too: they were computed).
    return merge_responses(responses, [delta.usage for delta in merged])


def _mean_logprob(delta: OutputDelta) -> float:
    return sum(delta.logprobs) / len(delta.logprobs) if delta.logprobs else float("-inf")


async def _merged(outputs: list[OutputStream]) -> AsyncIterator[tuple[int, OutputDelta]]:
    """(choice index, delta) from every stream, as they come; raises the first error."""
    if len(outputs) == 1:
        async for delta in outputs[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, output: OutputStream) -> None:
        try:
            async for delta in output:
                await queue.put((index, delta))
            await queue.put((index, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, output)) for i, output in enumerate(outputs)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _events(outputs: list[OutputStream], bodies: list[CompletionBodies | ChatBodies],
                  include_usage: bool) -> AsyncGenerator[bytes, None]:
    """The SSE events of the request's streams, ending with [DONE], after an error event if
    one failed."""
    usages: dict[int, Usage] = {}
    try:
        async for index, delta in _merged(outputs):
            usages[index] = delta.usage
            chunk = bodies[index].chunk(delta)
            if chunk is not None:
                yield sse_event(chunk)
        if include_usage and usages:
            first = usages[min(usages)]
            total = Usage(first.prompt_tokens, sum(u.completion_tokens for u in usages.values()),
                          first.cached_tokens)
            yield sse_event(bodies[0].usage_chunk(total))
    except RequestError as exc:
        yield sse_event(error_body(exc.kind.openai_type, exc.message, exc.param))
    except Exception:
        log.exception("request %s failed while streaming", outputs[0].request.request_id)
        yield sse_event(error_body(ErrorKind.INTERNAL.openai_type, INTERNAL_MESSAGE))
    finally:
        await asyncio.gather(*(output.aclose() for output in outputs))
    yield SSE_DONE
