"""The gateway's gRPC API end to end: a real grpc.aio server on 127.0.0.1 over an
in-process Frontend and engine, driven by clients built from the generated stubs.

The server runs on its own event loop in a background thread; the tests talk to it with
synchronous channels. The engine's model runner takes a step budget (`SteppedRunner`),
so a test can hold a request mid-generation for as long as it needs: abort, cancel and
deadline outcomes never depend on how fast the machine is.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import grpc
import pytest
from gateway_fixtures import CountingPromptTokens, GrpcServers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdserve.cluster.gateway.backend import LocalBackend
from pdserve.cluster.gateway.frontend import Frontend, ModelCard
from pdserve.cluster.gateway.grpc_api import GENERATION_SERVICE, HEALTH_SERVICE
from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import EngineCore
from pdserve.engine.llm import LLM
from pdserve.proto import serving_pb2, serving_pb2_grpc
from pdserve.runtime.config import CacheConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.sampling_params import SamplingParams

API_KEY = "sesame"
CONTEXT = 1024  # the tiny model's max_position_embeddings
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grpc_client.py"
# Logprobs may differ in the last bits between the gateway's engine and the reference LLM:
# the gateway's radix cache can reuse a prompt prefix computed earlier, which changes the
# order of float32 sums. 1e-5 is far below any gap between distinct tokens' logprobs.
LOGPROB_TOLERANCE = 1e-5


class SteppedRunner:
    """A ModelRunner that runs a forward only within its budget (None: no limit); the
    engine thread waits inside `execute` until a test grants more. Counts forwards."""

    def __init__(self, runner) -> None:
        self._runner = runner
        self._changed = threading.Condition()
        self._budget: int | None = None
        self.num_executed = 0

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def limit(self, num_forwards: int) -> None:
        with self._changed:
            self._budget = num_forwards

    def unlimit(self) -> None:
        with self._changed:
            self._budget = None
            self._changed.notify_all()

    def execute(self, batch):
        with self._changed:
            self._changed.wait_for(lambda: self._budget is None or self._budget > 0)
            if self._budget is not None:
                self._budget -= 1
            self.num_executed += 1
        return self._runner.execute(batch)


def _frontend(engine: AsyncEngine, loaded, max_in_flight: int = 1024) -> Frontend:
    card = ModelCard("tiny", loaded.info.max_model_len, int(time.time()))
    return Frontend(LocalBackend(engine), loaded.tokenizer, card, loaded.info.eos_token_ids, GatewayMetrics(),
                    max_in_flight=max_in_flight)


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), cache=CacheConfig(block_size=4, num_blocks=256))
    runner = SteppedRunner(loaded.runner)
    engine = AsyncEngine(EngineCore(runner, loaded.info))
    stopped = AsyncEngine(EngineCore(loaded.runner, loaded.info))  # never runs a step
    stopped.shutdown()
    frontend = _frontend(engine, loaded)
    frontends = {"open": frontend, "keyed": frontend, "one_at_a_time": _frontend(engine, loaded, max_in_flight=1),
                 "down": _frontend(stopped, loaded)}
    gateway = GrpcServers()
    addresses = {name: gateway.serve(f, api_key=API_KEY if name == "keyed" else None) for name, f in frontends.items()}
    yield {"runner": runner, "engine": engine, "frontends": frontends, "tokenizer": loaded.tokenizer,
           "loaded": loaded, "gateway": gateway, **addresses}
    runner.unlimit()
    gateway.close()
    for frontend in frontends.values():
        frontend.close()
    engine.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), block_size=4, num_kv_blocks=256)


@pytest.fixture
def runner(cluster):
    """The engine's runner; whatever budget a test sets is lifted afterwards."""
    yield cluster["runner"]
    cluster["runner"].unlimit()


@pytest.fixture
def stub(cluster):
    with grpc.insecure_channel(cluster["open"]) as channel:
        yield serving_pb2_grpc.GenerationStub(channel)


def _pool_in_use(engine: AsyncEngine) -> int:
    """KV blocks held by requests (blocks kept only by the prefix cache don't count)."""
    scheduler = engine.core.scheduler
    return scheduler.allocator.num_used - scheduler.prefix_cache.num_cached_blocks


def _wait_until(condition, what) -> None:
    """Poll `condition`; the bound only keeps a broken build from hanging the suite.
    `what` (a string, or a callable run on failure) says what never happened."""
    for _ in range(3000):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"gave up waiting until {what() if callable(what) else what}")


