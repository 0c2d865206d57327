"""n > 1 choices (and completions' best_of) through the HTTP API with the official `openai`
client, over an in-process engine on the tiny Llama: the sequences share the prompt's KV,
greedy choices equal the n = 1 output, a seeded request's first choice is its n = 1 output
and the others draw from their own seed streams, streams carry every choice's index, and
usage counts the prompt once."""

from __future__ import annotations

import httpx
import pytest
from gateway_fixtures import served_gateway

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]  # 3 full pages of 4 and a partial one


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    with served_gateway(tiny_llama_dir) as served:
        yield served


@pytest.fixture(autouse=True)
def no_request_leaks_kv(gateway):
    yield
    assert gateway.wait_for_kv_blocks_in_use(0) == 0


def _completion(client, **kwargs):
    return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, extra_body={"ignore_eos": True},
                                     **kwargs)


def test_greedy_choices_equal_the_single_output_and_share_the_prompt(client, gateway):
    single = _completion(client, temperature=0).choices[0].text
    scheduler = gateway.engine.core.scheduler
    hits_before = scheduler.prefix_hit_tokens
    reply = _completion(client, temperature=0, n=4)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [single] * 4
    assert reply.usage.prompt_tokens == len(PROMPT) and reply.usage.completion_tokens == 4 * 12
    # Each of the three followers found the prompt's full pages in the cache (the leader
    # may too, from the n = 1 request before).
    assert scheduler.prefix_hit_tokens - hits_before >= 3 * 12


def test_seeded_choices_draw_from_their_own_seed_streams(client):
    single = _completion(client, temperature=1.0, seed=11).choices[0].text
    texts = [c.text for c in _completion(client, temperature=1.0, seed=11, n=3).choices]
    assert texts[0] == single
    assert len(set(texts)) == 3
    assert [c.text for c in _completion(client, temperature=1.0, seed=11, n=3).choices] == texts


def test_streamed_chat_choices_carry_their_indices(client):
    kwargs = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 10,
              "temperature": 0, "extra_body": {"ignore_eos": True}}
    single = client.chat.completions.create(**kwargs).choices[0].message.content
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(stream=True, n=4, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {i: single for i in range(4)}
    assert finishes == {i: "length" for i in range(4)}
    assert usage.completion_tokens == 40


def test_best_of_returns_the_best_by_mean_logprob(client):
    reply = _completion(client, temperature=1.0, seed=3, n=2, best_of=5, logprobs=0)
    assert [c.index for c in reply.choices] == [0, 1]
    every = _completion(client, temperature=1.0, seed=3, n=5, logprobs=0).choices
    means = sorted((sum(c.logprobs.token_logprobs) / 12 for c in every), reverse=True)[:2]
    got = sorted((sum(c.logprobs.token_logprobs) / 12 for c in reply.choices), reverse=True)
    assert got == pytest.approx(means, abs=1e-5)
    assert reply.usage.completion_tokens == 5 * 12


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": 3, "best_of": 2}, "best_of"),
    ({"best_of": 3, "stream": True}, "best_of"),
])
def test_bad_choice_counts_are_400s(base_url, body, param):
    reply = httpx.post(f"{base_url}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "Hi", "max_tokens": 4, **body})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
