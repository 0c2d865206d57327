"""Stop tokens, length limits and streaming stop-string matching."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.runtime.sampling_params import SamplingParams
from pdserve.runtime.stopping import FinishReason, StopStringMatcher, check_stop_token

EOS = frozenset({2})


@pytest.mark.parametrize(
    "token, n, kwargs, expected",
    [
        (5, 1, {}, None),
        (2, 1, {}, FinishReason.STOP),  # eos
        (2, 1, {"ignore_eos": True}, None),
        (2, 16, {"ignore_eos": True}, FinishReason.LENGTH),
        (9, 1, {"stop_token_ids": [9]}, FinishReason.STOP),
        (9, 1, {"stop_token_ids": [9], "ignore_eos": True}, FinishReason.STOP),
        (5, 3, {"max_tokens": 3}, FinishReason.LENGTH),  # the 3rd token is the last
        (5, 2, {"max_tokens": 3}, None),
        (2, 3, {"max_tokens": 3}, FinishReason.STOP),  # stop wins over length
    ],
)
def test_check_stop_token(token, n, kwargs, expected):
    assert check_stop_token(token, n, SamplingParams(**kwargs), EOS) == expected


@pytest.mark.parametrize(
    "token, n, offset, kwargs, expected",
    [
        (2, 3, 0, {"min_tokens": 3}, None),  # eos after 2 tokens of at least 3: keep going
        (9, 3, 0, {"min_tokens": 3, "stop_token_ids": [9]}, None),
        (2, 4, 0, {"min_tokens": 3}, FinishReason.STOP),  # 3 tokens came before it
        (9, 4, 0, {"min_tokens": 3, "stop_token_ids": [9]}, FinishReason.STOP),
        (2, 1, 0, {"min_tokens": 0}, FinishReason.STOP),
        (2, 3, 1, {"min_tokens": 3}, FinishReason.STOP),  # 1 carried + 2 here came before it
        (2, 2, 1, {"min_tokens": 3}, None),
        (2, 2, 0, {"min_tokens": 5, "max_tokens": 2}, FinishReason.LENGTH),  # min above max
    ],
)
def test_min_tokens_holds_back_eos_and_stop_ids(token, n, offset, kwargs, expected):
    assert check_stop_token(token, n, SamplingParams(**kwargs), EOS, output_offset=offset) == expected


def test_finish_reason_values_are_api_strings():
    assert [r.value for r in FinishReason] == ["stop", "length", "abort", "error", "prefilled"]
    assert FinishReason.STOP == "stop"


def run(stop, deltas, include=False):
    """Push deltas until a hit; return (emitted text, index of the hitting delta or None)."""
    matcher = StopStringMatcher(tuple(stop), include)
    emitted = []
    for i, delta in enumerate(deltas):
        text, hit = matcher.push(delta)
        emitted.append(text)
        if hit:
            return "".join(emitted), i
    emitted.append(matcher.flush())
    return "".join(emitted), None


def test_holds_back_a_possible_stop_prefix_then_releases_it():
    matcher = StopStringMatcher(("</s>",))
    assert matcher.push("hello <") == ("hello ", False)
    assert matcher.push("/") == ("", False)
    assert matcher.push("b>") == ("</b>", False)  # not a stop after all: released
    assert matcher.push(" bye</") == (" bye", False)
    assert matcher.flush() == "</"
    assert matcher.flush() == ""


def test_stop_string_spanning_deltas_truncates_and_excludes_it():
    assert run(["STOP"], ["abc S", "T", "OP and more"]) == ("abc ", 2)
    assert run(["STOP"], ["abc S", "T", "OP and more"], include=True) == ("abc STOP", 2)


def test_earliest_completing_stop_wins():
    # "c" completes at character 3, before "bcd" completes at 4.
    assert run(["bcd", "c"], ["abcd"]) == ("ab", 0)
    # Both end at the same character: the longer one, starting earlier, is cut away.
    assert run(["c", "bc"], ["abcd"]) == ("a", 0)
    assert run(["x", "y"], ["1y2x"]) == ("1", 0)


def test_no_stop_strings_passes_everything_through():
    matcher = StopStringMatcher(())
    assert matcher.push("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_push_after_hit_is_an_error():
    matcher = StopStringMatcher(("x",))
    assert matcher.push("axb") == ("a", True)
    assert matcher.stopped
    with pytest.raises(RuntimeError):
        matcher.push("more")


def test_from_params_and_empty_stop_rejected():
    params = SamplingParams(stop=["##"], include_stop_str_in_output=True)
    assert StopStringMatcher.from_params(params).push("a##b") == ("a##", True)
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(("a", ""))


def reference(text, stop, include):
    """Naive: scan ends left to right; the first end where a stop string ends wins,
    the longest such stop among ties. Returns (output, end) with end None if no stop."""
    for end in range(1, len(text) + 1):
        ending_here = [s for s in stop if text[:end].endswith(s)]
        if ending_here:
            start = end - max(len(s) for s in ending_here)
            return text[: end if include else start], end
    return text, None


@st.composite
def stream_cases(draw):
    text = draw(st.text(alphabet="ab<>", max_size=40))
    stop = []
    for _ in range(draw(st.integers(0, 3))):
        if text and draw(st.booleans()):
            i = draw(st.integers(0, len(text) - 1))
            j = draw(st.integers(i + 1, min(len(text), i + 6)))
            stop.append(text[i:j])
        else:
            stop.append(draw(st.text(alphabet="ab<>", min_size=1, max_size=5)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=10)))
    bounds = [0, *cuts, len(text)]
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]  # empty deltas allowed
    return text, tuple(stop), deltas, draw(st.booleans())


@settings(max_examples=400, deadline=None)
@given(stream_cases())
def test_streaming_matches_truncation_at_first_stop(case):
    text, stop, deltas, include = case
    expected, end = reference(text, stop, include)
    matcher = StopStringMatcher(stop, include)
    emitted, consumed = "", 0
    for delta in deltas:
        out, hit = matcher.push(delta)
        emitted += out
        consumed += len(delta)
        # Emitted text is final: always a prefix of the reference output.
        assert expected.startswith(emitted)
        if hit:
            # The hit is reported on the delta that completes the stop string, not later.
            assert end is not None and consumed - len(delta) < end <= consumed
            break
    else:
        assert end is None
        emitted += matcher.flush()
    assert emitted == expected
