"""The OpenAI-compatible HTTP API, driven by the official `openai` client (httpx where the
client cannot express a request) against a real uvicorn server on 127.0.0.1, over an
in-process engine serving the tiny Llama. The offline `LLM` on the same weights is the
reference for greedy outputs."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from gateway_fixtures import LocalGateway, serve_asgi

from pdserve import LLM, SamplingParams
from pdserve.cluster.gateway.backend import LocalBackend
from pdserve.cluster.gateway.openai.api import create_app

API_KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Logprobs: the server and the reference run the same float32 kernels on the same tokens,
# but the server's engine may reuse cached prefix KV where the reference recomputes it;
# that changes the summation order only, far below this bound.
LOGPROB_TOLERANCE = 1e-5
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello world!"}]


@pytest.fixture(scope="module")
def gateway(tiny_llama_dir):
    gateway = LocalGateway.start(tiny_llama_dir)
    yield gateway
    gateway.close()


@pytest.fixture(scope="module")
def base_url(gateway):
    with serve_asgi(create_app(gateway.frontend, api_key=API_KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    # No retries: a test must see the first answer (the client retries 408, 429 and 5xx).
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), block_size=4, num_kv_blocks=256)


@pytest.fixture(autouse=True)
def no_request_leaks_kv(gateway):
    """Every test starts and ends with no KV held by a request."""
    assert gateway.wait_for_kv_blocks_in_use(0) == 0
    yield
    assert gateway.wait_for_kv_blocks_in_use(0) == 0


def _greedy_reference(reference, prompt_ids, max_tokens, **params):
    [output] = reference.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                               **params))
    return output


def _stop_string_in(text: str) -> str:
    """Two characters from the middle of `text`, none of them a replacement character."""
    for start in range(len(text) // 3, len(text) - 2):
        candidate = text[start:start + 2]
        if "\ufffd" not in candidate and candidate.strip():
            return candidate
    raise AssertionError(f"no usable stop string in {text!r}")


# ------------------------------------------------------------------------ completions

def _stream_completion(client, **kwargs):
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(len(c.choices) == 1 for c in choice_chunks)
    assert all(c.id == chunks[0].id and c.object == "text_completion" for c in chunks)
    assert all(c.choices[0].finish_reason is None for c in choice_chunks[:-1])
    choices = [c.choices[0] for c in choice_chunks]
    logprobs = [lp for c in choices if c.logprobs for lp in c.logprobs.token_logprobs]
    token_ids = [t for c in choices for t in (c.model_extra or {}).get("token_ids", [])]
    return "".join(c.text for c in choices), token_ids, logprobs, choices[-1].finish_reason, usage_chunk.usage


@pytest.mark.parametrize("prompt_form", ["text", "token_ids"])
def test_completion_greedy_equals_the_engine_streamed_or_not(client, gateway, reference, prompt_form):
    text_prompt = "The quick brown fox"
    prompt_ids = gateway.loaded.tokenizer.encode(text_prompt, add_special_tokens=True)
    expected = _greedy_reference(reference, prompt_ids, 20, ignore_eos=True)
    request = {"model": "tiny", "prompt": text_prompt if prompt_form == "text" else prompt_ids,
               "max_tokens": 20, "temperature": 0, "logprobs": 0,
               "extra_body": {"ignore_eos": True, "return_token_ids": True}}

    whole = client.completions.create(**request)
    [choice] = whole.choices
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion" and whole.model == "tiny"
    assert choice.model_extra["token_ids"] == expected.token_ids
    assert whole.model_extra["prompt_token_ids"] == prompt_ids
    assert choice.text == expected.text
    assert choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=LOGPROB_TOLERANCE)
    assert choice.logprobs.tokens == [gateway.frontend.token_text(t) for t in expected.token_ids]
    assert whole.usage.prompt_tokens == len(prompt_ids)
    assert whole.usage.completion_tokens == 20
    assert whole.usage.total_tokens == len(prompt_ids) + 20
    assert whole.usage.prompt_tokens_details.cached_tokens >= 0

    text, token_ids, logprobs, finish, usage = _stream_completion(client, **request)
    assert (text, token_ids, finish) == (expected.text, expected.token_ids, "length")
    assert logprobs == pytest.approx(expected.logprobs, abs=LOGPROB_TOLERANCE)
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), 20)


def test_completion_top_logprobs_list_the_greedy_choice_first(client):
    whole = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, logprobs=3)
    logprobs = whole.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert top[token] == logprob  # the sampled token is always listed
        assert max(top.values()) == logprob  # greedy took the most likely token
        assert 1 <= len(top) <= 3
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]


def test_completion_stop_string_cuts_the_text(client, gateway, reference):
    prompt_ids = gateway.loaded.tokenizer.encode("Numbers: 12345", add_special_tokens=True)
    full = _greedy_reference(reference, prompt_ids, 24, ignore_eos=True).text
    stop = _stop_string_in(full)
    request = {"model": "tiny", "prompt": prompt_ids, "max_tokens": 24, "temperature": 0, "stop": [stop],
                   "extra_body": {"ignore_eos": True}}
    [choice] = client.completions.create(**request).choices
    assert choice.text == full[:full.index(stop)]
    assert choice.finish_reason == "stop"
    text, _, _, finish, _ = _stream_completion(client, **request)
    assert (text, finish) == (full[:full.index(stop)], "stop")


def test_a_top_p_below_float32_resolution_samples_the_most_likely_token(client, gateway, reference):
    # top_p=1e-300 is 0.0 in float32; the nucleus still holds the most likely token, so
    # sampling is greedy. (Found by the schema fuzzer: it once failed the engine step.)
    prompt_ids = gateway.loaded.tokenizer.encode("Hello world", add_special_tokens=True)
    expected = _greedy_reference(reference, prompt_ids, 8, ignore_eos=True)
    whole = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=8, temperature=1.0,
                                      top_p=1e-300, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert whole.choices[0].model_extra["token_ids"] == expected.token_ids


def test_completion_default_max_tokens_is_16(client):
    whole = client.completions.create(model="tiny", prompt="Hello", temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.usage.completion_tokens == 16
    assert whole.choices[0].finish_reason == "length"


# ------------------------------------------------------------------------ chat

def _stream_chat(client, **kwargs):
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                 **kwargs))
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    choices = [c.choices[0] for c in choice_chunks]
    assert choices[0].delta.role == "assistant"
    assert all(c.delta.role is None for c in choices[1:])
    assert all(c.finish_reason is None for c in choices[:-1])
    logprobs = [entry.logprob for c in choices if c.logprobs for entry in c.logprobs.content]
    token_ids = [t for c in choices for t in (c.model_extra or {}).get("token_ids", [])]
    text = "".join(c.delta.content or "" for c in choices)
    return text, token_ids, logprobs, choices[-1].finish_reason, usage_chunk.usage


def test_chat_greedy_equals_the_engine_on_the_templated_prompt(client, gateway, reference):
    prompt_ids = gateway.loaded.tokenizer.encode_chat(CHAT)
    expected = _greedy_reference(reference, prompt_ids, 20, ignore_eos=True)
    request = {"model": "tiny", "messages": CHAT, "max_completion_tokens": 20, "temperature": 0,
               "logprobs": True, "extra_body": {"ignore_eos": True, "return_token_ids": True}}

    whole = client.chat.completions.create(**request)
    [choice] = whole.choices
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.model_extra["token_ids"] == expected.token_ids
    assert choice.finish_reason == "length"
    assert [e.logprob for e in choice.logprobs.content] == pytest.approx(expected.logprobs,
                                                                         abs=LOGPROB_TOLERANCE)
    assert [e.token for e in choice.logprobs.content] == [gateway.frontend.token_text(t)
                                                          for t in expected.token_ids]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt_ids), 20)

    text, token_ids, logprobs, finish, usage = _stream_chat(client, **request)
    assert (text, token_ids, finish) == (expected.text, expected.token_ids, "length")
    assert logprobs == pytest.approx(expected.logprobs, abs=LOGPROB_TOLERANCE)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        len(prompt_ids), 20, len(prompt_ids) + 20)


def test_chat_text_parts_equal_plain_content_and_top_logprobs(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello world!"}]}]
    plain = [{"role": "user", "content": "Hello world!"}]
    common = {"model": "tiny", "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    with_parts = client.chat.completions.create(messages=parts, **common)
    with_plain = client.chat.completions.create(messages=plain, **common)
    assert with_parts.choices[0].message.content == with_plain.choices[0].message.content
    assert with_parts.usage.prompt_tokens == with_plain.usage.prompt_tokens
    for entry in with_parts.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the sampled token is the best
        assert bytes(entry.bytes).decode() == entry.token


def test_chat_stop_string_and_default_max_tokens(client, gateway, reference):
    prompt_ids = gateway.loaded.tokenizer.encode_chat(CHAT)
    full = _greedy_reference(reference, prompt_ids, 24, ignore_eos=True).text
    stop = _stop_string_in(full)
    request = {"model": "tiny", "messages": CHAT, "max_tokens": 24, "temperature": 0, "stop": stop,
                   "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**request)
    assert whole.choices[0].message.content == full[:full.index(stop)]
    assert whole.choices[0].finish_reason == "stop"
    text, _, _, finish, _ = _stream_chat(client, **request)
    assert (text, finish) == (full[:full.index(stop)], "stop")

    # Without max_tokens a chat request may use the rest of the context.
    rest = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert rest.usage.completion_tokens == gateway.frontend.card.max_model_len - len(prompt_ids)
    assert rest.choices[0].finish_reason == "length"


# ------------------------------------------------------------------------ models, health, metrics

def test_models_health_and_metrics(client, base_url):
    [model] = client.models.list().data
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "pdserve")
    assert model.model_extra["max_model_len"] == 1024
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")

    client.completions.create(model="tiny", prompt="Hi", max_tokens=2, extra_body={"ignore_eos": True})
    # Probes and scrapers need no API key.
    health = httpx.get(f"{base_url}/health")
    assert health.status_code == 200
    metrics = httpx.get(f"{base_url}/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=")
    assert 'pdserve_requests_finished_total{finish_reason="length"}' in metrics.text
    assert "pdserve_request_ttft_seconds_count" in metrics.text


# ------------------------------------------------------------------------ errors

def _assert_openai_error(response: httpx.Response, status: int, error_type: str, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_prompt_longer_than_the_context_is_a_400_naming_the_limit(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=[5] * 1100, max_tokens=1)
    assert caught.value.status_code == 400
    assert "maximum context length is 1024 tokens" in caught.value.message
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a " * 2000}])


def test_invalid_values_are_400s_naming_the_parameter(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="Hi", temperature=-1)
    assert caught.value.body["param"] == "temperature" and "temperature" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=CHAT, n=0)
    assert caught.value.body["param"] == "n" and "n" in caught.value.message
    with pytest.raises(openai.BadRequestError, match="batch prompts are not supported"):
        client.completions.create(model="tiny", prompt=["one", "two"])


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/completions", "suffix", "tail"),
])
def test_options_that_would_change_the_output_are_refused(base_url, path, field, value):
    body = {"model": "tiny", "max_tokens": 2, field: value}
    body.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": CHAT})
    error = _assert_openai_error(httpx.post(base_url + path, json=body, headers=AUTH), 400,
                                 "invalid_request_error", field)
    assert field in error["message"]


def test_malformed_and_mistyped_bodies_are_400s(base_url):
    url = f"{base_url}/v1/completions"
    error = _assert_openai_error(httpx.post(url, content=b'{"prompt": ', headers={**AUTH, "Content-Type":
                                                                                  "application/json"}),
                                 400, "invalid_request_error")
    assert "not valid JSON" in error["message"]
    error = _assert_openai_error(httpx.post(url, json={"prompt": "Hi", "max_tokens": "16"}, headers=AUTH),
                                 400, "invalid_request_error", "max_tokens")
    assert "max_tokens" in error["message"]
    error = _assert_openai_error(httpx.post(url, json={"prompt": "Hi", "temprature": 0}, headers=AUTH),
                                 400, "invalid_request_error", "temprature")
    assert "unrecognized field" in error["message"]
    error = _assert_openai_error(httpx.post(f"{base_url}/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, headers=AUTH),
        400, "invalid_request_error", "messages")
    assert "messages[0].content[0].type" in error["message"]
    _assert_openai_error(httpx.get(f"{base_url}/v1/no-such-route", headers=AUTH), 404, "not_found_error")
    _assert_openai_error(httpx.get(url, headers=AUTH), 405, "invalid_request_error")


def test_null_means_the_default_where_openai_allows_null(base_url):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "n": None, "stream": None, "logprobs": None,
            "presence_penalty": None, "frequency_penalty": None, "stop": None, "temperature": None}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 3


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="Hi")
    assert caught.value.body["type"] == "not_found_error" and "'tiny'" in caught.value.message


def test_api_key_is_required_on_v1_only(client, base_url):
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.completions.create(model="tiny", prompt="Hi", max_tokens=1)
    assert caught.value.status_code == 401 and caught.value.body["type"] == "authentication_error"
    missing = httpx.post(f"{base_url}/v1/completions", json={"prompt": "Hi"})
    assert "Missing API key" in _assert_openai_error(missing, 401, "authentication_error")["message"]
    assert client.completions.create(model="tiny", prompt="Hi", max_tokens=1).choices[0].text is not None
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_timeout_before_the_response_is_a_408_and_frees_the_kv(client, gateway):
    # 1000 tokens take far longer than 50 ms on any machine this runs on.
    long_request = {"model": "tiny", "prompt": "Hi", "max_tokens": 1000,
                        "extra_body": {"ignore_eos": True, "timeout": 0.05}}
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(**long_request)
    assert caught.value.status_code == 408 and caught.value.body["type"] == "timeout_error"
    assert gateway.wait_for_kv_blocks_in_use(0) == 0



def test_timeout_after_the_stream_started_is_an_error_event(gateway):
    # The first chunk comes within milliseconds of a 2 s timeout; the rest is held back
    # until the timeout has certainly expired.
    holding = HoldingBackend(LocalBackend(gateway.engine))
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 8, "ignore_eos": True, "timeout": 2.0,
            "stream": True, "return_token_ids": True}
    with serve_asgi(create_app(gateway.frontend_for(holding))) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line]
        holding.release()
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "timeout_error" and "timeout of 2 s" in error["message"]
    assert [json.loads(e.removeprefix("data: "))["object"] for e in events[:-2]] == ["text_completion"]
    assert holding.closed_early == holding.started


def test_no_worker_is_a_503(tiny_llama_dir):
    stopped = LocalGateway.start(tiny_llama_dir)  # its own engine, shut down: the shared one serves on
    stopped.engine.shutdown()
    with serve_asgi(create_app(stopped.frontend)) as url:
        _assert_openai_error(httpx.get(f"{url}/health"), 503, "service_unavailable")
        gone = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            gone.completions.create(model="tiny", prompt="Hi", max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.body["type"] == "service_unavailable"
        with pytest.raises(openai.InternalServerError):
            gone.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, stream=True)


# ------------------------------------------------------------------------ overload and disconnects

class HoldingBackend:
    """Wraps a backend: passes on each request's first `pass_through` chunks, then holds
    the rest back until `release()`. Records which requests started, and which ended
    with their consumer leaving before their last chunk (`closed_early`)."""

    def __init__(self, inner, pass_through: int = 1) -> None:
        self.inner = inner
        self.pass_through = pass_through
        self._released = threading.Event()
        self.started: list[str] = []
        self.completed: list[str] = []
        self.closed_early: list[str] = []

    def ready(self) -> bool:
        return self.inner.ready()

    def release(self) -> None:
        self._released.set()

    async def generate(self, request_id, prompt_ids, params, record=None):
        self.started.append(request_id)
        stream = self.inner.generate(request_id, prompt_ids, params, record)
        passed, finished = 0, False
        try:
            async for chunk in stream:
                while passed >= self.pass_through and not self._released.is_set():
                    await asyncio.sleep(0.005)
                finished = chunk.finish_reason is not None
                passed += 1
                yield chunk
        finally:
            (self.completed if finished else self.closed_early).append(request_id)
            await stream.aclose()


def _wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def _open_stream(http: httpx.Client, url: str, body: dict):
    """Start a streaming request; return (response, its data lines) once the first arrived
    (the first line is not consumed)."""
    response = http.send(http.build_request("POST", url, json={**body, "stream": True}), stream=True)
    assert response.status_code == 200
    lines = (line for line in response.iter_lines() if line)
    first = next(lines)
    return response, itertools.chain([first], lines)


def test_a_burst_past_max_in_flight_gets_429s_while_admitted_requests_complete(gateway):
    holding = HoldingBackend(LocalBackend(gateway.engine))
    frontend = gateway.frontend_for(holding, max_in_flight=2)
    # return_token_ids: every delta makes a chunk, even one whose text is still held back.
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "temperature": 0,
            "return_token_ids": True}
    request = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0,
               "extra_body": {"ignore_eos": True}}
    with serve_asgi(create_app(frontend)) as url, httpx.Client(timeout=60) as http:
        admitted = [_open_stream(http, f"{url}/v1/completions", body) for _ in range(2)]
        burst = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for _ in range(5):
            with pytest.raises(openai.RateLimitError) as caught:
                burst.completions.create(**request)
            assert caught.value.response.headers["Retry-After"] == "1"
            assert caught.value.body["type"] == "rate_limit_error"
        holding.release()
        for response, lines in admitted:
            events = list(lines)
            response.close()
            assert events[-1] == "data: [DONE]"
            chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert all("error" not in chunk for chunk in chunks)
        assert frontend.num_in_flight == 0
        assert burst.completions.create(**request).usage.completion_tokens == 8  # room again
    assert sorted(holding.completed) == sorted(holding.started) and len(holding.started) == 3
    assert 'pdserve_request_errors_total{kind="overloaded"} 5.0' in frontend.metrics.render().decode()


def test_a_full_engine_queue_is_a_429_with_retry_after(gateway):
    # max_waiting=0: the backend refuses every request, as it would with its queue full.
    frontend = gateway.frontend_for(LocalBackend(gateway.engine, max_waiting=0))
    with serve_asgi(create_app(frontend)) as url:
        for stream in (False, True):
            response = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "stream": stream})
            _assert_openai_error(response, 429, "rate_limit_error")
            assert response.headers["Retry-After"] == "1"
    assert frontend.num_in_flight == 0


def test_client_disconnect_mid_stream_aborts_the_request_and_frees_its_kv(base_url, gateway):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        data_lines = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            next(data_lines)
    assert gateway.wait_for_kv_blocks_in_use(0) == 0
    assert _wait_until(lambda: not gateway.engine.core.scheduler.requests)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_closes_its_output_stream(gateway, stream):
    # The held-back chunks make the request outlast its client whatever the machine's speed.
    holding = HoldingBackend(LocalBackend(gateway.engine))
    frontend = gateway.frontend_for(holding)
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True,
                       "stream": stream}).encode()
    with serve_asgi(create_app(frontend)) as url:
        address = urlsplit(url)
        with socket.create_connection((address.hostname, address.port)) as connection:
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
                               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(body), body))
            assert _wait_until(lambda: holding.started)
        assert _wait_until(lambda: holding.closed_early)
        assert holding.closed_early == holding.started and holding.completed == []
        assert _wait_until(lambda: frontend.num_in_flight == 0)