def _released_after_hold(cluster, runner: SteppedRunner, baseline: int, frontend: Frontend | None = None) -> None:
    """Once the gateway has let go of its stream, let the held engine run: the abort
    must free the request's KV within a step instead of running it to max_tokens."""
    frontend = frontend or cluster["frontends"]["open"]
    _wait_until(lambda: frontend.num_in_flight == 0, "the gateway closed the request's stream")
    executed = runner.num_executed
    runner.unlimit()
    engine = cluster["engine"]
    scheduler = engine.core.scheduler
    _wait_until(lambda: not scheduler.requests and _pool_in_use(engine) == baseline,
                lambda: f"the engine dropped the request and its KV blocks (still held: requests "
                        f"{sorted(scheduler.requests)}, {_pool_in_use(engine)} blocks against {baseline} before)")
    assert runner.num_executed - executed <= 2


def _greedy(**fields) -> dict:
    return {"temperature": 0.0, "ignore_eos": True, **fields}


def _collect(stub, request, **kwargs) -> list[serving_pb2.GenerateResponse]:
    return list(stub.Generate(request, timeout=60, **kwargs))


# ---------------------------------------------------------------------------- outputs


_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
_IDS = [5, 77, 120, 9, 250]
# Each input kind as a GenerateRequest, and the same prompt through the offline LLM.
_INPUTS = {
    "text": ({"text": "The quick brown fox"}, lambda llm, p: llm.generate("The quick brown fox", p)),
    "token_ids": ({"token_ids": serving_pb2.TokenIds(ids=_IDS)}, lambda llm, p: llm.generate([_IDS], p)),
    "chat": ({"chat": serving_pb2.Chat(messages=[serving_pb2.ChatMessage(**m) for m in _CHAT])},
             lambda llm, p: llm.chat(_CHAT, p)),
}


@pytest.mark.parametrize("source", ["text", "token_ids", "chat"])
def test_greedy_generate_equals_the_offline_llm(cluster, reference, stub, source):
    prompt, offline = _INPUTS[source]
    request = serving_pb2.GenerateRequest(**prompt, **_greedy(max_tokens=12, logprobs=2))
    expected = offline(reference, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]

    responses = _collect(stub, request)
    tokens = [t for r in responses for t in r.token_ids]
    logprobs = [lp for r in responses for lp in r.logprobs]
    assert tokens == expected.token_ids
    assert "".join(r.text for r in responses) == expected.text
    assert logprobs == pytest.approx(expected.logprobs, abs=LOGPROB_TOLERANCE)
    assert len({r.request_id for r in responses}) == 1 and responses[0].request_id
    # Only the last message finishes, and only it carries usage.
    *running, last = responses
    assert all(r.finish_reason == "" and not r.HasField("usage") for r in running)
    assert last.finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(expected.prompt_token_ids), 12)
    assert last.usage.cached_tokens <= last.usage.prompt_tokens
    # Greedy picks the best alternative; each token reports its 2 best.
    tops = [top for r in responses for top in r.top_logprobs]
    assert len(tops) == 12
    for token, lp, top in zip(tokens, logprobs, tops):
        assert len(top.alternatives) == 2
        best = top.alternatives[0]
        assert best.token_id == token and best.logprob == lp
        assert best.token_text == cluster["tokenizer"].decode([token], skip_special_tokens=False)


def test_stop_string_cuts_the_text_and_finishes_with_stop(cluster, reference, stub):
    full = reference.generate("Hello", SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0].text
    stop = full[6:9]
    assert len(stop) == 3, f"the tiny model's greedy text is too short to test stop strings: {full!r}"

    responses = _collect(stub, serving_pb2.GenerateRequest(text="Hello", stop=[stop], **_greedy(max_tokens=24)))
    assert "".join(r.text for r in responses) == full[:full.find(stop)]
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].usage.completion_tokens < 24


def test_default_max_tokens(cluster, stub):
    text = _collect(stub, serving_pb2.GenerateRequest(text="Hello", **_greedy()))
    assert text[-1].usage.completion_tokens == 16 and text[-1].finish_reason == "length"
    # A chat reply may use the rest of the context. Each digit is one token of the tiny
    # tokenizer, so the prompt can be sized to leave exactly 3 tokens.
    tokenizer = cluster["tokenizer"]
    base = len(tokenizer.encode_chat([{"role": "user", "content": ""}]))
    content = "7" * (CONTEXT - 3 - base)
    assert len(tokenizer.encode_chat([{"role": "user", "content": content}])) == CONTEXT - 3
    chat = serving_pb2.Chat(messages=[serving_pb2.ChatMessage(role="user", content=content)])
    responses = _collect(stub, serving_pb2.GenerateRequest(chat=chat, **_greedy()))
    assert responses[-1].usage.completion_tokens == 3 and responses[-1].finish_reason == "length"


