"""The JSON the OpenAI API answers with, built from the engine's records."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

from localllm.runtime.batch_records import GenerationDone, TokenLogprob

__all__ = [
    "chat_chunk",
    "chat_logprobs",
    "chat_response",
    "completion_chunk",
    "completion_logprobs",
    "completion_response",
    "new_id",
    "timings",
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


def chat_response(
    rid: str, model: str, done: GenerationDone, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        **_envelope(rid, "chat.completion", model, None),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": done.text, "refusal": None},
                "logprobs": logprobs,
                "finish_reason": done.finish_reason,
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
