"""The grammar a tool-calling reply is sampled under (llama.cpp's GBNF).

Each tool's ``parameters`` schema becomes a rule (llama.cpp's JSON-schema converter, as
``response_format`` uses); around them each family's call syntax is written here. With
``required`` or a named function the grammar holds the whole reply, so every reply is a
call whose arguments match the schema. With ``auto`` the native families get a lazy
grammar: the text is free until the call marker appears (a trigger pattern), then the
call is constrained; the generic family's whole reply is its JSON envelope, a call or
``{"response": "..."}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from localllm.errors import InvalidArgument
from localllm.runtime.batch_llama import schema_rules
from localllm.tools.api import Tool, ToolChoice, ToolError

__all__ = ["ToolGrammar", "literal", "tool_grammar"]

# Where a call starts, per family, for the lazy grammar of `auto` (llama.cpp matches the
# pattern against the whole reply so far and constrains from its first group on).
TRIGGERS = {
    "hermes": (r"[\s\S]*?(<tool_call>)[\s\S]*",),
    "mistral": (r"[\s\S]*?(\[TOOL_CALLS\])[\s\S]*",),
    "llama3": (r"\s*(\{\s*\"name\")[\s\S]*", r"[\s\S]*?(<\|python_tag\|>)[\s\S]*"),
}
# The key each family writes the arguments under.
ARGUMENTS_KEY = {"hermes": "arguments", "mistral": "arguments", "llama3": "parameters"}


@dataclass(frozen=True)
class ToolGrammar:
    gbnf: str
    triggers: tuple[str, ...]  # empty: the grammar holds from the first token


def literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _key(name: str) -> str:
    """A JSON object key and its colon, with the converter's optional spaces."""
    return f'{literal(json.dumps(name))} space ":" space'


def _rules(tools: Sequence[Tool], extra: Sequence[tuple[str, dict]] = ()) -> str:
    schemas = [(f"args{i}", tool.parameters) for i, tool in enumerate(tools)]
    try:
        return schema_rules([*schemas, *extra])
    except InvalidArgument as exc:
        text = str(exc)
        for i, tool in enumerate(tools):
            if text.startswith(f"args{i}:"):
                raise ToolError(
                    f"tools[{i}].function.parameters",
                    f"the schema of {tool.name!r} {text.split(':', 1)[1].strip()}",
                ) from None
        raise


def _call_rules(family: str, tools: Sequence[Tool], offered: Sequence[int]) -> list[str]:
    """``call ::= call0 | call1 ...``: one JSON call object per offered tool."""
    key = ARGUMENTS_KEY.get(family, "arguments")
    rules = [f"call ::= {' | '.join(f'call{i}' for i in offered)}"]
    for i in offered:
        parts = [
            '"{" space',
            _key("name"),
            literal(json.dumps(tools[i].name)),
            'space "," space',
            _key(key),
            f"args{i}",
        ]
        if family == "mistral":
            parts += ['"," space', _key("id"), '"\\"" [a-zA-Z0-9]{9} "\\"" space']
        parts.append('"}" space')
        rules.append(f"call{i} ::= {' '.join(parts)}")
    return rules


def tool_grammar(
    family: str, tools: Sequence[Tool], choice: ToolChoice, parallel: bool
) -> ToolGrammar | None:
    """The grammar for this request (None for ``tool_choice: none``); ToolError names a
    tool whose schema the converter cannot take."""
    if choice.mode == "none" or not tools:
        return None
    offered = [i for i, t in enumerate(tools) if choice.name in (None, t.name)]
    many = parallel and choice.mode != "function"
    if family == "generic":
        rules = _rules(tools, [("response", {"type": "string"})])
        if many:
            calls = f'"{{" space {_key("tool_calls")} "[" space call ("," space call)* "]" space'
        else:
            calls = f'"{{" space {_key("tool_calls")} "[" space call "]" space'
        lines = [f'calls ::= {calls} "}}" space']
        lines.append(f'reply ::= "{{" space {_key("response")} response "}}" space')
        root = "calls" if choice.mode in ("required", "function") else "calls | reply"
        lines.append(f"root ::= {root}")
        body = "\n".join([*_call_rules(family, tools, offered), *lines])
        return ToolGrammar(f"{rules}\n{body}", ())
    rules = _rules(tools)
    if family == "hermes":
        one = '"<tool_call>" space call "</tool_call>" space'
        lines = [f"tc ::= {one}", f"root ::= {'tc+' if many else 'tc'}"]
    elif family == "mistral":
        more = '("," space call)*' if many else ""
        lines = [f'root ::= "[TOOL_CALLS]" space "[" space call {more} "]" space']
    else:  # llama3
        lines = [f'root ::= ("<|python_tag|>" space)? {"call+" if many else "call"}']
    body = "\n".join([*_call_rules(family, tools, offered), *lines])
    triggers = TRIGGERS[family] if choice.mode == "auto" else ()
    return ToolGrammar(f"{rules}\n{body}", triggers)
