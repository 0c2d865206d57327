"""Prompt logprobs (`SamplingParams.prompt_logprobs`) and the completions API's `echo`: read
off the prompt's logits on whichever worker prefills it (every chunk of it), shipped with the
first token (a prefill worker's TransferDone), and rendered as OpenAI's legacy echo and as
vLLM's `prompt_logprobs`."""

from __future__ import annotations

import dataclasses
import time

import grpc
import httpx
import pytest
import torch
from gateway_fixtures import GrpcServers, served_gateway
from hf_oracle import hf_logits
from test_disaggregated import Pair
from transformers import AutoModelForCausalLM

from pdserve.engine.engine import EngineCore
from pdserve.kv_transfer import messages
from pdserve.kv_transfer.messages import (
    MAX_DONE_BYTES,
    MalformedMessage,
    PrefillJob,
    TransferDone,
    done_bytes_bound,
    first_token_problem,
)
from pdserve.kv_transfer.transports import torch_dist
from pdserve.kv_transfer.transports.base import MAX_HEADER_BYTES
from pdserve.proto import serving_pb2, serving_pb2_grpc
from pdserve.runtime.config import CacheConfig, SchedulerConfig
from pdserve.runtime.loader import load_model
from pdserve.runtime.request import PromptLogprob, RequestState, TokenDelta
from pdserve.runtime.sampling_params import SamplingParams

# Ours and transformers' logprobs, both float32 on the same weights, differ only by the order
# of float sums (chunked paged attention, fused kernels): measured below 5e-5 on SmolLM2's
# logprobs (magnitudes up to ~20). 1e-3 leaves room for other CPUs' SIMD widths and is far
# below what a real bug moves (a logprob read at the wrong position or for the wrong token
# is off by whole units).
LOGPROB_TOLERANCE = 1e-3
SMOLLM2_TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
                "combined movable metal type, oil-based inks and a screw press adapted from the wine makers "
                "of the Rhine valley.")


def _first_delta(engine: EngineCore, request_id: str, prompt: list[int], params: SamplingParams) -> TokenDelta:
    """Run one request to its end alone; its first delta."""
    engine.add_request(request_id, prompt, params)
    deltas = []
    while engine.has_unfinished:
        deltas += engine.step()
    assert all(d.prompt_logprobs is None for d in deltas[1:])  # the first delta only
    return deltas[0]


def _ranks(row: torch.Tensor, token: int) -> range:
    """The ranks `token` may have under `row` (logprobs): 1 + the tokens more likely than it,
    exact but for near-ties with it."""
    return range(int((row > row[token] + LOGPROB_TOLERANCE).sum()) + 1,
                 int((row > row[token] - LOGPROB_TOLERANCE).sum()) + 2)


def _assert_match(entries: tuple[PromptLogprob, ...], prompt: list[int], logits: torch.Tensor, k: int) -> None:
    """`entries` are prompt tokens 1 .. P - 1's logprobs under `logits` (the oracle's, [P, V]),
    each with its k best alternatives: equal ids, except where the oracle's own values tie."""
    expected = torch.log_softmax(logits, dim=-1)
    assert len(entries) == len(prompt) - 1
    for j, entry in enumerate(entries, start=1):
        row, token = expected[j - 1], prompt[j]
        assert entry.logprob == pytest.approx(float(row[token]), abs=LOGPROB_TOLERANCE), f"prompt token {j}"
        assert entry.rank in _ranks(row, token)
        best_values, best_ids = row.topk(k)
        assert len(entry.top) == k
        for (ours, value), theirs, best in zip(entry.top, best_ids.tolist(), best_values.tolist()):
            assert value == pytest.approx(best, abs=LOGPROB_TOLERANCE)
            assert ours == theirs or abs(float(row[ours]) - best) < LOGPROB_TOLERANCE, f"prompt token {j}"


# ------------------------------------------------------------------------------- engine

