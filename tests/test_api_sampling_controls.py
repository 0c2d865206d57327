"""Sampling controls and the tokenizer endpoints through both APIs (HTTP with the
official `openai` client and httpx, gRPC with the generated stubs) over an in-process
engine on the tiny Llama: presence/frequency/repetition penalties, logit_bias and
min_tokens reach the engine and match the offline `LLM` with the same settings; bad values
are 400 / INVALID_ARGUMENT naming the field; /tokenize and /detokenize agree with the
tokenizer and need the API key."""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest
from gateway_fixtures import GrpcServers, LocalGateway, serve_asgi

from pdserve import LLM, SamplingParams
from pdserve.cluster.gateway.openai.api import create_app
from pdserve.proto import serving_pb2

API_KEY = "sk-controls"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = [5, 6, 7, 8, 9, 10]


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
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), block_size=4, num_kv_blocks=256)


CONTROLS = [
    {"frequency_penalty": 1.5},
    {"presence_penalty": 2.0, "logit_bias": {"77": 5.0, "78": -100.0}},
    {"repetition_penalty": 1.8, "min_tokens": 4},
]


@pytest.mark.parametrize("controls", CONTROLS)
def test_controls_over_http_equal_the_offline_engine(client, reference, controls):
    extra = {k: v for k, v in controls.items() if k in ("repetition_penalty", "min_tokens")}
    openai_fields = {k: v for k, v in controls.items() if k not in extra}
    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True, **extra}, **openai_fields)
    params = dict(controls)
    if "logit_bias" in params:
        params["logit_bias"] = {int(k): v for k, v in params["logit_bias"].items()}
    expected = reference.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                           **params))[0]
    assert done.choices[0].text == expected.text


def test_logit_bias_forces_and_forbids_a_token(client, gateway):
    forced = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                       logit_bias={"123": 100.0}, extra_body={"ignore_eos": True,
                                                                              "return_token_ids": True})
    assert forced.choices[0].model_extra["token_ids"] == [123] * 6
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, temperature=0,
                                      extra_body={"return_token_ids": True})
    first = plain.choices[0].model_extra["token_ids"][0]
    banned = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100.0}, extra_body={"return_token_ids": True})
    assert banned.choices[0].model_extra["token_ids"][0] != first


@pytest.mark.parametrize(("field", "value"), [
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0),
    ("logit_bias", {"abc": 1.0}), ("logit_bias", {"5": 101}), ("min_tokens", -1),
])
def test_bad_control_values_are_400s_naming_the_field(base_url, field, value):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, field: value}
    response = httpx.post(f"{base_url}/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_a_logit_bias_token_outside_the_vocabulary_is_refused(base_url):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "logit_bias": {"100000": 1.0}}
    response = httpx.post(f"{base_url}/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    assert "logit_bias" in response.json()["error"]["message"]


def test_controls_over_grpc(gateway, reference):
    from pdserve.proto import serving_pb2_grpc

    servers = GrpcServers()
    try:
        address = servers.serve(gateway.frontend, api_key=API_KEY)
        metadata = (("authorization", f"Bearer {API_KEY}"),)
        with grpc.insecure_channel(address) as channel:
            stub = serving_pb2_grpc.GenerationStub(channel)
            request = serving_pb2.GenerateRequest(token_ids=serving_pb2.TokenIds(ids=PROMPT), max_tokens=8,
                                                  temperature=0, ignore_eos=True, frequency_penalty=1.5,
                                                  logit_bias={77: 5.0}, min_tokens=2)
            tokens = [t for r in stub.Generate(request, metadata=metadata) for t in r.token_ids]
            expected = reference.generate([PROMPT], SamplingParams(
                max_tokens=8, temperature=0, ignore_eos=True, frequency_penalty=1.5, logit_bias={77: 5.0},
                min_tokens=2))[0]
            assert tokens == expected.token_ids
            bad = serving_pb2.GenerateRequest(text="Hi", max_tokens=2, presence_penalty=7.0)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(bad, metadata=metadata))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "presence_penalty" in caught.value.details()
    finally:
        servers.close()


def test_tokenize_and_detokenize(base_url, gateway):
    tokenizer = gateway.frontend.tokenizer
    response = httpx.post(f"{base_url}/tokenize", json={"prompt": "Hello world"}, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tokens"] == tokenizer.encode("Hello world", add_special_tokens=True)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == gateway.frontend.card.max_model_len
    messages = [{"role": "user", "content": "Hi there"}]
    chat = httpx.post(f"{base_url}/tokenize", json={"messages": messages}, headers=AUTH).json()
    assert chat["tokens"] == tokenizer.encode_chat(messages)
    back = httpx.post(f"{base_url}/detokenize", json={"tokens": body["tokens"]}, headers=AUTH).json()
    assert back["prompt"] == tokenizer.decode(body["tokens"], skip_special_tokens=False)
    bad = httpx.post(f"{base_url}/detokenize", json={"tokens": [10**6]}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = httpx.post(f"{base_url}/tokenize", json={"prompt": "a", "messages": messages}, headers=AUTH)
    assert both.status_code == 400
    assert httpx.post(f"{base_url}/tokenize", json={"prompt": "a"}).status_code == 401
    assert httpx.post(f"{base_url}/detokenize", json={"tokens": [1]}).status_code == 401
