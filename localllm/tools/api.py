"""OpenAI's tool-calling values, checked: the tools, the tool choice, calls, history messages.

Every check raises :class:`ToolError` naming the bad field (``tools[1].function.name``),
which serve turns into a 400.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from localllm.errors import InvalidArgument
from localllm.generation import ChatMessage

__all__ = [
    "CHOICES",
    "Message",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolError",
    "new_call_id",
    "parse_tool_calls",
    "parse_tool_choice",
    "parse_tools",
]

CHOICES = ("auto", "none", "required")
# OpenAI's rule for function names; it also keeps them safe inside grammars and JSON.
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolError(InvalidArgument):
    """A tool-calling field a request got wrong; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"invalid '{param}': {message}")
        self.param = param


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, description and JSON-schema parameters."""

    name: str
    description: str | None
    parameters: dict[str, Any] = field(hash=False)

    def as_openai(self) -> dict[str, Any]:
        """The tool as a template receives it (OpenAI's request shape)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """``auto``, ``none``, ``required``, or ``function`` with the one ``name`` to call."""

    mode: str
    name: str | None = None


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: ``arguments`` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def arguments_value(self) -> Any:
        """The arguments as a value (templates write them with ``tojson``)."""
        try:
            return json.loads(self.arguments)
        except json.JSONDecodeError:
            return self.arguments


@dataclass(frozen=True)
class Message(ChatMessage):
    """A chat message with OpenAI's tool fields: an assistant's ``tool_calls``, or a
    ``tool`` message's ``tool_call_id`` (and the function ``name``)."""

    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _tool(index: int, value: Any) -> Tool:
    where = f"tools[{index}]"
    if not isinstance(value, dict) or value.get("type") != "function":
        got = value.get("type") if isinstance(value, dict) else type(value).__name__
        raise ToolError(f"{where}.type", f"{json.dumps(got)[:40]}: only 'function' tools exist")
    if set(value) - {"type", "function"}:
        extra = sorted(set(value) - {"type", "function"})[0]
        raise ToolError(f"{where}.{extra}", "not a field of a tool (type, function)")
    function = value.get("function")
    if not isinstance(function, dict):
        raise ToolError(f"{where}.function", "expected an object with name and parameters")
    extra_keys = sorted(set(function) - _FUNCTION_KEYS)
    if extra_keys:
        raise ToolError(
            f"{where}.function.{extra_keys[0]}",
            f"not supported (a function has {', '.join(sorted(_FUNCTION_KEYS))})",
        )
    name = function.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ToolError(
            f"{where}.function.name",
            f"{json.dumps(name)[:70]} must be 1-64 letters, digits, '_' or '-'",
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ToolError(f"{where}.function.description", "expected a string")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ToolError(f"{where}.function.strict", "expected true or false")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = dict(EMPTY_PARAMETERS)
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ToolError(
            f"{where}.function.parameters",
            "must be a JSON schema of type 'object' (the arguments are a JSON object)",
        )
    return Tool(name, description, parameters)


def parse_tools(value: Any) -> tuple[Tool, ...]:
    """The request's ``tools``: a non-empty list of functions with distinct names."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise ToolError("tools", "expected a non-empty list of {type: function, function}")
    tools = tuple(_tool(i, item) for i, item in enumerate(value))
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        if tool.name in seen:
            raise ToolError(
                f"tools[{i}].function.name",
                f"{tool.name!r} is already tools[{seen[tool.name]}]; names must be unique",
            )
        seen[tool.name] = i
    return tools


def parse_tool_choice(value: Any, tools: tuple[Tool, ...]) -> ToolChoice:
    """``tool_choice``: auto (the default with tools), none (the default without), required,
    or {type: function, function: {name}} naming one of the tools."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in CHOICES:
            raise ToolError("tool_choice", f"{value[:40]!r}: use one of {', '.join(CHOICES)}")
        choice = ToolChoice(value)
    elif (
        isinstance(value, dict)
        and value.get("type") == "function"
        and set(value) == {"type", "function"}
        and isinstance(value["function"], dict)
        and set(value["function"]) == {"name"}
        and isinstance(value["function"]["name"], str)
    ):
        choice = ToolChoice("function", value["function"]["name"])
    else:
        raise ToolError(
            "tool_choice",
            "use 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}",
        )
    if choice.mode in ("required", "function") and not tools:
        raise ToolError("tool_choice", f"{choice.mode!r} needs 'tools'")
    if choice.name is not None and choice.name not in {t.name for t in tools}:
        known = ", ".join(t.name for t in tools)
        raise ToolError("tool_choice", f"no tool is named {choice.name[:64]!r} (tools: {known})")
    return choice


def parse_tool_calls(where: str, value: Any) -> tuple[ToolCall, ...]:
    """An assistant history message's ``tool_calls``."""
    if not isinstance(value, list):
        raise ToolError(where, "expected a list of tool calls")
    calls = []
    for j, item in enumerate(value):
        at = f"{where}[{j}]"
        if (
            not isinstance(item, Mapping)
            or item.get("type", "function") != "function"
            or set(item) - {"id", "type", "function"}
        ):
            raise ToolError(at, "expected {id, type: 'function', function: {name, arguments}}")
        function = item.get("function")
        if not isinstance(function, Mapping) or set(function) - {"name", "arguments"}:
            raise ToolError(f"{at}.function", "expected {name, arguments}")
        name, arguments = function.get("name"), function.get("arguments", "{}")
        if not isinstance(name, str) or not name:
            raise ToolError(f"{at}.function.name", "expected a function name")
        if not isinstance(arguments, str):
            raise ToolError(f"{at}.function.arguments", "expected a JSON string")
        call_id = item.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ToolError(f"{at}.id", "expected a string")
        calls.append(ToolCall(call_id or new_call_id(), name, arguments))
    return tuple(calls)
