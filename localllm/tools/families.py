"""Which tool-call format a chat template speaks, and the conversation it is given.

Detected from the template's text, first match wins (llama.cpp's handlers look for the
same markers):

- ``hermes``: the text writes ``<tool_call>`` (Qwen2.5, Hermes 2/3, SmolLM3...): calls are
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call;
- ``mistral``: the text writes ``[TOOL_CALLS]`` (Mistral Nemo, Mistral 7B v0.3...): calls are
  ``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "9 alphanumerics"}, ...]``;
- ``llama3``: a Llama 3.x header template that writes ``"parameters"`` for tools or
  ``<|python_tag|>``: calls are ``{"name": ..., "parameters": {...}}``;
- ``generic``: any other template (SmolLM2's among them). The tools are described in the
  system message and the whole reply is a JSON envelope, ``{"tool_calls": [...]}`` or
  ``{"response": "..."}``, as llama.cpp's generic handler.

Templates of the first three families render ``tools`` and tool history themselves;
for ``generic`` the history is written as that JSON (tool results as user messages).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from localllm.tools.api import Message, Tool, ToolCall, ToolChoice

__all__ = [
    "FAMILIES",
    "GENERIC_INSTRUCTION",
    "detect_family",
    "mistral_call_id",
    "template_conversation",
]

FAMILIES = ("hermes", "mistral", "llama3", "generic")
GENERIC_INSTRUCTION = (
    "Respond in JSON format, either with `tool_calls` (a request to call tools) or with "
    "`response` (a reply to the user's request)"
)
_MISTRAL_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def detect_family(template_text: str | None) -> str:
    """The tool-call family of a Jinja chat template's source (``generic`` for None)."""
    text = template_text or ""
    if "<tool_call>" in text:
        return "hermes"
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<|start_header_id|>" in text and ("<|python_tag|>" in text or '"parameters"' in text):
        return "llama3"
    return "generic"


def mistral_call_id(call_id: str) -> str:
    """Mistral's templates take 9-alphanumeric call ids only: others are mapped, stably."""
    if len(call_id) == 9 and call_id.isalnum() and call_id.isascii():
        return call_id
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(_MISTRAL_ID_CHARS[b % len(_MISTRAL_ID_CHARS)] for b in digest[:9])


def _native_call(family: str, call: ToolCall) -> dict[str, Any]:
    call_id = mistral_call_id(call.id) if family == "mistral" else call.id
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_value()},
    }


def _native_message(family: str, message: Message) -> dict[str, Any]:
    # Keys are added only when set: templates test `'tool_calls' in message`.
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [_native_call(family, c) for c in message.tool_calls]
    if message.tool_call_id is not None:
        call_id = message.tool_call_id
        out["tool_call_id"] = mistral_call_id(call_id) if family == "mistral" else call_id
    if message.name is not None:
        out["name"] = message.name
    return out


def _generic_message(message: Message, names: dict[str, str]) -> dict[str, Any]:
    if message.tool_calls:
        calls = [
            {"name": c.name, "arguments": c.arguments_value(), "id": c.id}
            for c in message.tool_calls
        ]
        body: dict[str, Any] = {"tool_calls": calls}
        if message.content:
            body = {"response": message.content, **body}
        return {"role": "assistant", "content": json.dumps(body, ensure_ascii=False)}
    if message.role == "assistant":
        return {"role": "assistant", "content": json.dumps({"response": message.content})}
    if message.role == "tool":
        result = {
            "tool": message.name or names.get(message.tool_call_id or "", ""),
            "tool_call_id": message.tool_call_id,
            "content": message.content,
        }
        return {"role": "user", "content": json.dumps({"tool_response": result})}
    return {"role": message.role, "content": message.content}


def _generic_system(tools: Sequence[Tool], choice: ToolChoice) -> str:
    if choice.mode == "none":
        return ""
    listed = json.dumps([t.as_openai() for t in tools], ensure_ascii=False)
    example = json.dumps(
        {"tool_calls": [{"name": "tool_name", "arguments": {"arg1": "some_value"}}]}
    )
    return (
        f"You can call any of the following tools to satisfy the user's requests: {listed}"
        f"\n\nExample tool call syntax:\n\n{example}\n\n{GENERIC_INSTRUCTION}"
    )


def template_conversation(
    family: str,
    messages: Sequence[Message],
    tools: Sequence[Tool],
    choice: ToolChoice,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and extra variables (``tools``) the chat template renders.

    With ``tool_choice: none`` the tools are not shown, so the model answers in text.
    """
    if family != "generic":
        shown = [t.as_openai() for t in tools] if tools and choice.mode != "none" else None
        return [_native_message(family, m) for m in messages], {"tools": shown}
    names = {c.id: c.name for m in messages for c in m.tool_calls}
    out = [_generic_message(m, names) for m in messages]
    if tools and choice.mode != "none":
        # The JSON envelope is what the grammar will hold the reply to; the previous
        # assistant turns in plain text are rewritten into it above.
        system = _generic_system(tools, choice)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    else:
        # No tools on offer: history turns stay readable text for the model.
        out = [_plain_message(m, names) for m in messages]
    return out, {"tools": None}


def _plain_message(message: Message, names: dict[str, str]) -> dict[str, Any]:
    if message.tool_calls:
        calls = ", ".join(f"{c.name}({c.arguments})" for c in message.tool_calls)
        text = f"{message.content}\n" if message.content else ""
        return {"role": "assistant", "content": f"{text}[called {calls}]"}
    if message.role == "tool":
        name = message.name or names.get(message.tool_call_id or "", "a tool")
        return {"role": "user", "content": f"[{name} returned] {message.content}"}
    return {"role": message.role, "content": message.content}
