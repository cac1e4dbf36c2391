"""``POST /v1/embeddings``: the request checked field by field, and OpenAI's answer.

``input`` is a string, a list of strings, a list of token ids or a list of those;
``encoding_format`` is ``float`` or ``base64`` (little-endian float32, as OpenAI's);
``dimensions`` is refused (the model's vectors are not truncated to other sizes).
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any

from localllm.runtime.embeddings import EmbeddingResult
from localllm.serve.fields import ApiError, invalid, load_object

__all__ = ["MAX_INPUTS", "EmbeddingsRequest", "embeddings_response", "parse_embeddings_request"]

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
_KEYS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str | None
    inputs: tuple[str | tuple[int, ...], ...]
    encoding_format: str  # float | base64


def _is_tokens(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _inputs(value: Any) -> tuple[str | tuple[int, ...], ...]:
    if isinstance(value, str):
        items: list[Any] = [value]
    elif _is_tokens(value):
        items = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        code = "missing_required_parameter" if value is None else "invalid_value"
        raise ApiError(
            400,
            "'input' must be a string, a list of strings, a list of token ids, or a list of "
            "token-id lists",
            param="input",
            code=code,
        )
    if len(items) > MAX_INPUTS:
        raise invalid("input", f"{len(items)} inputs; at most {MAX_INPUTS} per request")
    out: list[str | tuple[int, ...]] = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item:
            out.append(item)
        elif _is_tokens(item):
            out.append(tuple(item))
        else:
            raise invalid(f"input[{i}]", "expected a non-empty string or a list of token ids")
    return tuple(out)


def parse_embeddings_request(body: bytes) -> EmbeddingsRequest:
    """A ``POST /v1/embeddings`` body, or ApiError(400) naming the bad field."""
    f = load_object(body, _KEYS)
    f.string("user")
    if f.get("dimensions") is not None:
        raise ApiError(
            400,
            "unsupported parameter 'dimensions': the vectors have the model's own size "
            "(GET /v1/models); drop it",
            param="dimensions",
            code="unsupported_parameter",
        )
    encoding = f.string("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise invalid("encoding_format", f"{encoding[:20]!r}: use 'float' or 'base64'")
    return EmbeddingsRequest(f.string("model"), _inputs(f.get("input")), encoding)


def _encode(vector: tuple[float, ...], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return list(vector)


def embeddings_response(result: EmbeddingResult, model: str, encoding: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(v, encoding)}
            for i, v in enumerate(result.vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
