"""Tool calling for the chat API (`cluster/gateway/tools/`): parsing each family's output,
the streamed parser against the whole-text one over every way of cutting the text, the
prompt a model with and without tools in its template sees, the grammars that force a
call (driven by random logits over SmolLM2's real vocabulary), the forced stream over the
outputs they admit (arguments as they arrive), and the request checks."""

from __future__ import annotations

import itertools
import json
import re
from unittest.mock import ANY

import gguf
import hypothesis
import jsonschema
import llguidance
import llguidance.torch as llg_torch
import pytest
import torch
from hypothesis import strategies as st

from pdserve.cluster.gateway.prompt_tokens import PromptTokens
from pdserve.cluster.gateway.tools import (
    FAMILIES,
    ArgumentsDelta,
    ContentDelta,
    ToolCallStart,
    ToolCallStream,
    check_tools,
    family_for,
    forced_tool_grammar,
    parse_tool_calls,
    template_messages,
)
from pdserve.cluster.gateway.tools.calls import CALL_FORMATS, call_head, format_calls
from pdserve.runtime.tokenizer import IncrementalDetokenizer, Tokenizer


def _tool(name: str, parameters: dict | None = None, description: str = "") -> dict:
    function = {"name": name, "description": description}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


WEATHER = _tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                "required": ["city"]}, "The weather in a city")


def _calls(parsed) -> list[tuple[str, str]]:
    return [(call.name, call.arguments) for call in parsed[1]]


# ------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize(("family", "text", "content", "calls"), [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     None, [("get_weather", '{"city": "Paris"}')]),
    # Several calls; arguments exactly as written (inner whitespace kept, outer trimmed),
    # "parameters" read as "arguments", any whitespace between the parts.
    ("hermes", ('<tool_call>{"name": "a", "arguments": { "x" : [1, 2] }}</tool_call>\n\n'
               '<tool_call>\n {"parameters": {}, "name": "b"} \n</tool_call>\n'),
     None, [("a", '{ "x" : [1, 2] }'), ("b", "{}")]),
    # Content before the first call, right-stripped; a tag inside a string is not a tag.
    ("hermes", ('Let me look.\n\n<tool_call>\n{"name": "f", "arguments": {"s": "</tool_call><tool_call>"}}'
               "\n</tool_call>"),
     "Let me look.", [("f", '{"s": "</tool_call><tool_call>"}')]),
    ("hermes", "Just an answer, no <tool call>.", "Just an answer, no <tool call>.", []),
    ("hermes", "", None, []),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}',
     None, [("get_weather", '{"city": "Paris"}')]),
    ("llama3", ('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"type": "function", "name": "b", '
               '"arguments": {}};\n'),
     None, [("a", '{"x": 1}'), ("b", "{}")]),
    ("llama3", "  \n{\"name\": \"a\", \"parameters\": {\"q\": \"x;y\"}}  ", None, [("a", '{"q": "x;y"}')]),
    ("llama3", "Paris is sunny today.", "Paris is sunny today.", []),
])
def test_parse_tool_calls(family, text, content, calls):
    parsed = parse_tool_calls(family, text)
    assert parsed[0] == content
    assert _calls(parsed) == calls
    ids = [call.id for call in parsed[1]]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == len(ids)


MALFORMED = [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"city": "Paris",}}\n</tool_call>'),  # bad JSON
    ("hermes", 'Sure. <tool_call>\n{"name": "f", "arguments": {"city": "Paris"}}'),  # unclosed tag
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"city": "Par'),  # cut short
    ("hermes", '<tool_call>\n{"name": "f", "arguments": ["Paris"]}\n</tool_call>'),  # arguments a list
    ("hermes", '<tool_call>\n{"name": "f", "arguments": "{\\"city\\": 1}"}\n</tool_call>'),  # a string
    ("hermes", '<tool_call>\n{"function": "f", "args": {}}\n</tool_call>'),  # unknown structure
    ("hermes", '<tool_call>\n{"arguments": {}}\n</tool_call>'),  # no name
    ("hermes", '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>'),  # empty name
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}, "extra": 1}\n</tool_call>'),  # unknown key
    ("hermes", '<tool_call>\n{"name": "f", "name": "g", "arguments": {}}\n</tool_call>'),  # repeated key
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"x": NaN}}\n</tool_call>'),  # not JSON
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call> and then some text'),  # text after
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g"}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": ' + "[" * 100_000 + "}}</tool_call>"),  # deep
    ("llama3", '{"name": "f", "parameters": {"city": "Paris"}'),  # bad JSON
    ("llama3", '{"name": "f", "parameters": [1]}'),
    ("llama3", '{"parameters": {}}'),
    ("llama3", '{"name": "f", "parameters": {}} Does that help?'),
    ("llama3", '{"name": "f", "parameters": {}}; {"name": "g"}'),
    ("llama3", '{"name": "f", "parameters": {}};}'),
    ("llama3", '<|python_tag|>brave_search.call(query="x")'),
    ("llama3", "Here it is: {\"name\": \"f\", \"parameters\": {}}"),
]