# ---------------------------------------------------------------------------- ending early


def test_abort_ends_the_stream_with_abort_and_frees_the_kv(cluster, runner, stub):
    baseline = _pool_in_use(cluster["engine"])
    runner.limit(3)  # prefill and two decode steps, then the engine holds the request
    call = stub.Generate(serving_pb2.GenerateRequest(text="Hello", request_id="abort-me",
                                                     **_greedy(max_tokens=500)), timeout=60)
    first = next(call)
    assert first.request_id == "abort-me" and first.token_ids
    assert _pool_in_use(cluster["engine"]) > baseline
    with pytest.raises(grpc.RpcError) as taken:  # the id names a running request
        _collect(stub, serving_pb2.GenerateRequest(text="Hi", request_id="abort-me"))
    assert taken.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "in use" in taken.value.details()

    assert stub.Abort(serving_pb2.AbortRequest(request_id="abort-me"), timeout=60).found
    rest = list(call)
    assert rest[-1].finish_reason == "abort" and rest[-1].request_id == "abort-me"
    assert rest[-1].usage.prompt_tokens == len(cluster["tokenizer"].encode("Hello", add_special_tokens=True))
    assert rest[-1].usage.completion_tokens == sum(len(r.token_ids) for r in [first, *rest]) < 500
    _released_after_hold(cluster, runner, baseline)
    assert not stub.Abort(serving_pb2.AbortRequest(request_id="abort-me"), timeout=60).found


class _RecordingBackend:
    """A frontend's backend that records the ids of the requests sent to it."""

    def __init__(self, backend) -> None:
        self._backend = backend
        self.request_ids: list[str] = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def generate(self, request_id, *args, **kwargs):
        self.request_ids.append(request_id)
        return self._backend.generate(request_id, *args, **kwargs)


def test_abort_reaches_a_call_whose_prompt_is_being_tokenized(cluster):
    hold = threading.Event()
    frontend = _frontend(cluster["engine"], cluster["loaded"])
    frontend.prompt_tokens = CountingPromptTokens(cluster["tokenizer"], hold)
    frontend.backend = backend = _RecordingBackend(frontend.backend)
    with grpc.insecure_channel(cluster["gateway"].serve(frontend)) as channel:
        stub = serving_pb2_grpc.GenerationStub(channel)
        call = stub.Generate(serving_pb2.GenerateRequest(text="Hello", request_id="early", max_tokens=500),
                             timeout=60)
        assert frontend.prompt_tokens.started.wait(timeout=60)
        with pytest.raises(grpc.RpcError) as taken:  # the id is taken from the start
            _collect(stub, serving_pb2.GenerateRequest(text="Hi", request_id="early"))
        assert taken.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "in use" in taken.value.details()
        assert stub.Abort(serving_pb2.AbortRequest(request_id="early"), timeout=60).found
        hold.set()
        [response] = list(call)
    assert response.finish_reason == "abort" and response.request_id == "early"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (
        len(cluster["tokenizer"].encode("Hello", add_special_tokens=True)), 0)
    assert frontend.num_in_flight == 0 and frontend.num_preparing == 0
    assert backend.request_ids == []  # the aborted request never reached the engine
    frontend.close()


def test_client_cancel_frees_the_kv(cluster, runner, stub):
    baseline = _pool_in_use(cluster["engine"])
    runner.limit(3)
    call = stub.Generate(serving_pb2.GenerateRequest(text="Hello", **_greedy(max_tokens=500)), timeout=60)
    assert next(call).token_ids
    call.cancel()
    _released_after_hold(cluster, runner, baseline)


@pytest.mark.parametrize("limit", ["grpc_deadline", "timeout_seconds"])
def test_deadline_ends_the_request_and_frees_the_kv(cluster, runner, stub, limit):
    baseline = _pool_in_use(cluster["engine"])
    runner.limit(2)  # the request cannot finish before its deadline
    request = serving_pb2.GenerateRequest(text="Hello", **_greedy(max_tokens=500))
    if limit == "timeout_seconds":
        request.timeout_seconds = 0.5
    with pytest.raises(grpc.RpcError) as failed:
        list(stub.Generate(request, timeout=0.5 if limit == "grpc_deadline" else 60))
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    if limit == "timeout_seconds":
        assert "timeout of 0.5 s" in failed.value.details()
    _released_after_hold(cluster, runner, baseline)


