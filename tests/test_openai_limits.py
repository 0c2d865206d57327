"""Limits that keep one HTTP client from slowing or stopping the others: the body size
limit (413 before the body is read, for declared and chunked bodies alike), prompts over
the context refused before they are tokenized when their length alone shows it, the
bounds on stop conditions, logprobs, n and max_tokens (400 naming the field), and requests
waiting for the tokenizer counted against the in-flight limit, against a real uvicorn
server over the tiny Llama. While 4 streams run, oversized bodies are refused and the
streams keep delivering tokens (counted, not timed)."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from gateway_fixtures import CountingPromptTokens, LocalGateway, serve_asgi

from pdserve.cluster.gateway.backend import LocalBackend
from pdserve.cluster.gateway.openai.api import create_app
from pdserve.runtime.sampling_params import (
    MAX_LOGPROBS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)

LIMIT = 64 * 1024
CONTEXT = 1024  # the tiny model's
CHAT = [{"role": "user", "content": "Hello world!"}]


@pytest.fixture(scope="module")
def gateway(tiny_llama_dir):
    gateway = LocalGateway.start(tiny_llama_dir)
    gateway.frontend.prompt_tokens = CountingPromptTokens(gateway.loaded.tokenizer)
    yield gateway
    gateway.close()


@pytest.fixture(scope="module")
def base_url(gateway):
    """The HTTP API with a body limit of LIMIT bytes over the tiny Llama."""
    with serve_asgi(create_app(gateway.frontend, max_body_bytes=LIMIT)) as url:
        yield url


def _chat(**fields) -> dict:
    return {"model": "tiny", "messages": CHAT, "max_tokens": 4, "temperature": 0, **fields}


def test_a_body_over_the_limit_is_refused_with_413(base_url):
    big = _chat(messages=[{"role": "user", "content": "x" * (2 * LIMIT)}])
    response = httpx.post(f"{base_url}/v1/chat/completions", json=big, timeout=30)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and str(LIMIT) in error["message"]


def test_a_chunked_body_over_the_limit_is_refused_with_413(base_url):
    def chunks():  # no Content-Length: the server counts what arrives
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(2 * LIMIT // 4096):
            yield b"x" * 4096
        yield b'"}]}'

    response = httpx.post(f"{base_url}/v1/chat/completions", content=chunks(),
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 413
    assert str(LIMIT) in response.json()["error"]["message"]


def test_a_body_under_the_limit_is_served(base_url):
    response = httpx.post(f"{base_url}/v1/chat/completions", json=_chat(), timeout=60)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("fields, param", [
    ({"stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]}, "stop"),
    ({"stop": "y" * (MAX_STOP_STRING_CHARS + 1)}, "stop"),
    ({"stop": ["ok", "z" * (MAX_STOP_STRING_CHARS + 1)]}, "stop"),
    ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids"),
])
def test_stop_conditions_past_their_bounds_are_refused(base_url, fields, param):
    response = httpx.post(f"{base_url}/v1/chat/completions", json=_chat(**fields), timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "stop" in error["message"]
    assert len(error["message"]) < 1000  # the offending values are not echoed back
    assert error["param"] == param


def test_stop_conditions_at_their_bounds_are_served(base_url):
    # Duplicated stop token ids count once.
    fields = {"stop": ["q" * MAX_STOP_STRING_CHARS] + [f"s{i}" for i in range(MAX_STOP_STRINGS - 1)],
              "stop_token_ids": list(range(300, 300 + MAX_STOP_TOKEN_IDS)) * 3}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=_chat(**fields), timeout=60)
    assert response.status_code == 200, response.text


def test_streams_keep_flowing_while_oversized_bodies_are_refused(base_url):
    tokens_during_attack = []
    attack_started, attack_done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def stream() -> None:
        body = _chat(max_tokens=400, stream=True, ignore_eos=True)
        try:
            with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {") and attack_started.is_set() and not attack_done.is_set():
                        tokens_during_attack.append(1)
        except httpx.HTTPError as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for thread in threads:
        thread.start()
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * (8 * LIMIT) + b'"}]}'
    attack_started.set()
    statuses = [httpx.post(f"{base_url}/v1/chat/completions", content=big,
                           headers={"Content-Type": "application/json"}, timeout=30).status_code
                for _ in range(20)]
    attack_done.set()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert statuses == [413] * 20
    assert sum(tokens_during_attack) > 0


# The tiny tokenizer's longest token has 13 bytes: 13 * CONTEXT bytes of text are over the
# context for sure; "x" is one token per character, so 2,000 of them are over it too, but
# only tokenizing tells.
FAR_OVER = "x" * (13 * CONTEXT)
JUST_OVER = "x" * 2000


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": FAR_OVER}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": FAR_OVER}]}, "messages"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": CONTEXT}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": CONTEXT}, "max_completion_tokens"),
])
def test_requests_over_the_context_by_their_length_are_refused_untokenized(base_url, gateway, path, body,
                                                                           param):
    counting = gateway.frontend.prompt_tokens
    encoded = counting.num_encoded
    response = httpx.post(base_url + path, json={"model": "tiny", **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert f"maximum context length is {CONTEXT} tokens" in error["message"]
    assert "has at least" in error["message"] or "requested at least" in error["message"]
    assert error["param"] == param
    assert counting.num_encoded == encoded


def test_a_prompt_over_the_context_by_its_token_count_is_refused_after_tokenizing(base_url, gateway):
    counting = gateway.frontend.prompt_tokens
    encoded = counting.num_encoded
    response = httpx.post(f"{base_url}/v1/completions", json={"prompt": JUST_OVER}, timeout=60)
    assert response.status_code == 400
    assert f"your prompt has {len(JUST_OVER)} tokens" in response.json()["error"]["message"]
    assert counting.num_encoded == encoded + 1


@pytest.mark.parametrize(("path", "fields", "param"), [
    ("/v1/completions", {"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # needs logprobs=true
    ("/v1/chat/completions", {"n": 17}, "n"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"max_tokens": 10**30}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {"max_tokens": CONTEXT - 3}, "max_tokens"),  # with the prompt, over
    ("/v1/chat/completions", {"max_completion_tokens": CONTEXT - 3}, "max_completion_tokens"),
])
def test_logprobs_n_and_max_tokens_past_their_bounds_are_refused(base_url, path, fields, param):
    body = {"model": "tiny", **fields}
    body.update({"prompt": "Hello"} if path == "/v1/completions" else {"messages": CHAT})
    response = httpx.post(base_url + path, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]


def _first_chunk(url: str, body: dict) -> dict:
    """The first chunk of a stream; leaving then aborts the rest of the request."""
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=300) as response:
        assert response.status_code == 200, response.read()
        return json.loads(next(line for line in response.iter_lines() if line.startswith("data: {"))[6:])


def test_logprobs_and_max_tokens_at_their_bounds_are_served(base_url):
    prompt_ids = [5, 77, 120]
    chunk = _first_chunk(f"{base_url}/v1/completions", {"prompt": prompt_ids, "max_tokens": CONTEXT - len(prompt_ids),
                                                         "ignore_eos": True})
    assert chunk["choices"][0]["text"] is not None
    # Without max_tokens a chat reply may use the rest of the context.
    chunk = _first_chunk(f"{base_url}/v1/chat/completions", {"messages": CHAT, "logprobs": True,
                                                             "top_logprobs": MAX_LOGPROBS, "ignore_eos": True})
    [token] = chunk["choices"][0]["logprobs"]["content"]
    assert len(token["top_logprobs"]) == MAX_LOGPROBS


def test_requests_waiting_for_the_tokenizer_count_against_the_in_flight_limit(gateway):
    hold = threading.Event()
    frontend = gateway.frontend_for(LocalBackend(gateway.engine), max_in_flight=1)
    frontend.prompt_tokens = CountingPromptTokens(gateway.loaded.tokenizer, hold)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
    results: list[httpx.Response] = []
    with serve_asgi(create_app(frontend)) as url:
        first = threading.Thread(target=lambda: results.append(httpx.post(f"{url}/v1/completions", json=body,
                                                                          timeout=60)))
        first.start()
        assert frontend.prompt_tokens.started.wait(timeout=60)  # the first is being tokenized
        refused = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        hold.set()
        first.join(timeout=60)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert [r.status_code for r in results] == [200]
    assert frontend.num_preparing == 0 and frontend.num_in_flight == 0
