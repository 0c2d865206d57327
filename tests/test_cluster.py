"""The cluster end to end: `pdserve serve` on local Ray (a separate process tree), driven
only through its public interfaces - the official `openai` client, gRPC stubs, /metrics.

Two clusters on the tiny Llama:
  - 1 prefill + 1 decode worker (disaggregated; every prompt longer than the local-prefill
    threshold is prefilled by the prefill worker and its KV shipped to the decode worker,
    over the nixl transport, forced): outputs, concurrency, disconnects, overload, bad input;
  - 1 prefill + 2 decode workers with the prefix-aware router: routing and worker loss.
Greedy references come from the in-process engine (`LLM`) on the same checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import grpc
import httpx
import openai
import pytest
from serve_process import API_KEY, BLOCK, ServeProcess, cmdline, wait_for, workers_idle

from pdserve import LLM, SamplingParams
from pdserve.proto import serving_pb2, serving_pb2_grpc


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir) -> str:
    return str(tiny_llama_dir)


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model_dir, block_size=BLOCK, num_kv_blocks=512)


@pytest.fixture(scope="module")
def disagg(model_dir):
    server = ServeProcess(model_dir, "--prefill-workers", "1", "--decode-workers", "1",
                          "--local-prefill-tokens", "4", "--max-in-flight", "40", "--kv-transport", "nixl")
    yield server
    server.stop_and_check()


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 131 + i * 17) % 250 + 60 for i in range(n)]


GREEDY = {"temperature": 0.0, "ignore_eos": True}


# --------------------------------------------------------------------- OpenAI HTTP


def test_completions_equal_the_in_process_engine(disagg, llm):
    client = disagg.client()
    prompt = _prompt(1, 37)
    expected = llm.generate([prompt], SamplingParams(max_tokens=12, logprobs=2, **GREEDY))[0]
    done = client.completions.create(model=disagg.model_name, prompt=prompt, max_tokens=12, temperature=0,
                                     logprobs=2, extra_body={"ignore_eos": True})
    choice = done.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    assert done.usage.prompt_tokens == 37 and done.usage.completion_tokens == 12

    stream = client.completions.create(model=disagg.model_name, prompt=prompt, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_stream_and_stop_string_equal_the_in_process_engine(disagg, llm):
    client = disagg.client()
    messages = [{"role": "user", "content": "the cluster serves this conversation"}]
    expected = llm.chat(messages, SamplingParams(max_tokens=16, **GREEDY))[0]
    stream = client.chat.completions.create(model=disagg.model_name, messages=messages, max_tokens=16,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expected.text
    stop = expected.text[3:5]
    if stop:
        cut = llm.chat(messages, SamplingParams(max_tokens=16, stop=[stop], **GREEDY))[0]
        done = client.chat.completions.create(model=disagg.model_name, messages=messages, max_tokens=16,
                                              temperature=0, stop=[stop], extra_body={"ignore_eos": True})
        assert done.choices[0].message.content == cut.text
        assert done.choices[0].finish_reason == "stop"


def test_32_concurrent_streams_each_equal_their_reference(disagg, llm):
    prompts = [_prompt(100 + i, 20 + (i * 7) % 40) for i in range(32)]
    expected = llm.generate(prompts, SamplingParams(max_tokens=10, **GREEDY))

    async def one(client: openai.AsyncOpenAI, prompt: list[int]) -> str:
        stream = await client.completions.create(model=disagg.model_name, prompt=prompt, max_tokens=10,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_of_them() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{disagg.http_url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=300) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    before = disagg.metrics()
    texts = asyncio.run(all_of_them())
    assert texts == [e.text for e in expected]
    after = disagg.metrics()
    remote = 'pdserve_routes_total{decode_worker="decode-0",prefill="remote"}'
    local = 'pdserve_routes_total{decode_worker="decode-0",prefill="local"}'
    routed = {kind: after.get(key, 0) - before.get(key, 0) for kind, key in (("remote", remote), ("local", local))}
    assert sum(routed.values()) == 32
    # Until the prefill worker has 1,024 prompt tokens queued (17+ of these prompts), none
    # spills to the decode worker; past that, some may.
    assert routed["remote"] >= 17, routed
    # Worker counters reach /metrics with the controller's next poll: every transfer the
    # gateway started so far (this test's and earlier ones) succeeded.
    succeeded = 'pdserve_worker_transfer_outcomes_total{outcome="succeeded",role="decode",worker="decode-0"}'
    wait_for(lambda: disagg.metrics().get(succeeded) == after[remote], what="transfer outcomes")
    assert after['pdserve_request_ttft_split_seconds_count{stage="kv_transfer"}'] >= routed["remote"]


def test_client_disconnect_mid_stream_frees_kv_on_both_workers(disagg):
    wait_for(lambda: workers_idle(disagg.metrics()), what="an idle cluster")
    body = {"model": disagg.model_name, "prompt": _prompt(7, 60), "max_tokens": 900, "temperature": 0,
            "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{disagg.http_url}/v1/completions", json=body, headers=headers,
                      timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
        assert got
    wait_for(lambda: workers_idle(disagg.metrics()), what="KV usage back to baseline after disconnect")
    m = disagg.metrics()
    assert m['pdserve_requests_finished_total{finish_reason="length"}'] >= 1


def test_overload_gets_fast_429_and_accepted_requests_complete(disagg):
    body = {"model": disagg.model_name, "prompt": _prompt(9, 24), "max_tokens": 48, "temperature": 0,
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def burst():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(f"{disagg.http_url}/v1/completions", json=body,
                                                      headers=headers) for _ in range(120)))  # 3x --max-in-flight

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) > 0 and statuses.count(200) >= 40
    for r in responses:
        if r.status_code == 429:
            assert float(r.headers["Retry-After"]) > 0
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 48


def test_bad_input_and_api_keys_on_both_apis(disagg):
    client = disagg.client()
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=disagg.model_name, prompt=[70] * 1100, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    wrong = openai.OpenAI(base_url=f"{disagg.http_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with grpc.insecure_channel(disagg.grpc_address) as channel:
        stub = serving_pb2_grpc.GenerationStub(channel)
        good = [("authorization", f"Bearer {API_KEY}")]
        bad_request = serving_pb2.GenerateRequest(text="hello", temperature=-1.0)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(bad_request, metadata=good, timeout=60))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(serving_pb2.GenerateRequest(text="hello"), metadata=[("authorization", "Bearer no")],
                               timeout=60))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --------------------------------------------------------------------- gRPC


def test_grpc_generate_abort_health_and_reflection(disagg, llm):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    prompt = _prompt(3, 30)
    expected = llm.generate([prompt], SamplingParams(max_tokens=10, **GREEDY))[0]
    metadata = [("authorization", f"Bearer {API_KEY}")]
    with grpc.insecure_channel(disagg.grpc_address) as channel:
        stub = serving_pb2_grpc.GenerationStub(channel)
        request = serving_pb2.GenerateRequest(token_ids=serving_pb2.TokenIds(ids=prompt), max_tokens=10,
                                              temperature=0.0, ignore_eos=True)
        replies = list(stub.Generate(request, metadata=metadata, timeout=120))
        assert [t for r in replies for t in r.token_ids] == expected.token_ids
        assert "".join(r.text for r in replies) == expected.text
        assert replies[-1].finish_reason == "length"

        long_request = serving_pb2.GenerateRequest(token_ids=serving_pb2.TokenIds(ids=prompt), max_tokens=900,
                                                   temperature=0.0, ignore_eos=True, request_id="to-abort")
        call = stub.Generate(long_request, metadata=metadata, timeout=120)
        first = next(call)
        assert first.request_id == "to-abort"
        assert stub.Abort(serving_pb2.AbortRequest(request_id="to-abort"), metadata=metadata, timeout=30).found
        assert list(call)[-1].finish_reason == "abort"

        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=30))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"pdserve.serving.v1.Generation", "grpc.health.v1.Health"} <= names
    wait_for(lambda: workers_idle(disagg.metrics()), what="KV usage back to baseline after Abort")


# --------------------------------------------------------------------- routing and worker loss


@pytest.fixture(scope="module")
def two_decoders(model_dir, disagg):
    disagg.stop_and_check()  # one cluster at a time on a small machine
    server = ServeProcess(model_dir, "--prefill-workers", "1", "--decode-workers", "2",
                          "--router", "prefix_aware", "--local-prefill-tokens", "8",
                          "--speculative", "ngram", "--num-speculative-tokens", "3")
    yield server
    server.stop_and_check()


def _routes(metrics: dict[str, float]) -> dict[tuple[str, str], float]:
    found = {}
    for key, value in metrics.items():
        match = re.fullmatch(r'pdserve_routes_total\{decode_worker="([^"]+)",prefill="(\w+)"\}', key)
        if match:
            found[match.group(1), match.group(2)] = value
    return found


def test_prefix_aware_routing_follows_the_cached_prefix(two_decoders):
    client = two_decoders.client()
    shared = _prompt(42, 200)
    before = _routes(two_decoders.metrics())
    client.completions.create(model=two_decoders.model_name, prompt=shared + [70, 71, 72], max_tokens=2,
                              temperature=0)
    first = _routes(two_decoders.metrics())
    (holder, path), = [k for k in first if first[k] - before.get(k, 0) == 1]
    assert path == "remote", "a long uncached prompt is prefilled by the prefill worker"
    # The holder's cache events reach the router within a few controller polls.
    time.sleep(2.0)
    for i in range(4):
        done = client.completions.create(model=two_decoders.model_name, prompt=shared + [80 + i] * 5,
                                         max_tokens=2, temperature=0)
        assert done.usage.prompt_tokens_details.cached_tokens == 200  # the whole shared prefix
    after = _routes(two_decoders.metrics())
    moved = {k: after[k] - first.get(k, 0) for k in after if after[k] != first.get(k, 0)}
    assert moved == {(holder, "local"): 4}, "short uncached suffix: the holder prefills it locally"


def test_speculative_decoding_in_the_cluster_keeps_greedy_output(two_decoders, llm):
    # The tiny model's greedy text repeats itself; as a prompt, lookup finds drafts in it.
    seed_prompt = _prompt(11, 20)
    own_text = llm.generate([seed_prompt], SamplingParams(max_tokens=60, **GREEDY))[0].token_ids
    prompt = seed_prompt + own_text
    expected = llm.generate([prompt], SamplingParams(max_tokens=30, **GREEDY))[0]
    done = two_decoders.client().completions.create(
        model=two_decoders.model_name, prompt=prompt, max_tokens=30, temperature=0,
        extra_body={"ignore_eos": True})
    assert done.choices[0].text == expected.text

    def proposed() -> float:
        m = two_decoders.metrics()
        return sum(v for k, v in m.items() if k.startswith("pdserve_worker_spec_proposed_tokens_total"))

    wait_for(lambda: proposed() > 0, what="speculative drafts in the worker metrics")


def test_killed_decode_workers_are_replaced_and_their_stream_migrates(two_decoders, llm):
    client = two_decoders.client()
    victims = [p for p in two_decoders.descendants() if "DecodeWorker" in " ".join(cmdline(p))]
    assert len(victims) == 2
    killed = _decode_workers(two_decoders)
    prompt = _prompt(5, 40)
    expected = llm.generate([prompt], SamplingParams(max_tokens=900, **GREEDY))[0]
    body = {"model": two_decoders.model_name, "prompt": prompt, "max_tokens": 900, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    errors, text, usage = [], "", None
    with httpx.stream("POST", f"{two_decoders.http_url}/v1/completions", json=body, headers=headers,
                      timeout=120) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        text += json.loads(first[5:])["choices"][0]["text"]
        for victim in victims:
            victim.send_signal(signal.SIGKILL)
        for line in lines:  # the stream waits for a replacement and goes on (migration)
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                errors.append(event)
            usage = event.get("usage") or usage
            text += "".join(c["text"] for c in event.get("choices", []))
    assert not errors
    assert usage["completion_tokens"] == 900 and usage["prompt_tokens"] == 40
    assert text == expected.text, "no token lost or repeated across the migration"
    wait_for(lambda: _healthy_with_new_decoders(two_decoders, killed), timeout=180,
              what="replacement decode workers")
    done = client.completions.create(model=two_decoders.model_name, prompt=_prompt(6, 20), max_tokens=4,
                                     temperature=0)
    assert done.usage.completion_tokens == 4


def _decode_workers(server: ServeProcess) -> set[str]:
    labels = [k for k in server.metrics() if k.startswith('pdserve_worker_kv_usage{role="decode"')]
    return {re.search(r'worker="([^"]+)"', k).group(1) for k in labels}


def _healthy_with_new_decoders(server: ServeProcess, killed: set[str]) -> bool:
    if httpx.get(f"{server.http_url}/health", timeout=10).status_code != 200:
        return False
    workers = _decode_workers(server)
    return len(workers) == 2 and not workers & killed