def test_overload_is_resource_exhausted_with_retry_after(cluster, runner):
    baseline = _pool_in_use(cluster["engine"])
    runner.limit(1)
    with grpc.insecure_channel(cluster["one_at_a_time"]) as channel:
        stub = serving_pb2_grpc.GenerationStub(channel)
        held = stub.Generate(serving_pb2.GenerateRequest(text="Hello", **_greedy(max_tokens=500)), timeout=60)
        assert next(held).token_ids
        with pytest.raises(grpc.RpcError) as refused:
            _collect(stub, serving_pb2.GenerateRequest(text="Hi"))
        held.cancel()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(refused.value.trailing_metadata())["retry-after"] == "1"
    _released_after_hold(cluster, runner, baseline, cluster["frontends"]["one_at_a_time"])


# ---------------------------------------------------------------------------- refusals


def _refusal(stub, request, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        _collect(stub, request, **kwargs)
    return refused.value


@pytest.mark.parametrize(("request_fields", "says"), [
    ({}, "no input"),
    ({"text": ""}, "empty"),
    ({"text": "Hi", "temperature": -1.0}, "temperature"),
    ({"text": "Hi", "top_p": 0.0}, "top_p"),
    ({"text": "Hi", "logprobs": 21}, "logprobs"),
    ({"token_ids": serving_pb2.TokenIds(ids=[5, 320])}, "[0, 320)"),
    ({"token_ids": serving_pb2.TokenIds(ids=[5] * CONTEXT)}, "maximum context length"),
    ({"text": "Hi", "max_tokens": CONTEXT}, "max_tokens"),
    ({"chat": serving_pb2.Chat()}, "at least one message"),
    ({"chat": serving_pb2.Chat(messages=[serving_pb2.ChatMessage(role="robot", content="Hi")])},
     "chat.messages[0].role must be one of system, user, assistant"),
    ({"text": "Hi", "timeout_seconds": -1.0}, "timeout_seconds"),
    ({"text": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"text": "Hi", "max_tokens": 2**32 - 1}, "max_tokens"),
    ({"text": "Hi", "temperature": float("nan")}, "temperature"),
    # Over the context by its length alone (the tiny tokenizer's tokens have 13 bytes at most).
    ({"text": "x" * (13 * CONTEXT)}, "your prompt has at least 1024 tokens"),
])
def test_malformed_requests_are_invalid_argument(stub, request_fields, says):
    error = _refusal(stub, serving_pb2.GenerateRequest(**request_fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in error.details()


@pytest.mark.parametrize(("method", "message_type"), [("Generate", "GenerateRequest"), ("Abort", "AbortRequest")])
@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x1a\x02\xff\xfe"])  # corrupt; a text of bad UTF-8
def test_bytes_that_do_not_parse_are_invalid_argument(cluster, method, message_type, data):
    registry = cluster["frontends"]["open"].metrics.registry
    counted = registry.get_sample_value("pdserve_request_errors_total", {"kind": "invalid_argument"}) or 0
    with grpc.insecure_channel(cluster["open"]) as channel:
        path = f"/{GENERATION_SERVICE}/{method}"
        call = channel.unary_stream(path) if method == "Generate" else channel.unary_unary(path)
        with pytest.raises(grpc.RpcError) as refused:
            result = call(data, timeout=60)
            list(result) if method == "Generate" else result
    if method == "Abort" and data.startswith(b"\x1a"):  # field 3 is unknown to AbortRequest: skipped
        assert "request_id is empty" in refused.value.details()
    else:
        assert f"not a valid pdserve.serving.v1.{message_type} message" in refused.value.details()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Refused generations count as errors; aborts are not requests.
    expected = counted + (method == "Generate")
    assert registry.get_sample_value("pdserve_request_errors_total", {"kind": "invalid_argument"}) == expected


def test_unknown_model_is_not_found_and_counted(cluster, stub):
    registry = cluster["frontends"]["open"].metrics.registry
    counted = registry.get_sample_value("pdserve_request_errors_total", {"kind": "not_found"}) or 0
    error = _refusal(stub, serving_pb2.GenerateRequest(text="Hi", model="gpt-4"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "'tiny'" in error.details()
    assert registry.get_sample_value("pdserve_request_errors_total", {"kind": "not_found"}) == counted + 1


def test_errors_quote_long_values_briefly(stub):
    # gRPC sends the message as trailing metadata; one that quoted a 100 KB model name
    # whole would pass the client's 16 KiB limit, and the client would get no reason.
    error = _refusal(stub, serving_pb2.GenerateRequest(text="Hi", model="m" * 100_000))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "(100002 characters)" in error.details() and len(error.details()) < 300


def test_api_key_guards_generation_but_not_probes(cluster):
    with grpc.insecure_channel(cluster["keyed"]) as channel:
        stub = serving_pb2_grpc.GenerationStub(channel)
        request = serving_pb2.GenerateRequest(text="Hi", max_tokens=2)
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", API_KEY),)]:
            error = _refusal(stub, request, metadata=metadata)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in error.details()
        with pytest.raises(grpc.RpcError) as abort:
            stub.Abort(serving_pb2.AbortRequest(request_id="x"), timeout=60)
        assert abort.value.code() == grpc.StatusCode.UNAUTHENTICATED

        responses = _collect(stub, request, metadata=(("authorization", f"Bearer {API_KEY}"),))
        assert responses[-1].usage.completion_tokens == 2
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_taken_port_is_refused(cluster):
    # A second gateway must not silently share a port (gRPC's default SO_REUSEPORT).
    with pytest.raises(OSError, match="cannot listen for gRPC"):
        cluster["gateway"].serve(cluster["frontends"]["open"], address=cluster["open"])


# ---------------------------------------------------------------------------- probes


def test_health_follows_the_backend(cluster):
    statuses = health_pb2.HealthCheckResponse
    for address, expected in [(cluster["open"], statuses.SERVING), (cluster["down"], statuses.NOT_SERVING)]:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ["", GENERATION_SERVICE]:
                assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=60).status == expected
            watch = health.Watch(health_pb2.HealthCheckRequest(service=GENERATION_SERVICE), timeout=60)
            assert next(watch).status == expected
            watch.cancel()
            with pytest.raises(grpc.RpcError) as unknown:
                health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=60)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(cluster["down"]) as channel:
        error = _refusal(serving_pb2_grpc.GenerationStub(channel), serving_pb2.GenerateRequest(text="Hi"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_reflection_lists_and_describes_the_services(cluster):
    with grpc.insecure_channel(cluster["open"]) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=GENERATION_SERVICE)]
        listed, described = list(reflect.ServerReflectionInfo(iter(requests), timeout=60))
    names = {s.name for s in listed.list_services_response.service}
    assert names == {GENERATION_SERVICE, HEALTH_SERVICE, "grpc.reflection.v1alpha.ServerReflection"}
    files = described.file_descriptor_response.file_descriptor_proto
    assert any(b"pdserve.serving.v1" in f and b"GenerateRequest" in f for f in files)


# ---------------------------------------------------------------------------- the example


def _example():
    spec = importlib.util.spec_from_file_location("grpc_client_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_client_streams_text(cluster, reference, capsys):
    expected = reference.generate("Hello", SamplingParams(max_tokens=8, temperature=0.0))[0]
    example = _example()
    assert example.main(["Hello", "--address", cluster["keyed"], "--api-key", API_KEY, "--max-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out == expected.text + "\n"
    assert f"finish_reason={expected.finish_reason}" in err
    assert example.main(["Hello", "--address", cluster["keyed"]]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_example_client_aborts(cluster, runner, capsys):
    baseline = _pool_in_use(cluster["engine"])
    runner.limit(3)
    code = _example().main(["Hello", "--address", cluster["open"], "--max-tokens", "500", "--abort-after", "1"])
    assert code == 0
    assert "finish_reason=abort" in capsys.readouterr().err
    _released_after_hold(cluster, runner, baseline)


def test_oversized_messages_and_stop_bounds_are_refused(cluster, stub):
    # A message over the gateway's limit is refused by gRPC before it is parsed; stop
    # conditions past their bounds are INVALID_ARGUMENT, as over HTTP.
    from pdserve.runtime.sampling_params import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS

    small = cluster["gateway"].serve(cluster["frontends"]["open"], max_message_bytes=16 * 1024)
    with grpc.insecure_channel(small) as channel:
        small_stub = serving_pb2_grpc.GenerationStub(channel)
        big = serving_pb2.GenerateRequest(text="x" * (20 * 1024))
        assert _refusal(small_stub, big).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        fits = serving_pb2.GenerateRequest(text="x" * 500, **_greedy(max_tokens=1))
        assert _collect(small_stub, fits)[-1].finish_reason == "length"
    many_stops = serving_pb2.GenerateRequest(text="Hi", stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)])
    error = _refusal(stub, many_stops)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop" in error.details()
    many_ids = serving_pb2.GenerateRequest(text="Hi", stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)))
    assert _refusal(stub, many_ids).code() == grpc.StatusCode.INVALID_ARGUMENT
    # The server goes on serving.
    assert _collect(stub, serving_pb2.GenerateRequest(text="Hi", **_greedy(max_tokens=2)))[-1].finish_reason
