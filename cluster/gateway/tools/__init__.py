"""OpenAI tool calling for the chat API, as functions the HTTP layer calls:

    check_tools(tools, tool_choice)                       validate the request, once
    family = family_for(tokenizer.chat_template, flag)    the call format the model writes
    messages, tools = template_messages(messages, tools, family, tokenizer.supports_tools)
    prompt = prompt_tokens.render_chat(messages, tools)
    grammar = forced_tool_grammar(family, tools, tool_choice, parallel_tool_calls)
                                                          Lark text for "required"/named, else None
    content, calls = parse_tool_calls(family, output)     complete outputs
    events = ToolCallStream(family, forced).feed(delta) ...
                                                          streamed outputs, same result; with
                                                          forced (a forcing grammar applied) the
                                                          calls stream as they are written

Nothing here holds state between requests; a ToolCallStream belongs to one output.
"""

from pdserve.cluster.gateway.tools.calls import FAMILIES, ToolCall, parse_tool_calls
from pdserve.cluster.gateway.tools.checks import check_tools
from pdserve.cluster.gateway.tools.grammar import forced_tool_grammar
from pdserve.cluster.gateway.tools.prompt import family_for, template_messages
from pdserve.cluster.gateway.tools.stream import (
    ArgumentsDelta,
    ContentDelta,
    ToolCallStart,
    ToolCallStream,
    ToolEvent,
)

__all__ = [
    "FAMILIES", "ArgumentsDelta", "ContentDelta", "ToolCall", "ToolCallStart", "ToolCallStream", "ToolEvent",
    "check_tools", "family_for", "forced_tool_grammar", "parse_tool_calls", "template_messages",
]
