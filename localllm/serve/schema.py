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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from localllm.generation import ChatMessage
from localllm.runtime.params import SamplingOptions

# Chat's sampling defaults, the one source serve's requests default to.
_CHAT = SamplingOptions()

__all__ = [
    "ApiError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "Sampling",
    "parse_chat_completion_request",
    "parse_completion_request",
    "parse_model_action",
]

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's legacy completions allow 0..5
ROLES = ("system", "user", "assistant")

_SAMPLING_KEYS = frozenset(
    {"temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty"}
    | {"frequency_penalty", "seed", "stop", "logit_bias", "ignore_eos"}
)
_COMMON_KEYS = _SAMPLING_KEYS | {"model", "stream", "stream_options", "max_tokens", "n", "user"}
_CHAT_KEYS = (
    _COMMON_KEYS
    | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
    | {"response_format"}
)
_COMPLETION_KEYS = _COMMON_KEYS | {"prompt", "logprobs", "echo", "best_of", "suffix"}


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI-style error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"invalid '{param}': {message}", param=param, code="invalid_value")


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
    messages: tuple[ChatMessage, ...]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    sampling: Sampling
    logprobs: bool
    top_logprobs: int
    response_format: str  # text | json_object | json_schema
    json_schema: dict[str, Any] | None


@dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompt: str | tuple[int, ...]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    sampling: Sampling
    logprobs: int | None


class _Fields:
    """Typed reads from a JSON object; ``None`` (or absence) returns the default."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data

    def get(self, name: str) -> Any:
        return self.data.get(name)

    def number(
        self, name: str, default: float, lo: float, hi: float, *, open_lo: bool = False
    ) -> float:
        value = self.data.get(name)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise _invalid(name, f"expected a number, got {json.dumps(value)[:40]}")
        if value < lo or value > hi or (open_lo and value == lo):
            low = f"> {lo}" if open_lo else f">= {lo}"
            rule = low if hi == math.inf else f"{low} and <= {hi}"
            raise _invalid(name, f"{value} must be {rule}")
        return float(value)

    def integer(self, name: str, default: int | None, lo: int, hi: int) -> int | None:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(name, f"expected an integer, got {json.dumps(value)[:40]}")
        if not lo <= value <= hi:
            raise _invalid(name, f"{value} must be between {lo} and {hi}")
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _invalid(name, f"expected true or false, got {json.dumps(value)[:40]}")
        return value

    def string(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is not None and not isinstance(value, str):
            raise _invalid(name, f"expected a string, got {json.dumps(value)[:40]}")
        return value


def _load_object(body: bytes, allowed: frozenset[str]) -> _Fields:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(data) - allowed)
    if unknown:
        name = unknown[0]
        raise ApiError(
            400,
            f"unsupported parameter '{name}': localllm does not implement it "
            f"(supported: {', '.join(sorted(allowed))})",
            param=name,
            code="unsupported_parameter",
        )
    return _Fields(data)


def _only(fields: _Fields, name: str, allowed: Any, what: str) -> None:
    """A parameter accepted only with the value that means 'the default behaviour'."""
    value = fields.get(name)
    if value is not None and value != allowed:
        raise ApiError(
            400,
            f"unsupported value for '{name}': {json.dumps(value)[:40]}; {what}",
            param=name,
            code="unsupported_value",
        )


def _stop(fields: _Fields) -> tuple[str, ...]:
    value = fields.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _invalid("stop", "expected a string or a list of strings")
    if len(items) > MAX_STOP_STRINGS:
        raise _invalid("stop", f"{len(items)} stop strings; at most {MAX_STOP_STRINGS}")
    if any(not s for s in items):
        raise _invalid("stop", "a stop string cannot be empty")
    return tuple(items)


def _logit_bias(fields: _Fields) -> tuple[tuple[int, float], ...]:
    value = fields.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _invalid("logit_bias", "expected an object mapping token ids to biases")
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise _invalid("logit_bias", f"key {key!r} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise _invalid("logit_bias", f"bias for token {key} must be a number in [-100, 100]")
        out.append((int(key), float(bias)))
    return tuple(out)


def _sampling(f: _Fields) -> Sampling:
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


def _common(f: _Fields) -> tuple[bool, bool]:
    """model/user/n checks shared by both endpoints; returns (stream, include_usage)."""
    f.string("model")
    f.string("user")
    _only(f, "n", 1, "one choice per request (send several requests; they run in parallel)")
    stream = f.boolean("stream")
    options = f.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _invalid("stream_options", "only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _invalid("stream_options", "only {'include_usage': bool} is supported")
        include_usage = _Fields(options).boolean("include_usage")
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


def _messages(value: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise ApiError(
            400,
            "'messages' must be a non-empty list of {role, content} objects",
            param="messages",
            code="missing_required_parameter" if value is None else "invalid_value",
        )
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise ApiError(
                400,
                f"messages[{i}].{extra[0]} is not supported (only role and content are)",
                param=f"messages[{i}].{extra[0]}",
                code="unsupported_parameter",
            )
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
        out.append(ChatMessage(role, _content(i, message.get("content"))))
    return tuple(out)


def _response_format(f: _Fields) -> tuple[str, dict[str, Any] | None]:
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
                raise _invalid("response_format", "json_schema takes name, schema, strict")
            return kind, spec["schema"]
        raise _invalid("response_format", "json_schema needs a 'schema' object")
    raise _invalid(
        "response_format",
        "use {'type': 'text'}, {'type': 'json_object'} or "
        "{'type': 'json_schema', 'json_schema': {'schema': {...}}}",
    )


def _max_tokens(f: _Fields, *names: str) -> int | None:
    values = {n: f.integer(n, None, 1, 1 << 30) for n in names}
    given = {v for v in values.values() if v is not None}
    if len(given) > 1:
        raise _invalid(names[-1], f"conflicts with {names[0]}; send one of them")
    return given.pop() if given else None


def parse_chat_completion_request(body: bytes) -> ChatCompletionRequest:
    """A ``POST /v1/chat/completions`` body, or ApiError(400) naming the bad field."""
    f = _load_object(body, frozenset(_CHAT_KEYS))
    stream, include_usage = _common(f)
    logprobs = f.boolean("logprobs")
    top = f.integer("top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise _invalid("top_logprobs", "only allowed with logprobs: true")
    fmt, schema = _response_format(f)
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
    f = _load_object(body, frozenset(_COMPLETION_KEYS))
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
    f = _load_object(body, frozenset({"model"}))
    name = f.string("model")
    if not name:
        raise ApiError(400, "'model' is required: the id of a served model", param="model")
    return name