@pytest.mark.parametrize(("family", "text"), MALFORMED)
def test_malformed_calls_are_content(family, text):
    assert parse_tool_calls(family, text) == (text, [])


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="hermes, llama3"):
        parse_tool_calls("mistral", "")
    with pytest.raises(ValueError, match="hermes, llama3"):
        ToolCallStream("mistral")
    with pytest.raises(ValueError, match="hermes, llama3"):
        ToolCallStream("mistral", forced=True)


# ------------------------------------------------------------------------------ streaming

def _pieces(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def _check_against_parse(family: str, text: str, cuts: list[int], forced: bool = False) -> None:
    stream = ToolCallStream(family, forced)
    events = [event for piece in _pieces(text, cuts) for event in stream.feed(piece)]
    at_finish = stream.finish()
    if forced:
        assert at_finish == []  # a complete forced output went out while it was fed
    events += at_finish
    content, calls = parse_tool_calls(family, text)
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == (content or "")
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [e.index for e in starts] == list(range(len(calls)))
    assert [e.name for e in starts] == [call.name for call in calls]
    for index, call in enumerate(calls):
        at = events.index(starts[index])
        mine = [i for i, e in enumerate(events) if isinstance(e, ArgumentsDelta) and e.index == index]
        assert all(i > at for i in mine)  # the start (complete name) comes before any argument text
        assert "".join(events[i].text for i in mine) == call.arguments
    ids = [e.id for e in starts]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids) and len(set(ids)) == len(ids)


_PIECES = ["Hello", " ", "\n", "<", "<tool", "<tool_call", "<tool_call>", "</tool_call>", "{", "}", ";",
           "<|python_tag|>", "<|py", '"', "x"]
_ARGUMENTS = st.dictionaries(st.text(alphabet='ab<>/{}";: \n', max_size=6),
                             st.one_of(st.integers(), st.text(alphabet='ab<>/";\n', max_size=6),
                                       st.lists(st.booleans(), max_size=2)), max_size=3)


@st.composite
def _outputs(draw, family: str) -> str:
    """Model outputs: well-formed calls with content around and varied JSON layout, cut
    short or with a piece inserted (malformed), or loose pieces of the formats."""
    calls = draw(st.lists(st.tuples(st.sampled_from(["get_weather", "a-b_1"]), _ARGUMENTS), min_size=1,
                          max_size=3))
    indent = draw(st.sampled_from([None, 1]))
    text = format_calls(family, [(name, json.dumps(args, indent=indent)) for name, args in calls])
    if family == "hermes":
        text = draw(st.text(alphabet="ab <>\n", max_size=12)) + draw(st.sampled_from(["", " ", "\n\n"])) + text
    else:
        text = draw(st.sampled_from(["", " ", "<|python_tag|>", "\n<|python_tag|> "])) + text
    text += draw(st.sampled_from(["", "\n", " \n"]))
    how = draw(st.sampled_from(["whole", "cut", "insert", "pieces"]))
    if how == "cut":
        text = text[:draw(st.integers(0, len(text)))]
    elif how == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(_PIECES)) + text[at:]
    elif how == "pieces":
        text = "".join(draw(st.lists(st.sampled_from(_PIECES + [text]), max_size=8)))
    return text


