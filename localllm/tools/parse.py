"""A reply in a family's call format, parsed into its text and all of its calls.

:func:`parse_reply` reads a whole reply. :class:`ToolStream` reads one as it streams:
text is released as soon as it cannot be the start of a call (a partial marker is held
back), calls as OpenAI's incremental ``delta.tool_calls``: a call's index, id and name
once its head is written, then its arguments' JSON text as it grows. Arguments are kept
as the model wrote them, so the streamed fragments concatenate to the whole reply's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from localllm.tools.api import ToolCall, new_call_id

__all__ = ["CallPiece", "ParsedReply", "ToolStream", "parse_reply"]

_DECODER = json.JSONDecoder()
_PYTHON_TAG = "<|python_tag|>"
_RESPONSE_START = re.compile(r'\s*\{\s*"response"\s*:\s*"')
_CALLS_START = re.compile(r'\s*\{\s*"tool_calls"\s*:\s*\[')
# The head of a call object as the grammars write it: its name, then its arguments.
_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_SPACE = " \t\r\n"


@dataclass(frozen=True)
class _RawCall:
    name: str
    arguments: str  # the arguments' JSON text as the model wrote it (a prefix while partial)
    id: str | None = None


@dataclass(frozen=True)
class _Parsed:
    content: str
    calls: tuple[_RawCall, ...]
    partial: _RawCall | None = None  # the call being written (streams only)


@dataclass(frozen=True)
class ParsedReply:
    """A whole reply: its text (None when it is only calls) and its calls, in order."""

    content: str | None
    calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class CallPiece:
    """A streamed piece of call ``index``: its id and name first (once), then fragments of
    its arguments' JSON text, which concatenate to the call's ``arguments``."""

    index: int
    id: str | None
    name: str | None
    arguments: str


def _raw_arguments(text: str, start: int) -> str | None:
    """The arguments object starting at ``text[start]``, as written; None if unfinished."""
    try:
        value, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError:
        return None
    return text[start:end] if isinstance(value, dict) else None


def _call(obj: Any, text: str, pos: int) -> _RawCall | None:
    """A decoded call object found at ``text[pos]``, its arguments kept as written."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    call_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    head = _HEAD.match(text, pos)
    raw = _raw_arguments(text, head.end()) if head else None
    if raw is not None and json.loads(raw) == args:
        return _RawCall(obj["name"], raw, call_id)
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return _RawCall(obj["name"], json.dumps(args, ensure_ascii=False), call_id)


def _scan(text: str, pos: int, seps: str) -> tuple[list[_RawCall], int, _RawCall | None, bool]:
    """Call objects from ``text[pos]`` on, separated by ``seps``: the complete calls, where
    they end, the call still being written, and False if something else is in the way."""
    calls: list[_RawCall] = []
    while True:
        while pos < len(text) and text[pos] in seps:
            pos += 1
        if pos >= len(text) or text[pos] != "{":
            return calls, pos, None, True
        try:
            obj, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            head = _HEAD.match(text, pos)
            if head is None:
                return calls, pos, None, False
            name = json.loads(f'"{head.group(1)}"')
            args = _raw_arguments(text, head.end()) or text[head.end() :]
            return calls, pos, _RawCall(name, args), True
        call = _call(obj, text, pos)
        if call is None:
            return calls, pos, None, False
        calls.append(call)
        pos = end


