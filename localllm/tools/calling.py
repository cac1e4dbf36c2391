"""One request's tool calling, put together: the family, what the template renders,
the grammar, and whether the reply is read for calls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from localllm.tools.api import Message, Tool, ToolChoice
from localllm.tools.families import detect_family, template_conversation
from localllm.tools.grammar import ToolGrammar, tool_grammar

__all__ = ["ToolSetup", "needs_tools", "prepare_tools"]


@dataclass(frozen=True)
class ToolSetup:
    family: str
    messages: list[dict[str, Any]] = field(hash=False)
    extra: dict[str, Any] = field(hash=False)  # further template variables (tools)
    grammar: ToolGrammar | None
    parse_calls: bool  # read the reply for calls (not with tool_choice none)


def needs_tools(messages: Sequence[Message], tools: Sequence[Tool]) -> bool:
    """Whether a request goes through tool calling: tools given, or tool turns in history."""
    return bool(tools) or any(m.tool_calls or m.role == "tool" for m in messages)


def prepare_tools(
    template_text: str | None,
    messages: Sequence[Message],
    tools: Sequence[Tool],
    choice: ToolChoice,
    parallel: bool,
) -> ToolSetup:
    """Detect the family from the template and prepare the request (ToolError: a tool's
    schema the grammar builder cannot take)."""
    family = detect_family(template_text)
    rendered, extra = template_conversation(family, messages, tools, choice)
    grammar = tool_grammar(family, tools, choice, parallel)
    return ToolSetup(family, rendered, extra, grammar, grammar is not None)