@pytest.mark.parametrize("family", FAMILIES)
@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(data=st.data())
def test_stream_agrees_with_parse_for_every_cut(family, data):
    text = data.draw(_outputs(family))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    _check_against_parse(family, text, cuts)


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_agrees_with_parse_one_character_at_a_time(family):
    for _, text in [m for m in MALFORMED if m[0] == family]:
        _check_against_parse(family, text[:2000], list(range(min(len(text), 2000))))
    call = format_calls(family, [("f", '{"x": 1}'), ("g", "{}")])
    _check_against_parse(family, "Hi <tool_call" + call, list(range(len(call) + 13)))
    _check_against_parse(family, call, list(range(len(call))))
    _check_against_parse(family, " <|python_tag|>" + call, list(range(len(call) + 15)))


def test_stream_sends_content_early_and_holds_what_may_become_a_call():
    stream = ToolCallStream("hermes")
    assert stream.feed("Hello") == [ContentDelta("Hello")]
    assert stream.feed(" wor") == [ContentDelta(" wor")]
    assert stream.feed("ld  \n") == [ContentDelta("ld")]  # whitespace waits: a call may follow
    assert stream.feed("<tool_") == []  # may begin "<tool_call>"
    assert stream.feed("box>!") == [ContentDelta("  \n<tool_box>!")]
    assert stream.feed(' <tool_call>{"name": "f", "arguments": {}}') == []
    assert stream.feed("</tool_call>") == []  # calls wait for the end: a later one may be malformed
    [start, arguments] = stream.finish()
    assert (start.index, start.name, arguments) == (0, "f", ArgumentsDelta(0, "{}"))

    llama = ToolCallStream("llama3")
    assert llama.feed(" <|py") == []
    assert llama.feed("thon") == []
    assert llama.feed("ic") == [ContentDelta(" <|pythonic")]  # cannot be "<|python_tag|>" any more
    held = ToolCallStream("llama3")
    assert held.feed('\n{"name": "f", ') == []
    assert held.finish() == [ContentDelta('\n{"name": "f", ')]  # a cut-short call comes back as content
    with pytest.raises(RuntimeError):
        held.feed("more")


# ------------------------------------------------------------------------------ prompts

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(smollm2_gguf_path))


HISTORY = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 25}'},
    {"role": "user", "content": "And Oslo?"},
]


def test_family_for_templates_and_overrides(smollm2):
    assert family_for(smollm2.chat_template) == "hermes"  # no tools in it: pdserve describes them
    assert family_for(None) == "hermes"
    assert family_for("{% for t in tools %}<tool_call>{% endfor %}") == "hermes"
    assert family_for("{{- '<|python_tag|>' + tool_call.name }}") == "llama3"
    assert family_for("{%- if message.role == 'ipython' %}") == "llama3"
    assert family_for("{{ '<tool_call>' }}", override="llama3") == "llama3"
    with pytest.raises(ValueError, match="hermes, llama3"):
        family_for(None, override="pythonic")


