"""The building blocks of request checking: ApiError (a refusal with its HTTP status and
OpenAI's error fields) and typed reads from a JSON body, each naming the bad field."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["ApiError", "Fields", "invalid", "load_object"]


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


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"invalid '{param}': {message}", param=param, code="invalid_value")


class Fields:
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
            raise invalid(name, f"expected a number, got {json.dumps(value)[:40]}")
        if value < lo or value > hi or (open_lo and value == lo):
            low = f"> {lo}" if open_lo else f">= {lo}"
            rule = low if hi == math.inf else f"{low} and <= {hi}"
            raise invalid(name, f"{value} must be {rule}")
        return float(value)

    def integer(self, name: str, default: int | None, lo: int, hi: int) -> int | None:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(name, f"expected an integer, got {json.dumps(value)[:40]}")
        if not lo <= value <= hi:
            raise invalid(name, f"{value} must be between {lo} and {hi}")
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise invalid(name, f"expected true or false, got {json.dumps(value)[:40]}")
        return value

    def string(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is not None and not isinstance(value, str):
            raise invalid(name, f"expected a string, got {json.dumps(value)[:40]}")
        return value


def load_object(body: bytes, allowed: frozenset[str]) -> Fields:
    try:
        data = json.loads(body)
    except RecursionError:
        # json recurses once per nesting level: a deep array would otherwise be a 500.
        raise ApiError(
            400,
            "the request body is nested too deeply for the JSON parser "
            f"(more than about {sys.getrecursionlimit()} levels of arrays or objects)",
            code="invalid_json",
        ) from None
    except ValueError as exc:
        # JSONDecodeError, UnicodeDecodeError and int-conversion limits are all ValueErrors.
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
    return Fields(data)
