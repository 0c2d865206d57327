"""Limits that keep one HTTP client from slowing or stopping the others: the body size
limit (413 before the body is read, for declared and chunked bodies alike) and the bounds
on stop conditions (400 naming the field), against a real uvicorn server over the tiny
Llama. While 4 streams run, oversized bodies are refused and the streams keep delivering
tokens (counted, not timed)."""

from __future__ import annotations

import threading

import httpx
import pytest
from gateway_fixtures import LocalGateway, serve_asgi

from pdserve.cluster.gateway.openai.api import create_app
from pdserve.runtime.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS

LIMIT = 64 * 1024
CHAT = [{"role": "user", "content": "Hello world!"}]


@pytest.fixture(scope="module")
def base_url(tiny_llama_dir):
    """The HTTP API with a body limit of LIMIT bytes over the tiny Llama."""
    gateway = LocalGateway.start(tiny_llama_dir)
    try:
        with serve_asgi(create_app(gateway.frontend, max_body_bytes=LIMIT)) as url:
            yield url
    finally:
        gateway.close()


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
    ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, None),
])
def test_stop_conditions_past_their_bounds_are_refused(base_url, fields, param):
    response = httpx.post(f"{base_url}/v1/chat/completions", json=_chat(**fields), timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "stop" in error["message"]
    assert len(error["message"]) < 1000  # the offending values are not echoed back
    if param is not None:
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
