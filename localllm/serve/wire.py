"""The JSON the OpenAI API answers with, built from the engine's records."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

from localllm.runtime.batch_records import GenerationDone, TokenLogprob
from localllm.tools.parse import CallPiece, ParsedReply

__all__ = [
    "chat_chunk",
    "chat_logprobs",
    "chat_response",
    "completion_chunk",
    "completion_logprobs",
    "completion_response",
    "finish_reason",
    "new_id",
    "timings",
    "tool_deltas",
    "usage",
]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(done: GenerationDone) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def timings(done: GenerationDone) -> dict[str, Any]:
    """llama-server's extra ``timings`` object (clients that do not know it ignore it)."""
    out = {
        "queued_ms": round(done.queued_seconds * 1000, 3),
        "prompt_n": done.prompt_tokens - done.cached_tokens,
        "cached_n": done.cached_tokens,
        "prompt_ms": round(done.prompt_seconds * 1000, 3),
        "predicted_n": done.completion_tokens,
        "predicted_ms": round(done.generation_seconds * 1000, 3),
        "predicted_per_second": round(done.generation_tps, 3),
        "slot": done.slot,
    }
    if done.draft_n > 0:  # llama-server adds these only when something was drafted
        out["draft_n"] = done.draft_n
        out["draft_n_accepted"] = done.draft_n_accepted
    return out


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": _text(e.piece),
                "logprob": e.logprob,
                "bytes": list(e.piece),
                "top_logprobs": [
                    {"token": _text(t.piece), "logprob": t.logprob, "bytes": list(t.piece)}
                    for t in e.top
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions shape; ``offset`` is the reply's length before these tokens."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(_text(e.piece))
    return {
        "tokens": [_text(e.piece) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{_text(t.piece): t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


def _envelope(rid: str, kind: str, model: str, created: int | None) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": created or int(time.time()), "model": model}


def finish_reason(done: GenerationDone, called: bool) -> str:
    """``tool_calls`` when the reply made calls and ended by itself."""
    return "tool_calls" if called and done.finish_reason == "stop" else done.finish_reason


def _tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def chat_response(
    rid: str,
    model: str,
    done: GenerationDone,
    logprobs: dict[str, Any] | None,
    parsed: ParsedReply | None = None,
) -> dict[str, Any]:
    """``parsed``: the reply read for tool calls (None: the text as it is)."""
    message: dict[str, Any] = {"role": "assistant", "content": done.text, "refusal": None}
    finish = done.finish_reason
    if parsed is not None:
        message["content"] = parsed.content
        if parsed.calls:
            message["tool_calls"] = [_tool_call(c.id, c.name, c.arguments) for c in parsed.calls]
        finish = finish_reason(done, bool(parsed.calls))
    return {
        **_envelope(rid, "chat.completion", model, None),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        ],
        "usage": usage(done),
        "timings": timings(done),
    }


def chat_chunk(
    rid: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        **_envelope(rid, "chat.completion.chunk", model, created),
        "choices": [
            {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }


def tool_deltas(
    text: str, calls: Sequence[CallPiece], always: bool = False
) -> list[dict[str, Any]]:
    """Stream deltas for released text and call pieces, as OpenAI streams calls: the
    index, id and name first, then argument fragments (``always``: a delta even when
    there is nothing, to carry logprobs)."""
    out: list[dict[str, Any]] = [{"content": text}] if text or always else []
    for c in calls:
        if c.id is not None:
            head = _tool_call(c.id, c.name or "", c.arguments)
            out.append({"tool_calls": [{"index": c.index, **head}]})
        else:
            out.append({"tool_calls": [{"index": c.index, "function": {"arguments": c.arguments}}]})
    return out


def completion_response(
    rid: str, model: str, done: GenerationDone, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        **_envelope(rid, "text_completion", model, None),
        "choices": [
            {
                "index": 0,
                "text": done.text,
                "logprobs": logprobs,
                "finish_reason": done.finish_reason,
            }
        ],
        "usage": usage(done),
        "timings": timings(done),
    }


def completion_chunk(
    rid: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        **_envelope(rid, "text_completion", model, created),
        "choices": [
            {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }
