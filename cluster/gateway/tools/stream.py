"""Tool calls out of streamed text, as events.

    stream = ToolCallStream("hermes", forced=tool_choice_forces_a_call)
    for delta in text_deltas:
        events += stream.feed(delta)
    events += stream.finish()

Two ways of reading, one contract, for every output (forced: every output its grammar
admits) and every way of cutting it into deltas: the ContentDelta texts joined equal
`parse_tool_calls(family, text)`'s content ("" for None), and the calls come out in its
order, each as one ToolCallStart (index from 0, an id of the form "call_...", complete
name) before its ArgumentsDelta pieces, whose texts joined equal that call's `arguments`.

Unforced (`tool_choice` "auto"): content as soon as it is surely content, calls only at
`finish`. Parsing is all or nothing (a malformed call anywhere makes the whole output
content, `calls.py`), so no call is certain before the output ends. Nothing is emitted as
content that a later delta could turn into a call: text that may still begin one is held.

Forced (`tool_choice` "required" or a named function, the output constrained by
`forced_tool_grammar`): the output is calls by construction, so each ToolCallStart goes out
as soon as its name is complete and the arguments stream as they are written, each delta's
new argument text at once. Nothing needs holding back: a call's `arguments` is its object
exactly as written, up to the matching "}", and the closing syntax after it is read, never
sent. There is no content. An output cut short (max_tokens) ends the events where it ends:
what was sent stays sent, the incomplete call gets nothing more (its arguments are then a
prefix of an object), `finish` adds nothing and does not raise; the same holds for text the
grammar cannot produce, from the first character that leaves the call format on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Generator, Iterator
from itertools import count
from typing import NamedTuple

from pdserve.cluster.gateway.tools.calls import (
    HERMES_CLOSE,
    HERMES_OPEN,
    PYTHON_TAG,
    check_family,
    new_call_id,
    parse_tool_calls,
)


class ContentDelta(NamedTuple):
    text: str


class ToolCallStart(NamedTuple):
    index: int  # the call's position among the output's calls, from 0
    id: str
    name: str


class ArgumentsDelta(NamedTuple):
    index: int
    text: str


ToolEvent = ContentDelta | ToolCallStart | ArgumentsDelta


class ToolCallStream:
    """One output's text deltas -> events (module docstring). Not thread-safe; `feed` any
    number of times, then `finish` once. `forced`: the output is constrained by
    `forced_tool_grammar` (tool_choice "required" or a named function)."""

    def __init__(self, family: str, forced: bool = False) -> None:
        check_family(family)
        self._reader: _CallsAtFinish | _CallsAsWritten = (
            _CallsAsWritten(family) if forced else _CallsAtFinish(family))
        self._finished = False

    def feed(self, text: str) -> list[ToolEvent]:
        """Add the next piece of the output; return the events it makes certain."""
        if self._finished:
            raise RuntimeError("ToolCallStream.feed after finish")
        return self._reader.feed(text)

    def finish(self) -> list[ToolEvent]:
        """The output is complete (or cut short): the events still owed."""
        if self._finished:
            raise RuntimeError("ToolCallStream.finish called twice")
        self._finished = True
        return self._reader.finish()


class _CallsAtFinish:
    """Unforced outputs: content as it comes, calls from `parse_tool_calls` at the end."""

    def __init__(self, family: str) -> None:
        self._family = family
        self._text = ""
        # Invariant: text[:emitted] went out as content and is a prefix of the content
        # of every complete output that starts with text.
        self._emitted = 0
        # Hermes: where to look for the next "<tool_call>" (earlier text has none).
        self._searched = 0
        # Once a call may have begun, everything waits for `finish`.
        self._holding = False

    def feed(self, text: str) -> list[ToolEvent]:
        self._text += text
        if self._holding:
            return []
        safe = self._safe_hermes() if self._family == "hermes" else self._safe_llama3()
        return self._emit_up_to(safe)

    def finish(self) -> list[ToolEvent]:
        content, calls = parse_tool_calls(self._family, self._text)
        rest = (content or "")[self._emitted:]
        events: list[ToolEvent] = [ContentDelta(rest)] if rest else []
        for index, call in enumerate(calls):
            events += [ToolCallStart(index, call.id, call.name), ArgumentsDelta(index, call.arguments)]
        return events

    def _safe_hermes(self) -> int:
        """How much of the text is surely content: all of it up to the first "<tool_call>",
        or up to a tail that could still grow into one, less any whitespace just before
        (content before a call is right-stripped)."""
        text = self._text
        start = text.find(HERMES_OPEN, self._searched)
        if start >= 0:
            self._holding = True
            end = start
        else:
            end = len(text) - _partial_tag_length(text, HERMES_OPEN)
            self._searched = end
        while end > self._emitted and text[end - 1].isspace():
            end -= 1
        return end

    def _safe_llama3(self) -> int:
        """Llama 3 calls are the whole output: text whose first non-space character cannot
        start one is all content; text that can is all held."""
        head = self._text.lstrip()
        if head.startswith(("{", PYTHON_TAG)):
            self._holding = True
            return 0
        if not head or PYTHON_TAG.startswith(head):
            return 0
        return len(self._text)

    def _emit_up_to(self, end: int) -> list[ToolEvent]:
        if end <= self._emitted:
            return []
        piece, self._emitted = self._text[self._emitted:end], end
        return [ContentDelta(piece)]


def _partial_tag_length(text: str, tag: str) -> int:
    """The length of the longest tail of `text` that is a proper prefix of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


class _LeftTheFormat(Exception):
    """The text cannot continue into calls; under a forcing grammar it never happens."""


_REST_OF_STRING = re.compile(r'(?:[^"\\]|\\.)*"', re.DOTALL)  # after a JSON string's opening quote

_Reading = Generator[None, None, None]


class _CallsAsWritten:
    """Forced outputs: the calls' events as their text arrives.

    Reads the layout the forcing grammar writes (`CALL_FORMATS`): hermes
    `<tool_call> {"name": N, "arguments": ARGS} </tool_call>` per call, llama3
    `{"name": N, "parameters": ARGS}` joined by ";" (after an optional <|python_tag|>), with
    either arguments key and any whitespace the parser skips between the parts. The reader
    is a generator (`_read_calls`) that runs in `feed` until it has consumed all the text
    there is, so it reads like the format; its sub-readers wait by yielding.
    """

    def __init__(self, family: str) -> None:
        self._family = family
        self._text = ""
        self._at = 0  # text[:at] is read; the reader resumes there
        self._events: list[ToolEvent] = []  # made by the reader, handed out by `feed`
        self._reader: Iterator[None] | None = self._read_calls()  # None once the text left the format

    def feed(self, text: str) -> list[ToolEvent]:
        if self._reader is not None:
            self._text += text
            try:
                next(self._reader)
            except _LeftTheFormat:
                self._reader = None
        events, self._events = self._events, []
        return events

    def finish(self) -> list[ToolEvent]:
        return []  # `feed` sent all that is certain; a call cut short stays as it was sent

    def _read_calls(self) -> _Reading:
        """All the calls, one after another, never returning: the output's end is wherever
        the text stops arriving."""
        for index in count():
            yield from self._skip(str.isspace)
            if self._family == "hermes":
                yield from self._literal(HERMES_OPEN)
                yield from self._skip(str.isspace)
            elif index == 0:
                yield from self._literal(PYTHON_TAG, optional=True)
                yield from self._skip(str.isspace)
            else:
                yield from self._literal(";")
                yield from self._skip(str.isspace)
            yield from self._call(index)
            if self._family == "hermes":
                yield from self._skip(str.isspace)
                yield from self._literal(HERMES_CLOSE)

    def _call(self, index: int) -> _Reading:
        """{"name": N, "arguments": ARGS}: ToolCallStart once N is read, then ARGS as it comes."""
        yield from self._literal("{")
        yield from self._json_space()
        yield from self._literal('"name"')
        yield from self._json_space()
        yield from self._literal(":")
        yield from self._json_space()
        name = yield from self._name()
        self._events.append(ToolCallStart(index, new_call_id(), name))
        yield from self._json_space()
        yield from self._literal(",")
        yield from self._json_space()
        yield from self._literal('"arguments"', '"parameters"')
        yield from self._json_space()
        yield from self._literal(":")
        yield from self._json_space()
        yield from self._arguments(index)
        yield from self._json_space()
        yield from self._literal("}")

    def _name(self) -> Generator[None, None, str]:
        """A JSON string, whole, decoded; not empty (the parser refuses an empty name)."""
        start = self._at
        yield from self._literal('"')
        while (end := _REST_OF_STRING.match(self._text, self._at)) is None:
            yield
        self._at = end.end()
        try:
            name = json.loads(self._text[start:self._at])
        except ValueError as e:
            raise _LeftTheFormat(f"the call's name is not a JSON string: {e}") from e
        if not name:
            raise _LeftTheFormat("the call's name is empty")
        return name

    def _arguments(self, index: int) -> _Reading:
        """The arguments object up to its matching "}", as ArgumentsDelta pieces: each time
        the reader runs, all of it that has arrived."""
        sent = self._at
        yield from self._literal("{")
        depth, in_string, escaped = 1, False, False  # brackets open; inside a string; after a "\"
        while True:
            text, at = self._text, self._at
            while depth and at < len(text):
                char = text[at]
                at += 1
                if escaped:
                    escaped = False
                elif in_string and char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = not in_string
                elif not in_string and char in "{[":
                    depth += 1
                elif not in_string and char in "}]":
                    depth -= 1
            self._at = at
            if at > sent:
                self._events.append(ArgumentsDelta(index, text[sent:at]))
                sent = at
            if not depth:
                return
            yield

    def _json_space(self) -> _Reading:
        """Whitespace as the parser skips it inside a call object (outside: str.isspace)."""
        return self._skip(" \t\n\r".__contains__)

    def _skip(self, is_space: Callable[[str], bool]) -> _Reading:
        """Past the characters that are space, up to one that is not."""
        while True:
            while self._at < len(self._text) and is_space(self._text[self._at]):
                self._at += 1
            if self._at < len(self._text):
                return
            yield

    def _literal(self, *choices: str, optional: bool = False) -> _Reading:
        """Past one of `choices`, once the text shows which; `optional`: or past none of them."""
        while True:
            for choice in choices:
                if self._text.startswith(choice, self._at):
                    self._at += len(choice)
                    return
            rest = self._text[self._at:self._at + max(map(len, choices))]
            if not any(choice.startswith(rest) for choice in choices):  # no longer can become one
                if optional:
                    return
                raise _LeftTheFormat(f"expected {' or '.join(map(repr, choices))}, got {rest!r}")
            yield
