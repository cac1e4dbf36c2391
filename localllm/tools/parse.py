"""A reply in a family's call format, parsed into its text and all of its calls.

:func:`parse_reply` reads a whole reply. :class:`ToolStream` reads one as it streams:
text is released as soon as it cannot be the start of a call (a partial marker is held
back), each call once it is complete, as OpenAI's incremental ``delta.tool_calls``
(the call's index, id and name, then its arguments).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from localllm.tools.spec import ToolCall, new_call_id

__all__ = ["CallPiece", "ParsedReply", "ToolStream", "parse_reply"]

_DECODER = json.JSONDecoder()
_MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}
_PYTHON_TAG = "<|python_tag|>"
_RESPONSE_START = re.compile(r'\s*\{\s*"response"\s*:\s*"')


@dataclass(frozen=True)
class _RawCall:
    name: str
    arguments: str
    id: str | None = None


@dataclass(frozen=True)
class _Parsed:
    content: str
    calls: tuple[_RawCall, ...]


@dataclass(frozen=True)
class ParsedReply:
    """A whole reply: its text (None when it is only calls) and its calls, in order."""

    content: str | None
    calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class CallPiece:
    """A streamed call: ``index`` in the reply, its id and name, its arguments' JSON."""

    index: int
    id: str
    name: str
    arguments: str


def _call(obj: Any, key: str) -> _RawCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    call_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    return _RawCall(obj["name"], json.dumps(args, ensure_ascii=False), call_id)


def _held_back(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def _hermes(text: str, final: bool) -> _Parsed:
    content, calls, pos = [], [], 0
    while True:
        start = text.find("<tool_call>", pos)
        if start < 0:
            rest = text[pos:]
            keep = 0 if final else _held_back(rest, "<tool_call>")
            content.append(rest[: len(rest) - keep])
            break
        content.append(text[pos:start])
        end = text.find("</tool_call>", start)
        if end < 0 and not final:
            break
        inner = text[start + len("<tool_call>") : end if end >= 0 else len(text)]
        try:
            call = _call(json.loads(inner), "arguments")
        except json.JSONDecodeError:
            call = None
        block_end = len(text) if end < 0 else end + len("</tool_call>")
        if call is None:
            content.append(text[start:block_end])
        else:
            calls.append(call)
        pos = block_end
        if pos >= len(text):
            break
    return _Parsed("".join(content), tuple(calls))


def _json_sequence(text: str, key: str) -> tuple[list[_RawCall], int] | None:
    """Consecutive JSON call objects at the start of ``text``; None if one is incomplete."""
    calls, pos = [], 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
        if pos >= len(text) or text[pos] != "{":
            return calls, pos
        try:
            obj, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        call = _call(obj, key)
        if call is None:
            return None
        calls.append(call)


def _llama3(text: str, final: bool) -> _Parsed:
    body = text.lstrip()
    tagged = body.startswith(_PYTHON_TAG)
    if tagged:
        body = body[len(_PYTHON_TAG) :]
    elif not final and _PYTHON_TAG.startswith(body):  # nothing yet, or a partial tag
        return _Parsed("", ())
    if not body.strip():
        return _Parsed("" if tagged or not final else text, ())
    if not body.lstrip().startswith("{"):
        return _Parsed(text, ())
    found = _json_sequence(body, "parameters")
    if found is None or not found[0]:
        return _Parsed(text if final else "", ())
    calls, end = found
    return _Parsed(body[end:] if final else "", tuple(calls))


def _mistral(text: str, final: bool) -> _Parsed:
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        keep = 0 if final else _held_back(text, "[TOOL_CALLS]")
        return _Parsed(text[: len(text) - keep], ())
    rest = text[start + len("[TOOL_CALLS]") :]
    try:
        items, end = _DECODER.raw_decode(rest.lstrip())
    except json.JSONDecodeError:
        return _Parsed(text if final else text[:start], ())
    items = items if isinstance(items, list) else [items]
    calls = [_call(item, "arguments") for item in items]
    if any(c is None for c in calls):
        return _Parsed(text if final else text[:start], ())
    tail = rest.lstrip()[end:] if final else ""
    return _Parsed(text[:start] + tail, tuple(c for c in calls if c is not None))


def _partial_string(text: str) -> tuple[str, bool]:
    """The decoded prefix of a JSON string body (after its opening quote), and whether
    the closing quote was reached; an unfinished escape is held back."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return "".join(out), True
        if ch == "\\":
            size = 6 if text[i + 1 : i + 2] == "u" else 2
            if i + size > len(text):
                break
            try:
                out.append(json.loads(f'"{text[i : i + size]}"'))
            except json.JSONDecodeError:
                out.append(text[i : i + size])
            i += size
            continue
        out.append(ch)
        i += 1
    return "".join(out), False


def _generic(text: str, final: bool) -> _Parsed:
    if not final:
        match = _RESPONSE_START.match(text)
        return _Parsed(_partial_string(text[match.end() :])[0] if match else "", ())
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return _Parsed(text, ())
    if not isinstance(obj, dict):
        return _Parsed(text, ())
    items = obj.get("tool_calls", [obj["tool_call"]] if "tool_call" in obj else [])
    calls = [_call(item, "arguments") for item in items] if isinstance(items, list) else [None]
    if any(c is None for c in calls):
        return _Parsed(text, ())
    response = obj.get("response", "")
    content = response if isinstance(response, str) else json.dumps(response)
    return _Parsed(content, tuple(c for c in calls if c is not None))


_PARSERS: dict[str, Callable[[str, bool], _Parsed]] = {
    "hermes": _hermes,
    "mistral": _mistral,
    "llama3": _llama3,
    "generic": _generic,
}


def _finish(call: _RawCall) -> ToolCall:
    return ToolCall(call.id or new_call_id(), call.name, call.arguments)


def parse_reply(family: str, text: str) -> ParsedReply:
    """The text and calls of a whole reply in ``family``'s format."""
    parsed = _PARSERS[family](text, True)
    content = parsed.content.strip() if parsed.calls else parsed.content
    return ParsedReply(content or None, tuple(_finish(c) for c in parsed.calls))


class ToolStream:
    """A reply's text deltas in, text to show and completed calls out."""

    def __init__(self, family: str) -> None:
        self._parse = _PARSERS[family]
        self._text = ""
        self._sent = ""
        self._calls: list[ToolCall] = []

    @property
    def calls(self) -> tuple[ToolCall, ...]:
        return tuple(self._calls)

    def push(self, delta: str) -> tuple[str, list[CallPiece]]:
        self._text += delta
        return self._release(self._parse(self._text, False))

    def finish(self) -> tuple[str, list[CallPiece]]:
        return self._release(self._parse(self._text, True))

    def _release(self, parsed: _Parsed) -> tuple[str, list[CallPiece]]:
        text = ""
        if parsed.content.startswith(self._sent):
            text, self._sent = parsed.content[len(self._sent) :], parsed.content
        pieces = []
        for call in parsed.calls[len(self._calls) :]:
            done = _finish(call)
            pieces.append(CallPiece(len(self._calls), done.id, done.name, done.arguments))
            self._calls.append(done)
        return text, pieces