def _held_back(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def _hermes(text: str, final: bool) -> _Parsed:
    content, calls, pos = [], [], 0
    while pos < len(text):
        start = text.find("<tool_call>", pos)
        if start < 0:
            rest = text[pos:]
            keep = 0 if final else _held_back(rest, "<tool_call>")
            content.append(rest[: len(rest) - keep])
            break
        content.append(text[pos:start])
        close = text.find("</tool_call>", start)
        inner_end = close if close >= 0 else len(text)
        found, end, partial, clean = _scan(text[:inner_end], start + len("<tool_call>"), _SPACE)
        if close < 0 and not final:
            return _Parsed("".join(content), (*calls, *found), partial)
        block_end = len(text) if close < 0 else close + len("</tool_call>")
        if clean and found and partial is None and end == inner_end:
            calls += found
        else:
            content.append(text[start:block_end])  # not a call: it stays text
        pos = block_end
    return _Parsed("".join(content), tuple(calls))


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
    calls, end, partial, clean = _scan(body, 0, _SPACE + ";")
    if not final:
        return _Parsed("", tuple(calls), partial)
    if not clean or partial is not None or not calls:
        return _Parsed(text, ())
    return _Parsed(body[end:], tuple(calls))


def _mistral(text: str, final: bool) -> _Parsed:
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        keep = 0 if final else _held_back(text, "[TOOL_CALLS]")
        return _Parsed(text[: len(text) - keep], ())
    pos = start + len("[TOOL_CALLS]")
    while pos < len(text) and text[pos] in _SPACE:
        pos += 1
    if pos < len(text) and text[pos] == "[":
        # The id follows the arguments: each call is shown once it is whole, id and all.
        calls, end, _partial, clean = _scan(text, pos + 1, _SPACE + ",")
        if clean and end < len(text) and text[end] == "]" and calls:
            return _Parsed(text[:start] + (text[end + 1 :] if final else ""), tuple(calls))
        if not final:
            return _Parsed(text[:start], tuple(calls))
    elif not final and pos >= len(text):
        return _Parsed(text[:start], ())
    return _Parsed(text, ())


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
    opened = _CALLS_START.match(text)
    if not final:
        if opened:
            calls, _end, partial, _clean = _scan(text, opened.end(), _SPACE + ",")
            return _Parsed("", tuple(calls), partial)
        match = _RESPONSE_START.match(text)
        return _Parsed(_partial_string(text[match.end() :])[0] if match else "", ())
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return _Parsed(text, ())
    if not isinstance(obj, dict):
        return _Parsed(text, ())
    items = obj.get("tool_calls", [])
    calls: list[_RawCall] = []
    if opened and isinstance(items, list):
        calls, _end, _partial, _clean = _scan(text, opened.end(), _SPACE + ",")
    if not isinstance(items, list) or len(calls) != len(items):
        return _Parsed(text, ())
    response = obj.get("response", "")
    content = response if isinstance(response, str) else json.dumps(response)
    return _Parsed(content, tuple(calls))


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
    """A reply's text deltas in; text to show and call pieces out."""

    def __init__(self, family: str) -> None:
        self._parse = _PARSERS[family]
        self._text = ""
        self._sent = ""
        self._calls: list[ToolCall] = []
        self._open: tuple[str, str] | None = None  # the call being sent: id, arguments sent

    @property
    def calls(self) -> tuple[ToolCall, ...]:
        return tuple(self._calls)

    def push(self, delta: str) -> tuple[str, list[CallPiece]]:
        self._text += delta
        return self._release(self._parse(self._text, False))

    def finish(self) -> tuple[str, list[CallPiece]]:
        return self._release(self._parse(self._text, True))

    def _piece(self, call: _RawCall) -> list[CallPiece]:
        """What call ``len(self._calls)`` adds: its head once, then its new arguments."""
        index, pieces = len(self._calls), []
        if self._open is None:
            self._open = (call.id or new_call_id(), "")
            pieces.append(CallPiece(index, self._open[0], call.name, ""))
        call_id, sent = self._open
        if call.arguments.startswith(sent) and len(call.arguments) > len(sent):
            pieces.append(CallPiece(index, None, None, call.arguments[len(sent) :]))
            self._open = (call_id, call.arguments)
        return pieces

    def _release(self, parsed: _Parsed) -> tuple[str, list[CallPiece]]:
        text = ""
        if parsed.content.startswith(self._sent):
            text, self._sent = parsed.content[len(self._sent) :], parsed.content
        pieces: list[CallPiece] = []
        for call in parsed.calls[len(self._calls) :]:
            pieces += self._piece(call)
            assert self._open is not None
            self._calls.append(ToolCall(self._open[0], call.name, call.arguments))
            self._open = None
        if parsed.partial is not None:
            pieces += self._piece(parsed.partial)
        return text, pieces
