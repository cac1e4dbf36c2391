"""Request bodies of the OpenAI API, checked field by field: nothing is silently ignored.

Every key a request sends is either implemented or refused with a 400 that names it. The
values common clients always send are accepted: ``n: 1``, ``user``, ``stream_options``
with ``include_usage``; an explicit ``null`` means "not given" for every optional field.
Sampling defaults are ``localllm chat``'s, so a request and a chat with the same flags
sample the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from localllm.runtime.params import SamplingOptions
from localllm.serve.fields import ApiError, Fields, invalid, load_object
from localllm.tools.api import (
    Message,
    Tool,
    ToolChoice,
    ToolError,
    parse_tool_calls,
    parse_tool_choice,
    parse_tools,
)

# Chat's sampling defaults, the one source serve's requests default to.
_CHAT = SamplingOptions()
NO_TOOLS = ToolChoice("none")

__all__ = [
    "ApiError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "Fields",
    "Sampling",
    "invalid",
    "load_object",
    "parse_chat_completion_request",
    "parse_completion_request",
    "parse_model_action",
]

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's legacy completions allow 0..5
ROLES = ("system", "user", "assistant", "tool")

_SAMPLING_KEYS = frozenset(
    {"temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty"}
    | {"frequency_penalty", "seed", "stop", "logit_bias", "ignore_eos"}
)
_COMMON_KEYS = _SAMPLING_KEYS | {"model", "stream", "stream_options", "max_tokens", "n", "user"}
_CHAT_KEYS = (
    _COMMON_KEYS
    | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
    | {"response_format", "tools", "tool_choice", "parallel_tool_calls"}
)
_COMPLETION_KEYS = _COMMON_KEYS | {"prompt", "logprobs", "echo", "best_of", "suffix"}


@dataclass(frozen=True)
class Sampling:
    """The sampling fields shared by both endpoints, with chat's defaults."""

    temperature: float = _CHAT.temperature
    top_p: float = _CHAT.top_p
    top_k: int = _CHAT.top_k
    min_p: float = _CHAT.min_p
    repeat_penalty: float = _CHAT.repeat_penalty
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class ChatCompletionRequest:
    model: str | None
    messages: tuple[Message, ...]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    sampling: Sampling
    logprobs: bool
    top_logprobs: int
    response_format: str  # text | json_object | json_schema
    json_schema: dict[str, Any] | None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = NO_TOOLS
    parallel_tool_calls: bool = False


@dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompt: str | tuple[int, ...]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    sampling: Sampling
    logprobs: int | None


def _only(fields: Fields, name: str, allowed: Any, what: str) -> None:
    """A parameter accepted only with the value that means 'the default behaviour'."""
    value = fields.get(name)
    if value is not None and value != allowed:
        raise ApiError(
            400,
            f"unsupported value for '{name}': {json.dumps(value)[:40]}; {what}",
            param=name,
            code="unsupported_value",
        )


def _stop(fields: Fields) -> tuple[str, ...]:
    value = fields.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid("stop", "expected a string or a list of strings")
    if len(items) > MAX_STOP_STRINGS:
        raise invalid("stop", f"{len(items)} stop strings; at most {MAX_STOP_STRINGS}")
    if any(not s for s in items):
        raise invalid("stop", "a stop string cannot be empty")
    return tuple(items)