@pytest.mark.slow
def test_prompt_logprobs_of_a_chunked_prompt_equal_transformers(smollm2_hf_model):
    loaded = load_model("smollm2-135m-instruct")
    prompt = loaded.tokenizer.encode(SMOLLM2_TEXT, add_special_tokens=True)
    assert 36 <= len(prompt) <= 48  # three chunks of 16
    engine = EngineCore(loaded.runner, loaded.info, SchedulerConfig(max_prefill_chunk=16))
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=5)
    cold = _first_delta(engine, "cold", prompt, params)
    _assert_match(cold.prompt_logprobs, prompt, hf_logits(smollm2_hf_model, prompt), k=5)
    # Its pages are in the prefix cache now: another request for prompt logprobs computes the
    # prompt again (cached pages have no logits) and gets the same values...
    warm = _first_delta(engine, "warm", prompt, params)
    assert warm.num_cached_tokens == 0
    assert warm.prompt_logprobs == cold.prompt_logprobs
    # ... while a request without them reuses the cached pages.
    plain = _first_delta(engine, "plain", prompt, dataclasses.replace(params, prompt_logprobs=None))
    assert plain.num_cached_tokens > 0 and plain.prompt_logprobs is None
    assert engine.scheduler.allocator.num_used == engine.scheduler.prefix_cache.num_cached_blocks


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), cache=CacheConfig(block_size=4, num_blocks=256))