def test_template_without_tools_gets_them_as_text(smollm2):
    assert not smollm2.supports_tools
    messages, tools = template_messages(HISTORY, [WEATHER], "hermes", smollm2.supports_tools)
    assert tools is None
    prompt = PromptTokens(smollm2).render_chat(messages, tools)
    assert json.dumps(WEATHER) in prompt  # the name and the full schema
    assert "<tool_call>" in prompt.split("<|im_start|>user")[0]  # the system message says how to call
    paris = format_calls("hermes", [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')])
    assert f"<|im_start|>assistant\n{paris}<|im_end|>" in prompt
    assert ('<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n'
            '<tool_response>\n{"temp": 25}\n</tool_response><|im_end|>') in prompt  # one turn, one message
    assert prompt.endswith("<|im_start|>user\nAnd Oslo?<|im_end|>\n<|im_start|>assistant\n")
    # What pdserve writes for a past call is what it parses from the model.
    assert _calls(parse_tool_calls("hermes", messages[2]["content"])) == [
        ("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')]
    assert HISTORY[1]["content"] is None  # the caller's messages are not modified


def test_template_without_tools_keeps_the_system_message_and_writes_llama3_calls():
    history = [{"role": "system", "content": "Be brief."}, *HISTORY[:3]]
    messages, _ = template_messages(history, [WEATHER], "llama3", template_supports_tools=False)
    assert messages[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"parameters": <arguments-json-object>' in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                                                           '{"name": "get_weather", "parameters": {"city": "Rome"}}'}
    assert messages[3] == {"role": "user", "content": '{"temp": 21}'}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    # Without tools the history is still written out, and no system message is added.
    messages, _ = template_messages(HISTORY[:2], None, "hermes", template_supports_tools=False)
    assert [m["role"] for m in messages] == ["user", "assistant"]


TOOL_TEMPLATE = (
    "{% if tools is defined %}TOOLS:{% for t in tools %}{{ t.function.name }}={{ t.function.parameters | tojson }};"
    "{% endfor %}|{% else %}NO TOOLS|{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.tool_calls is defined %}{% for c in m.tool_calls %}"
    "[{{ c.function.name }}({{ c.function.arguments | tojson }})]{% endfor %}{% endif %}</{{ m.role }}>\n{% endfor %}"
)


def test_template_with_tools_gets_them_as_they_came(smollm2):
    tokenizer = Tokenizer(smollm2.backend, bos_token_id=smollm2.bos_token_id, eos_token_id=smollm2.eos_token_id,
                          chat_template=TOOL_TEMPLATE)
    assert tokenizer.supports_tools
    messages, tools = template_messages(HISTORY[:3], [WEATHER], "hermes", tokenizer.supports_tools)
    assert tools == [WEATHER]
    prompt = PromptTokens(tokenizer).render_chat(messages, tools)
    assert prompt.startswith("TOOLS:get_weather=" + json.dumps(WEATHER["function"]["parameters"]) + ";|")
    # Content None becomes "", and arguments reach the template as an object (written once by tojson).
    assert '<assistant>[get_weather({"city": "Paris"})][get_weather({"city": "Rome"})]</assistant>' in prompt
    assert '<tool>{"temp": 21}</tool>' in prompt
    assert tokenizer.encode_chat(messages, tools=tools) == tokenizer.encode(prompt)
    # No tools: the variable is undefined, as in transformers.
    assert tokenizer.apply_chat_template(HISTORY[:1]).startswith("NO TOOLS|")
    assert PromptTokens(tokenizer).render_chat(HISTORY[:1]).startswith("NO TOOLS|")


# ------------------------------------------------------------------------------ forcing grammars

FORCED_TOOLS = [
    _tool("book_trip", {"type": "object", "additionalProperties": False, "required": ["to", "nights"], "properties": {
        "to": {"type": "object", "additionalProperties": False, "required": ["city", "zip"], "properties": {
            "city": {"type": "string", "maxLength": 8}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
        "nights": {"type": "integer", "minimum": 1, "maximum": 14}}}),
    _tool("set_unit", {"type": "object", "additionalProperties": False, "required": ["unit"], "properties": {
        "unit": {"enum": ["celsius", "fahrenheit"]}}}),
    _tool("tag", {"type": "object", "additionalProperties": False, "required": ["tags"], "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "score": {"type": "number", "minimum": -1, "maximum": 1}}}),
    _tool("ping"),  # no parameters: an empty object
]
# A function without parameters takes none: its arguments are exactly {}.
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "maxProperties": 0})
           for t in FORCED_TOOLS}


@pytest.fixture(scope="module")
def ll_tokenizer(smollm2):
    return llguidance.LLTokenizer(smollm2.backend.to_str(), n_vocab=smollm2.vocab_size,
                                  eos_token=smollm2.eos_token_id)


def _matcher(ll_tokenizer, lark: str) -> llguidance.LLMatcher:
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer)
    assert not is_error, messages
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
    assert not matcher.is_error(), matcher.get_error()
    return matcher


def _generate(matcher, smollm2: Tokenizer, seed: int, max_steps: int) -> list[int]:
    """Random logits, masked by the grammar, argmax: the worst-behaved model the grammar
    must still hold to a call. Returns the token ids, without the end of sequence."""
    generator = torch.Generator().manual_seed(seed)
    bitmask = llg_torch.allocate_token_bitmask(1, smollm2.vocab_size)
    tokens = []
    for _ in range(max_steps):
        if matcher.is_stopped():
            break
        llg_torch.fill_next_token_bitmask(matcher, bitmask)
        logits = torch.randn(1, smollm2.vocab_size, generator=generator)
        llg_torch.apply_token_bitmask_inplace(logits, bitmask)
        token = int(logits.argmax())
        assert matcher.consume_token(token), matcher.get_error()
        if token == smollm2.eos_token_id:
            break
        tokens.append(token)
    assert matcher.is_stopped() and not matcher.is_error(), (matcher.get_error(), smollm2.decode(tokens))
    return tokens


FORCED_CHOICES = {  # name -> (family, tool_choice, parallel_tool_calls)
    "hermes-required-parallel": ("hermes", "required", True),
    "hermes-required-single": ("hermes", "required", False),
    "hermes-named": ("hermes", {"type": "function", "function": {"name": "book_trip"}}, True),
    "llama3-required-parallel": ("llama3", "required", True),
    "llama3-required-single": ("llama3", "required", False),
    "llama3-named": ("llama3", {"type": "function", "function": {"name": "tag"}}, False),
}


@pytest.fixture(scope="module")
def forced_outputs(smollm2, ll_tokenizer) -> dict[str, list[tuple[list[int], str]]]:
    """FORCED_CHOICES name -> (token ids, text) of four outputs its grammar admits (seeds 0-3)."""
    outputs = {}
    for choice, (family, tool_choice, parallel) in FORCED_CHOICES.items():
        lark = forced_tool_grammar(family, FORCED_TOOLS, tool_choice, parallel)
        runs = [_generate(_matcher(ll_tokenizer, lark), smollm2, seed, max_steps=1500) for seed in range(4)]
        outputs[choice] = [(tokens, smollm2.decode(tokens)) for tokens in runs]
    return outputs


@pytest.mark.parametrize("choice", FORCED_CHOICES)
def test_forced_grammar_admits_only_calls_of_the_tools(forced_outputs, choice):
    family, tool_choice, parallel = FORCED_CHOICES[choice]
    named = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
    counts = []
    for _, text in forced_outputs[choice]:
        content, calls = parse_tool_calls(family, text)
        assert content is None and calls, text
        for call in calls:
            assert call.name == named if named else call.name in SCHEMAS
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
            # Compact JSON: outside strings, whitespace only in the separators ", " and ": ".
            layout = re.sub(r'"(?:\\.|[^"\\])*"', '""', call.arguments).replace(", ", ",").replace(": ", ":")
            assert not re.search(r"\s", layout), call.arguments
        counts.append(len(calls))
        _check_against_parse(family, text, list(range(0, len(text), 3)))
    if named or not parallel:
        assert counts == [1] * len(counts)
    else:  # the model may go on after a call: these seeds do
        assert max(counts) > 1


def test_forced_grammar_refuses_other_text(ll_tokenizer, smollm2):
    named = forced_tool_grammar("hermes", FORCED_TOOLS, {"type": "function", "function": {"name": "ping"}}, True)
    ping, unit = format_calls("hermes", [("ping", "{}")]), format_calls("hermes", [("set_unit", '{"unit": "celsius"}')])
    matcher = _matcher(ll_tokenizer, named)
    assert matcher.consume_tokens(smollm2.encode(ping)) and matcher.is_accepting()
    # Plain text, another tool, a second call, arguments that are not an object.
    for text in ["Hello", unit, ping + "\n" + ping, format_calls("hermes", [("ping", "[1]")])]:
        tokens = smollm2.encode(text)
        assert _matcher(ll_tokenizer, named).try_consume_tokens(tokens) < len(tokens), text
    single = forced_tool_grammar("llama3", FORCED_TOOLS, "required", False)
    two = format_calls("llama3", [("ping", "{}"), ("ping", "{}")])
    assert _matcher(ll_tokenizer, single).try_consume_tokens(smollm2.encode(two)) < len(smollm2.encode(two))


def test_forced_grammar_only_for_required_or_named():
    for choice in ("auto", "none", None):
        assert forced_tool_grammar("hermes", [WEATHER], choice, True) is None
    with pytest.raises(ValueError, match="'nope'"):
        forced_tool_grammar("hermes", [WEATHER], {"type": "function", "function": {"name": "nope"}}, True)
    with pytest.raises(ValueError, match="at least one tool"):
        forced_tool_grammar("hermes", [], "required", True)


# ------------------------------------------------------------------------------ forced streaming

def _check_forced_stream(family: str, text: str, pieces: list[str]) -> list[list[str]]:
    """Feed `pieces`, which join to `text` (a complete forced output) or to a prefix of it
    (the output cut short), to a forced stream; check that after every piece exactly what
    has arrived went out: call i's start once its name is complete, and as much of its
    arguments as has arrived. Returns each call's argument pieces."""
    content, calls = parse_tool_calls(family, text)
    assert content is None and text == format_calls(family, _calls((content, calls)))
    spans = []  # per call: where its name ends, where its arguments start and end
    at = 0
    for call in calls:
        head, name = call_head(family, call.name), json.dumps(call.name)
        start = at + len(head)
        spans.append((at + head.index(name) + len(name), start, start + len(call.arguments)))
        at += len(format_calls(family, [(call.name, call.arguments)])) + len(CALL_FORMATS[family].separator)
    stream = ToolCallStream(family, forced=True)
    starts: list[ToolCallStart] = []
    arguments: list[list[str]] = [[] for _ in calls]
    received = 0
    for piece in pieces:
        received += len(piece)
        for event in stream.feed(piece):
            if isinstance(event, ToolCallStart):
                assert event.index == len(starts)
                starts.append(event)
            else:  # no content, and arguments only for the call last started
                assert isinstance(event, ArgumentsDelta) and event.text and event.index == len(starts) - 1
                arguments[event.index].append(event.text)
        assert [e.name for e in starts] == [call.name for call, span in zip(calls, spans) if span[0] <= received]
        assert ["".join(sent) for sent in arguments] == [
            call.arguments[:max(0, min(received, end) - start)] for call, (_, start, end) in zip(calls, spans)]
    assert stream.finish() == []  # complete or cut short, nothing is left to send
    ids = [e.id for e in starts]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids) and len(set(ids)) == len(ids)
    return arguments


def _family_outputs(forced_outputs, family: str) -> list[tuple[list[int], str]]:
    return [output for choice, outputs in forced_outputs.items() if FORCED_CHOICES[choice][0] == family
            for output in outputs]


@pytest.mark.parametrize("family", FAMILIES)
@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(data=st.data())
def test_forced_stream_sends_each_part_as_it_arrives(forced_outputs, family, data):
    """Outputs the forcing grammars admit (one call and several), whole or cut short
    anywhere (max_tokens), in pieces cut anywhere."""
    _, text = data.draw(st.sampled_from(_family_outputs(forced_outputs, family)))
    end = data.draw(st.one_of(st.just(len(text)), st.integers(0, len(text))))
    cuts = data.draw(st.lists(st.integers(0, end), max_size=12))
    _check_forced_stream(family, text, _pieces(text[:end], cuts))


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_stream_sends_arguments_token_by_token(forced_outputs, smollm2, family):
    """As the gateway streams: one detokenized piece per generated token."""
    several_calls, most_pieces = False, 0
    for tokens, text in _family_outputs(forced_outputs, family):
        detokenizer = IncrementalDetokenizer(smollm2)
        pieces = [detokenizer.push(token) for token in tokens] + [detokenizer.flush()]
        assert "".join(pieces) == text
        arguments = _check_forced_stream(family, text, pieces)
        several_calls |= len(arguments) > 1
        # Arguments longer than "{}" span several tokens, so they arrive in several pieces.
        assert all(len(sent) > 1 for sent in arguments if len("".join(sent)) > 2), arguments
        most_pieces = max(most_pieces, *map(len, arguments))
    assert several_calls  # parallel calls are among the outputs
    assert most_pieces > 5


def test_forced_stream_sends_the_name_then_the_arguments_as_they_come():
    stream = ToolCallStream("hermes", forced=True)
    assert stream.feed('<tool_call>\n{"name": "get_wea') == []  # the name may go on
    [start] = stream.feed('ther", "argu')
    assert (start.index, start.name) == (0, "get_weather")
    assert stream.feed('ments": {"city": "Pa') == [ArgumentsDelta(0, '{"city": "Pa')]
    assert stream.feed('ris"}}\n</tool') == [ArgumentsDelta(0, 'ris"}')]  # the call's "}" is not arguments
    assert stream.feed('_call>\n<tool_call>\n{"name": "ping", "arguments": {}') == [
        ToolCallStart(1, ANY, "ping"), ArgumentsDelta(1, "{}")]
    assert stream.finish() == []  # cut short before "}\n</tool_call>": what was sent stays sent

    llama = ToolCallStream("llama3", forced=True)
    assert llama.feed('{"name": "tag", "parameters": {"tags": ["}{\\"", "') == [
        ToolCallStart(0, ANY, "tag"), ArgumentsDelta(0, '{"tags": ["}{\\"", "')]  # brackets in strings
    assert llama.feed('a"]') == [ArgumentsDelta(0, 'a"]')]
    assert llama.finish() == []  # cut short inside the arguments: no error, nothing more
    with pytest.raises(RuntimeError):
        llama.feed("}")


@pytest.mark.parametrize(("family", "text"), [
    ("hermes", '<tool_call>{"name": "f", "parameters": {"x": "}\\"{"}}</tool_call>'),
    ("hermes", (' \n<tool_call> \n{ "name" :"f" ,\n"arguments":{ "a" : [ {} ] } }\n </tool_call>\n\n'
                '<tool_call>\n{"name": "g\\u00e9", "arguments": {}}\n</tool_call>\n')),
    ("llama3", '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "arguments": {}};\n'),
    ("llama3", ' {"name":"f","parameters":{"s": "\\\\", "t": [1, {"u": null}]}} ;{"name": "g", "parameters": {}}'),
])
def test_forced_stream_reads_the_whitespace_and_keys_the_parser_does(family, text):
    _check_against_parse(family, text, [], forced=True)
    _check_against_parse(family, text, list(range(len(text))), forced=True)


def test_forced_stream_stops_where_the_text_leaves_the_call_format():
    """Only a grammar not applied writes these; the events then end as for a cut."""
    stream = ToolCallStream("hermes", forced=True)
    assert stream.feed("Sure! <tool_call>") == []
    assert stream.feed('{"name": "f", "arguments": {}}</tool_call>') == []
    assert stream.finish() == []
    llama = ToolCallStream("llama3", forced=True)
    assert llama.feed('{"name": "f", "parameters": {"x": 1}} and {"name": "g", "parameters": {}}') == [
        ToolCallStart(0, ANY, "f"), ArgumentsDelta(0, '{"x": 1}')]
    assert llama.feed('; {"name": "h", "parameters": {}}') == []
    assert llama.finish() == []
    empty = ToolCallStream("llama3", forced=True)
    assert empty.feed('{"name": "", "parameters": {}}') == []  # the parser refuses an empty name


# ------------------------------------------------------------------------------ request checks

def test_check_tools_accepts_the_openai_shapes():
    check_tools(None, None)
    check_tools([], "none")
    check_tools([WEATHER, _tool("no-params_2")], "auto")
    check_tools([WEATHER], "required")
    check_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}})


@pytest.mark.parametrize(("tools", "tool_choice", "message"), [
    ([{"type": "retrieval"}], "auto", r"tools\[0\]\.type must be \"function\""),
    (["get_weather"], "auto", r"tools\[0\]\.type must be \"function\""),
    ([{"type": "function"}], "auto", r"tools\[0\]\.function must be an object"),
    ([{"type": "function", "function": {"description": "x"}}], "auto", r"tools\[0\]\.function\.name must be"),
    ([_tool("get weather")], "auto", r"function\.name must be 1 to 64 .*'get weather'"),
    ([_tool("x" * 65)], "auto", r"function\.name must be 1 to 64"),
    ([WEATHER, _tool("get_weather")], "auto", r"tools\[1\]\.function\.name 'get_weather' is also .*tools\[0\]"),
    ([_tool("f", {"type": "array"})], "auto", r"tools\[0\]\.function\.parameters must be the JSON schema of an object"),
    ([_tool("f", ["x"])], "auto", r"parameters must be the JSON schema of an object"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "auto", r"description must be a string"),
    ([WEATHER], "always", r"tool_choice must be \"auto\", \"none\", \"required\""),
    ([WEATHER], {"type": "function", "function": {}}, r"tool_choice must be"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, r"'nope', which is not among .*get_weather"),
    (None, "required", r"\"required\" needs at least one tool"),
    (None, {"type": "function", "function": {"name": "f"}}, r"'f', which is not among .*has no tools"),
])
def test_check_tools_names_the_problem(tools, tool_choice, message):
    with pytest.raises(ValueError, match=message):
        check_tools(tools, tool_choice)