def _logit_bias(fields: Fields) -> tuple[tuple[int, float], ...]:
    value = fields.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise invalid("logit_bias", "expected an object mapping token ids to biases")
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise invalid("logit_bias", f"key {key!r} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise invalid("logit_bias", f"bias for token {key} must be a number in [-100, 100]")
        out.append((int(key), float(bias)))
    return tuple(out)


def _sampling(f: Fields) -> Sampling:
    return Sampling(
        temperature=f.number("temperature", 0.8, 0.0, math.inf),
        top_p=f.number("top_p", 0.95, 0.0, 1.0, open_lo=True),
        top_k=f.integer("top_k", 40, 0, 1 << 30) or 0,
        min_p=f.number("min_p", 0.05, 0.0, 1.0),
        repeat_penalty=f.number("repeat_penalty", 1.0, 0.0, math.inf, open_lo=True),
        presence_penalty=f.number("presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=f.number("frequency_penalty", 0.0, -2.0, 2.0),
        # 0xFFFFFFFF is llama.cpp's "random seed": refused rather than silently random.
        seed=f.integer("seed", None, 0, 0xFFFFFFFE),
        stop=_stop(f),
        logit_bias=_logit_bias(f),
        ignore_eos=f.boolean("ignore_eos"),
    )


def _common(f: Fields) -> tuple[bool, bool]:
    """model/user/n checks shared by both endpoints; returns (stream, include_usage)."""
    f.string("model")
    f.string("user")
    _only(f, "n", 1, "one choice per request (send several requests; they run in parallel)")
    stream = f.boolean("stream")
    options = f.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options", "only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("stream_options", "only {'include_usage': bool} is supported")
        include_usage = Fields(options).boolean("include_usage")
    return stream, include_usage


def _content(index: int, content: Any) -> str:
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if (
                kind != "text"
                or not isinstance(part.get("text"), str)
                or set(part)
                - {
                    "type",
                    "text",
                }
            ):
                raise ApiError(
                    400,
                    f"{where}[{j}] of type {kind!r} is not supported: this server reads text only",
                    param=f"{where}[{j}]",
                    code="unsupported_value",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"{where} must be a string or a list of text parts", param=where)


_MESSAGE_KEYS = {
    "system": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "tool_calls"},
    "tool": {"role", "content", "tool_call_id", "name"},
}


def _message(i: int, message: Any) -> Message:
    if not isinstance(message, dict):
        raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
    role = message.get("role")
    if role not in ROLES:
        hint = "; use 'system'" if role == "developer" else ""
        raise ApiError(
            400,
            f"messages[{i}].role {json.dumps(role)[:40]} is not supported: "
            f"use one of {', '.join(ROLES)}{hint}",
            param=f"messages[{i}].role",
            code="invalid_value",
        )
    allowed = _MESSAGE_KEYS[role]
    extra = sorted(set(message) - allowed)
    if extra:
        raise ApiError(
            400,
            f"messages[{i}].{extra[0]} is not supported in a {role} message "
            f"(only {', '.join(sorted(allowed))})",
            param=f"messages[{i}].{extra[0]}",
            code="unsupported_parameter",
        )
    name = Fields(message).string("name")
    calls = ()
    if message.get("tool_calls") is not None:
        calls = parse_tool_calls(f"messages[{i}].tool_calls", message["tool_calls"])
    content = message.get("content")
    if content is None and calls:
        content = ""  # an assistant turn that only called tools
    tool_call_id = None
    if role == "tool":
        tool_call_id = message.get("tool_call_id")
        if not isinstance(tool_call_id, str) or not tool_call_id:
            raise invalid(f"messages[{i}].tool_call_id", "a tool message needs the call's id")
    return Message(role, _content(i, content), calls, tool_call_id, name)


def _messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise ApiError(
            400,
            "'messages' must be a non-empty list of {role, content} objects",
            param="messages",
            code="missing_required_parameter" if value is None else "invalid_value",
        )
    try:
        return tuple(_message(i, message) for i, message in enumerate(value))
    except ToolError as exc:
        raise ApiError(400, str(exc), param=exc.param, code="invalid_value") from None


def _tools(f: Fields) -> tuple[tuple[Tool, ...], ToolChoice, bool]:
    try:
        tools = parse_tools(f.get("tools"))
        choice = parse_tool_choice(f.get("tool_choice"), tools)
    except ToolError as exc:
        raise ApiError(400, str(exc), param=exc.param, code="invalid_value") from None
    # llama-server's default, not OpenAI's: asked for "one or more" calls, small models
    # repeat calls until max_tokens; a client that wants several says so.
    parallel = f.boolean("parallel_tool_calls", False)
    return tools, choice, parallel


def _response_format(f: Fields) -> tuple[str, dict[str, Any] | None]:
    value = f.get("response_format")
    if value is None:
        return "text", None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object") and set(value) == {"type"}:
        return kind, None
    if kind == "json_schema" and set(value) == {"type", "json_schema"}:
        spec = value["json_schema"]
        if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            if set(spec) - {"name", "schema", "strict", "description"}:
                raise invalid("response_format", "json_schema takes name, schema, strict")
            return kind, spec["schema"]
        raise invalid("response_format", "json_schema needs a 'schema' object")
    raise invalid(
        "response_format",
        "use {'type': 'text'}, {'type': 'json_object'} or "
        "{'type': 'json_schema', 'json_schema': {'schema': {...}}}",
    )


def _max_tokens(f: Fields, *names: str) -> int | None:
    values = {n: f.integer(n, None, 1, 1 << 30) for n in names}
    given = {v for v in values.values() if v is not None}
    if len(given) > 1:
        raise invalid(names[-1], f"conflicts with {names[0]}; send one of them")
    return given.pop() if given else None


def parse_chat_completion_request(body: bytes) -> ChatCompletionRequest:
    """A ``POST /v1/chat/completions`` body, or ApiError(400) naming the bad field."""
    f = load_object(body, frozenset(_CHAT_KEYS))
    stream, include_usage = _common(f)
    logprobs = f.boolean("logprobs")
    top = f.integer("top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise invalid("top_logprobs", "only allowed with logprobs: true")
    fmt, schema = _response_format(f)
    tools, choice, parallel = _tools(f)
    if fmt != "text" and choice.mode != "none":
        raise invalid(
            "response_format",
            "cannot be combined with tools unless tool_choice is 'none' "
            "(a tool call's arguments already follow the tool's schema)",
        )
    return ChatCompletionRequest(
        model=f.string("model"),
        messages=_messages(f.get("messages")),
        stream=stream,
        include_usage=include_usage,
        max_tokens=_max_tokens(f, "max_tokens", "max_completion_tokens"),
        sampling=_sampling(f),
        logprobs=logprobs,
        top_logprobs=top or 0,
        response_format=fmt,
        json_schema=schema,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
    )


def _prompt(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        return tuple(value)
    if isinstance(value, list) and len(value) > 1:
        raise ApiError(
            400,
            "several prompts in one request are not supported; send one request per prompt "
            "(they run in parallel)",
            param="prompt",
            code="unsupported_value",
        )
    raise ApiError(
        400,
        "'prompt' must be a string or a list of token ids",
        param="prompt",
        code="missing_required_parameter" if value is None else "invalid_value",
    )


def parse_completion_request(body: bytes) -> CompletionRequest:
    """A ``POST /v1/completions`` body, or ApiError(400) naming the bad field."""
    f = load_object(body, frozenset(_COMPLETION_KEYS))
    stream, include_usage = _common(f)
    _only(f, "echo", False, "the prompt is not repeated in the reply")
    _only(f, "best_of", 1, "one candidate per request")
    _only(f, "suffix", "", "fill-in-the-middle is not supported")
    return CompletionRequest(
        model=f.string("model"),
        prompt=_prompt(f.get("prompt")),
        stream=stream,
        include_usage=include_usage,
        max_tokens=_max_tokens(f, "max_tokens"),
        sampling=_sampling(f),
        logprobs=f.integer("logprobs", None, 0, MAX_COMPLETION_LOGPROBS),
    )


def parse_model_action(body: bytes) -> str:
    """A ``POST /models/load`` or ``/models/unload`` body: ``{"model": NAME}``."""
    f = load_object(body, frozenset({"model"}))
    name = f.string("model")
    if not name:
        raise ApiError(400, "'model' is required: the id of a served model", param="model")
    return name