@pytest.fixture(scope="module")
def tiny_hf(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


CHUNKED = SchedulerConfig(max_num_batched_tokens=32, max_prefill_chunk=8)


def test_a_prompt_preempted_while_prefilling_records_each_logprob_once(tiny, tiny_hf):
    # 12 blocks of 4 tokens: the older request grows while the younger one's prompt is
    # computed, so the younger one is preempted mid-prompt and recomputed from scratch.
    info = dataclasses.replace(tiny.info, num_blocks=12)
    engine = EngineCore(tiny.runner, info, CHUNKED)
    older, prompt = _prompt(28, seed=1), _prompt(24, seed=2)
    engine.add_request("older", older, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    engine.step()
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    request = engine.add_request("younger", prompt, params)
    first, preempted_mid_prompt = None, False
    while engine.has_unfinished:
        for delta in engine.step():
            if delta.request_id == "younger" and first is None:
                first = delta
        preempted_mid_prompt |= request.state is RequestState.PREEMPTED and not request.output_ids
    assert preempted_mid_prompt
    _assert_match(first.prompt_logprobs, prompt, hf_logits(tiny_hf, prompt), k=2)
    alone = _first_delta(EngineCore(tiny.runner, tiny.info, CHUNKED), "alone", prompt, params)
    assert first.prompt_logprobs == alone.prompt_logprobs


def test_a_request_resumed_after_output_was_sent_asks_for_no_prompt_logprobs(tiny):
    engine = EngineCore(tiny.runner, tiny.info, CHUNKED)
    prompt = _prompt(13, seed=3)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    _first_delta(engine, "original", prompt, params)
    # Migrated after 2 output tokens: they end its prompt, and its first delta here is not
    # the client's first; it reuses the cached prefix like any request.
    engine.add_request("moved", prompt, params, resume_at=2)
    deltas = []
    while engine.has_unfinished:
        deltas += engine.step()
    assert deltas[0].prompt_logprobs is None and deltas[0].num_cached_tokens > 0
    # Moved before any output was sent: the client's stream still waits for them.
    restarted = engine.add_request("restarted", prompt, params, resume_at=0)
    assert restarted.wants_prompt_logprobs


# ---------------------------------------------------------------------- disaggregated

def _run_pair(pair: Pair, request_id: str, prompt: list[int], params: SamplingParams,
              resume_at: int | None = None) -> list[TokenDelta]:
    """One request prefilled on the pair's prefill engine and decoded on its decode engine."""
    ticket = pair.decode.add_remote_request(request_id, prompt, params, resume_at)
    assert ticket is not None
    pair.prefill.add_job(PrefillJob(ticket, "loopback", prompt, params, resume_at))
    deltas = []
    for _ in range(500):
        if pair.prefill.has_unfinished:
            pair.prefill.step()
        deltas += pair.decode.step()
        if not pair.decode.has_unfinished and not pair.prefill.has_unfinished:
            return deltas
        time.sleep(0.001)  # let the pusher thread run
    raise AssertionError("the transfer did not settle")


@pytest.fixture
def pair(tiny_llama_dir):
    pair = Pair(tiny_llama_dir)
    yield pair
    pair.close()


def _colocated(tiny, prompt: list[int], params: SamplingParams) -> TokenDelta:
    return _first_delta(EngineCore(tiny.runner, tiny.info, CHUNKED, enable_prefix_caching=False), "ref",
                        prompt, params)


def test_the_decode_workers_first_delta_carries_the_prefill_workers_prompt_logprobs(pair, tiny):
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
    for i, n in enumerate((1, 2, 21)):  # no prompt logprobs at all, one, several chunks
        prompt = _prompt(n, seed=10 + i)
        deltas = _run_pair(pair, f"r{i}", prompt, params)
        expected = _colocated(tiny, prompt, params)
        assert deltas[0].prompt_logprobs == expected.prompt_logprobs
        assert len(deltas[0].prompt_logprobs) == n - 1
        assert deltas[0].token_ids == expected.token_ids
        assert all(d.prompt_logprobs is None for d in deltas[1:])
    assert pair.decode.remote.counts["succeeded"] == 3


def test_a_resumed_job_ships_no_prompt_logprobs(pair):
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
    deltas = _run_pair(pair, "moved", _prompt(9, seed=4), params, resume_at=2)
    assert deltas[0].token_ids and deltas[0].prompt_logprobs is None
    assert pair.decode.remote.counts["succeeded"] == 1


def test_prompt_logprobs_too_many_to_ship_are_computed_on_the_decode_worker(pair, tiny):
    prompt = _prompt(400, seed=5)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=20)
    assert done_bytes_bound("big", len(prompt) - 1, 20) > MAX_DONE_BYTES
    assert pair.decode.add_remote_request("big", prompt, params) is None  # nothing reserved
    assert pair.decode.remote.counts["prompt_logprobs_too_large"] == 1
    assert pair.decode.scheduler.allocator.num_used == 0
    first = _first_delta(pair.decode, "big", prompt, params)  # what the worker does then
    assert first.prompt_logprobs == _colocated(tiny, prompt, params).prompt_logprobs


def _tamper_done(pair: Pair, change) -> None:
    """Make the pair's link rewrite every TransferDone with `change(done)`."""
    pair.channel.send_done = lambda done: pair.receiver.accept_done(
        messages.decode(messages.encode(change(done))))


def test_bad_prompt_logprobs_are_refused_and_the_prompt_recomputed(pair, tiny):
    prompt = _prompt(11, seed=6)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    # A positive logprob: the receiver refuses the message (for any request).
    _tamper_done(pair, lambda done: dataclasses.replace(
        done, prompt_logprobs=(done.prompt_logprobs[0]._replace(logprob=0.5),) + done.prompt_logprobs[1:]))
    deltas = _run_pair(pair, "bad", prompt, params)
    assert pair.receiver.rejected["bad_token"] == 1
    assert pair.decode.remote.counts["failed_recomputed"] == 1
    assert deltas[0].prompt_logprobs == _colocated(tiny, prompt, params).prompt_logprobs  # computed here
    # Prompt logprobs for a request that did not ask: only the decode side knows; it refuses.
    plain = dataclasses.replace(params, prompt_logprobs=None)
    entry = PromptLogprob(-1.0, 1, ())
    _tamper_done(pair, lambda done: dataclasses.replace(done, prompt_logprobs=(entry,) * (len(prompt) - 1)))
    deltas = _run_pair(pair, "unasked", prompt, plain)
    assert deltas[0].prompt_logprobs is None
    assert pair.decode.remote.counts["failed_recomputed"] == 2
    assert pair.receiver.rejected["bad_token"] == 2


def _done(prompt_logprobs: tuple[PromptLogprob, ...]) -> TransferDone:
    return TransferDone("r", 1, bytes(16), 7, -0.5, ((7, -0.5),), prompt_logprobs)


GOOD = (PromptLogprob(-1.5, 3, ((4, -0.2), (9, -1.0))), PromptLogprob(-0.1, 1, ((8, -0.1), (2, -3.0))))


@pytest.mark.parametrize(("prompt_logprobs", "num", "max_top", "problem"), [
    (GOOD, 2, 2, None),
    (GOOD, 3, 2, "2 prompt logprobs sent; expected 3"),
    ((), 2, 2, "0 prompt logprobs sent; expected 2"),
    (GOOD, 2, 1, "2 alternatives sent for a prompt token; at most 1 allowed"),
    ((GOOD[0]._replace(top=((10, -0.2),)),), 1, 2, "token id 10 is outside the vocabulary"),
    ((GOOD[0]._replace(rank=0),), 1, 2, "prompt token rank 0 is outside [1, 10]"),
    ((GOOD[0]._replace(logprob=float("nan")),), 1, 2, "logprob nan is not a log-probability"),
    ((GOOD[0]._replace(top=((4, 0.7),)),), 1, 2, "logprob 0.7 is not a log-probability"),
])
def test_first_token_problem_checks_the_prompt_logprobs(prompt_logprobs, num, max_top, problem):
    found = first_token_problem(_done(prompt_logprobs), vocab_size=10, max_top_logprobs=1,
                                num_prompt_logprobs=num, max_prompt_top=max_top)
    assert found == problem if problem is None else problem in found


def test_prompt_logprobs_cross_the_wire_typed_and_are_checked_on_decoding():
    # Every transport's frame head holds MAX_DONE_BYTES (torch.distributed's: 4 KiB less two
    # uint64 lengths).
    assert MAX_DONE_BYTES <= min(MAX_HEADER_BYTES, torch_dist.HEAD_BYTES - 16)
    done = _done(GOOD)
    decoded = messages.decode(messages.encode(done))
    assert decoded == done and all(isinstance(e, PromptLogprob) for e in decoded.prompt_logprobs)
    assert len(messages.encode(done)) <= done_bytes_bound("r", 2, 2)
    body = messages.msgpack.unpackb(messages.encode(done))
    for bad in ([[-1.0, 1]], [[-1.0, 1.5, []]], [[-1.0, 1, [[4]]]], [["x", 1, []]], [[True, 1, []]]):
        with pytest.raises(MalformedMessage, match="prompt_logprobs"):
            messages.decode(messages.msgpack.packb({**body, "prompt_logprobs": bad}))


# ------------------------------------------------------------------------------ HTTP

PROMPT = "Hello world! How are you today?"


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    with served_gateway(tiny_llama_dir) as served:
        yield served


@pytest.fixture(scope="module")
def prompt_ids(gateway):
    ids = gateway.loaded.tokenizer.encode(PROMPT, add_special_tokens=True)
    assert gateway.loaded.tokenizer.decode(ids, skip_special_tokens=False) == PROMPT  # no BOS to echo
    return ids


@pytest.fixture(scope="module")
def expected_logprobs(tiny_hf, prompt_ids):
    """transformers' log_softmax after each prompt token: row j - 1 scores prompt token j."""
    return torch.log_softmax(hf_logits(tiny_hf, prompt_ids), dim=-1)


@pytest.fixture(autouse=True)
def no_request_leaks_kv(request):
    if "gateway" not in request.fixturenames:
        yield
        return
    gateway = request.getfixturevalue("gateway")
    yield
    assert gateway.wait_for_kv_blocks_in_use(0) == 0


GREEDY = {"model": "tiny", "max_tokens": 5, "temperature": 0}


def test_echo_returns_the_prompt_before_the_completion(client):
    plain = client.completions.create(prompt=PROMPT, **GREEDY)
    echoed = client.completions.create(prompt=PROMPT, echo=True, **GREEDY)
    assert plain.choices[0].text and echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert echoed.choices[0].logprobs is None
    assert (echoed.usage.prompt_tokens, echoed.usage.completion_tokens) == (plain.usage.prompt_tokens, 5)


def test_echo_with_logprobs_lists_the_prompt_tokens_first(client, gateway, prompt_ids, expected_logprobs):
    plain = client.completions.create(prompt=PROMPT, logprobs=2, **GREEDY).choices[0]
    echoed = client.completions.create(prompt=PROMPT, echo=True, logprobs=2, **GREEDY).choices[0]
    lists, n = echoed.logprobs, len(prompt_ids)
    token_text = gateway.frontend.token_text
    assert lists.tokens == [token_text(t) for t in prompt_ids] + plain.logprobs.tokens
    assert lists.token_logprobs[0] is None and lists.top_logprobs[0] is None  # nothing precedes it
    for j in range(1, n):
        row = expected_logprobs[j - 1]
        assert lists.token_logprobs[j] == pytest.approx(float(row[prompt_ids[j]]), abs=LOGPROB_TOLERANCE)
        top = lists.top_logprobs[j]
        assert token_text(prompt_ids[j]) in top and len(top) <= 3  # the 2 best by text, and the token itself
        assert max(top.values()) == pytest.approx(float(row.max()), abs=LOGPROB_TOLERANCE)
    # The completion's logprobs as without echo, but for float rounding: the plain request
    # reused the cached prompt, the echo computed it again.
    assert lists.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    for ours, theirs in zip(lists.top_logprobs[n:], plain.logprobs.top_logprobs, strict=True):
        assert ours.keys() == theirs.keys() and list(ours.values()) == pytest.approx(list(theirs.values()), abs=1e-5)
    # Offsets index the choice's text, the prompt included.
    assert lists.text_offset[:n] == [sum(len(t) for t in lists.tokens[:i]) for i in range(n)]
    assert lists.text_offset[n:] == [len(PROMPT) + offset for offset in plain.logprobs.text_offset]


def test_echo_in_a_stream_sends_the_prompt_in_the_first_chunk(client, gateway, prompt_ids):
    plain = client.completions.create(prompt=PROMPT, logprobs=1, **GREEDY).choices[0]
    chunks = [c for c in client.completions.create(prompt=PROMPT, echo=True, logprobs=1, stream=True, **GREEDY)
              if c.choices]
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + plain.text
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    assert tokens == [gateway.frontend.token_text(t) for t in prompt_ids] + plain.logprobs.tokens
    assert values[0] is None and None not in values[1:]
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset][len(prompt_ids):] == \
        [len(PROMPT) + offset for offset in plain.logprobs.text_offset]


