"""One client cannot stall the others. While 8 greedy streams run through the HTTP API,
an attacker sends (a) a body over the size limit, (b) prompts over the context: one whose
lower bound on tokens is already over it (refused untokenized), and some that must be
tokenized to know, and (c) a stream it never reads. Each attack gets its error (413,
400), and every stream keeps receiving tokens while the server works on the attack:
counted, never timed.

The frontend advertises a context of CONTEXT tokens, as a long-context model would, over
the tiny engine (whose own context is 1,024 tokens; it refuses longer prompts itself).
That makes the tokenizer's work real: an OVER_BY_COUNT prompt passes the lower bound of
its tokens and must be tokenized (seconds of Rust code for all of them) before it is
refused. Tokenizing on the event loop, or in a thread that holds the GIL, stops every
stream for that long, and the streams then receive next to nothing in that window: the
time from the last byte of those requests to their answers.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
from gateway_fixtures import LocalGateway, serve_asgi

from pdserve.cluster.gateway.backend import LocalBackend
from pdserve.cluster.gateway.frontend import DEFAULT_MAX_REQUEST_BYTES
from pdserve.cluster.gateway.openai.api import create_app

CONTEXT = 100_000  # tokens, as the frontend advertises it
NUM_STREAMS = 8
STREAM_TOKENS = 400
# The tiny tokenizer's longest token is 13 bytes, so a text of CONTEXT * 13 bytes or more
# is refused without tokenizing. "x" is one token per character: these prompts pass that
# bound and are CONTEXT tokens too long after tokenizing.
OVER_BY_BOUND = "x" * (3 * 1024 * 1024)
OVER_BY_COUNT = "x" * (12 * CONTEXT)
NUM_OVER_BY_COUNT = 3
# Tokens each stream must receive while the server tokenizes the NUM_OVER_BY_COUNT prompts
# (seconds of Rust code), in which the tiny engine steps hundreds of times. Measured on 2
# cores: ~300 with tokenizing in threads that release the GIL; 0-2 with tokenizing on the
# event loop; 3-7 in threads that hold the GIL (the tokenizer's single-text encode).
MIN_TOKENS_PER_STREAM = 20


@pytest.fixture(scope="module")
def gateway(tiny_llama_dir):
    # KV for every stream at once (8 x ~420 tokens, the silent reader's 900), no preemption.
    gateway = LocalGateway.start(tiny_llama_dir, num_blocks=2048)
    yield gateway
    gateway.close()


@pytest.fixture(scope="module")
def base_url(gateway):
    frontend = gateway.frontend_for(LocalBackend(gateway.engine), advertised_context=CONTEXT)
    with serve_asgi(create_app(frontend)) as url:
        yield url


def _chat(content: str, **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


class CountingStream(threading.Thread):
    """One streaming chat request; counts the tokens received (`return_token_ids`)."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{base_url}/v1/chat/completions"
        self.running = threading.Event()  # set with the first token
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        body = _chat("Tell me a story.", max_tokens=STREAM_TOKENS, ignore_eos=True, stream=True,
                     return_token_ids=True)
        try:
            with httpx.stream("POST", self.url, json=body, timeout=300) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    choice = json.loads(line.removeprefix("data: "))["choices"][0]
                    self.num_tokens += len(choice.get("token_ids") or ())
                    self.finish_reason = choice["finish_reason"] or self.finish_reason
                    if self.num_tokens:
                        self.running.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.running.set()  # never leave the test waiting


def _silent_reader(base_url: str) -> socket.socket:
    """A connection that asks for a long stream (900 tokens with 20 alternatives each, over
    a megabyte of events) on a 4 KiB receive window, and never reads."""
    address = urlsplit(base_url)
    connection = socket.socket()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.connect((address.hostname, address.port))
    body = json.dumps(_chat("Hi", max_tokens=900, ignore_eos=True, stream=True, logprobs=True,
                            top_logprobs=20)).encode()
    connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return connection


class HeldBackRequest:
    """A POST sent on a raw connection but for the last byte of its body, which `finish`
    sends: the server has everything but cannot start on it until then."""

    def __init__(self, base_url: str, body: bytes) -> None:
        address = urlsplit(base_url)
        self._connection = socket.create_connection((address.hostname, address.port))
        self._connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: "
                                 b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:-1])
        self._last_byte = body[-1:]

    def finish(self) -> None:
        self._connection.sendall(self._last_byte)

    def response(self) -> tuple[int, str]:
        """The status and error message of the answer (waits for it)."""
        response = http.client.HTTPResponse(self._connection)
        response.begin()
        message = json.loads(response.read())["error"]["message"]
        self._connection.close()
        return response.status, message


def _refused(base_url: str, body: bytes) -> tuple[int, str]:
    response = httpx.post(f"{base_url}/v1/chat/completions", content=body, timeout=300,
                          headers={"Content-Type": "application/json"})
    return response.status_code, response.json()["error"]["message"]


def _wait_for_tokens(streams: list[CountingStream], num_tokens: int) -> None:
    """Wait until every stream has received `num_tokens` more tokens (or ended); the bound
    only keeps a broken build from hanging the suite."""
    targets = [s.num_tokens + num_tokens for s in streams]
    for _ in range(30_000):
        if all(s.num_tokens >= target or not s.is_alive() for s, target in zip(streams, targets)):
            return
        time.sleep(0.01)


def test_streams_keep_flowing_through_oversized_and_overlong_requests_and_a_silent_reader(base_url, gateway):
    assert len(json.dumps(_chat(OVER_BY_BOUND))) < DEFAULT_MAX_REQUEST_BYTES  # refused for its length only
    streams = [CountingStream(base_url) for _ in range(NUM_STREAMS)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.running.wait(timeout=120)
    silent = _silent_reader(base_url)

    too_big = b'{"messages": [{"role": "user", "content": "' + b"x" * (5 * 1024 * 1024) + b'"}]}'
    assert _refused(base_url, too_big)[0] == 413
    status, message = _refused(base_url, json.dumps(_chat(OVER_BY_BOUND)).encode())
    assert status == 400 and "maximum context length is 100000 tokens" in message and "has at least" in message

    held = [HeldBackRequest(base_url, json.dumps(_chat(OVER_BY_COUNT)).encode())
            for _ in range(NUM_OVER_BY_COUNT)]
    _wait_for_tokens(streams, 3)  # the server has read what it was sent meanwhile
    before = [s.num_tokens for s in streams]
    for request in held:
        request.finish()
    answers = [request.response() for request in held]
    during = [s.num_tokens - b for s, b in zip(streams, before)]
    silent.close()
    for stream in streams:
        stream.join(timeout=300)

    assert [s.error for s in streams] == [None] * NUM_STREAMS
    assert [(s.num_tokens, s.finish_reason) for s in streams] == [(STREAM_TOKENS, "length")] * NUM_STREAMS
    for status, message in answers:  # refused on their exact count
        assert status == 400 and "maximum context length is 100000 tokens" in message
        assert "has at least" not in message
    assert min(during) >= MIN_TOKENS_PER_STREAM, during
    # The silent reader's request ends with its connection: no request, no KV left behind.
    assert gateway.wait_for_kv_blocks_in_use(0) == 0