def _check_vllm_prompt_logprobs(body: list, prompt_ids: list[int], expected: torch.Tensor, k: int,
                                token_text) -> None:
    assert len(body) == len(prompt_ids) and body[0] is None
    for j, ranked in enumerate(body[1:], start=1):
        row, token = expected[j - 1], prompt_ids[j]
        own = ranked[str(token)]
        assert own["logprob"] == pytest.approx(float(row[token]), abs=LOGPROB_TOLERANCE)
        assert own["rank"] in _ranks(row, token)
        assert own["decoded_token"] == token_text(token)
        best = sorted(ranked.values(), key=lambda e: e["rank"])[:k]
        assert [e["rank"] for e in best] == list(range(1, k + 1))
        assert [e["logprob"] for e in best] == pytest.approx(row.topk(k).values.tolist(), abs=LOGPROB_TOLERANCE)
        assert len(ranked) in (k, k + 1)  # the k best, and the prompt token when it is not among them


def test_prompt_logprobs_extra_field_returns_vllms_shape(client, gateway, prompt_ids, expected_logprobs):
    completion = client.completions.create(prompt=PROMPT, extra_body={"prompt_logprobs": 2}, **GREEDY)
    _check_vllm_prompt_logprobs(completion.model_extra["prompt_logprobs"], prompt_ids, expected_logprobs, 2,
                                gateway.frontend.token_text)
    assert completion.choices[0].text == client.completions.create(prompt=PROMPT, **GREEDY).choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=2,
                                          temperature=0, extra_body={"prompt_logprobs": 0})
    body = chat.model_extra["prompt_logprobs"]
    assert len(body) == chat.usage.prompt_tokens and body[0] is None
    assert all(len(ranked) == 1 and next(iter(ranked.values()))["logprob"] <= 0 for ranked in body[1:])


def test_echo_with_n_choices_echoes_the_prompt_in_each(client, prompt_ids):
    response = client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=0, n=2, max_tokens=4,
                                         temperature=1.0, seed=7)
    assert sorted(c.index for c in response.choices) == [0, 1]
    for choice in response.choices:
        assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
        assert choice.logprobs.token_logprobs[0] is None
        assert len(choice.logprobs.tokens) == len(prompt_ids) + 4
    chunks = client.completions.create(model="tiny", prompt=PROMPT, echo=True, n=2, max_tokens=4, stream=True,
                                       temperature=1.0, seed=7)
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == {c.index: c.text for c in response.choices}


def test_prompt_logprobs_out_of_range_are_400s(base_url):
    reply = httpx.post(f"{base_url}/v1/completions", json={"prompt": PROMPT, "prompt_logprobs": 21})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt_logprobs"


def test_grpc_first_response_carries_the_prompt_logprobs(gateway, prompt_ids, expected_logprobs):
    servers = GrpcServers()
    try:
        with grpc.insecure_channel(servers.serve(gateway.frontend)) as channel:
            stub = serving_pb2_grpc.GenerationStub(channel)
            responses = list(stub.Generate(serving_pb2.GenerateRequest(
                text=PROMPT, max_tokens=3, temperature=0, prompt_logprobs=2), timeout=60))
    finally:
        servers.close()
    first = responses[0].prompt_logprobs
    assert [e.token_id for e in first] == prompt_ids[1:]
    for j, entry in enumerate(first, start=1):
        row = expected_logprobs[j - 1]
        assert entry.logprob == pytest.approx(float(row[prompt_ids[j]]), abs=LOGPROB_TOLERANCE)
        assert entry.rank in _ranks(row, prompt_ids[j])
        assert [a.logprob for a in entry.alternatives] == pytest.approx(row.topk(2).values.tolist(),
                                                                        abs=LOGPROB_TOLERANCE)
        assert entry.token_text == gateway.frontend.token_text(prompt_ids[j])
    assert all(not r.prompt_logprobs for r in responses[1:])
