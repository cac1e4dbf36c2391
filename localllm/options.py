"""Every flag grammar of the command line, parsed into plain values or one-line errors.

Two number-list grammars live here on purpose: kv-calc's (``512,2048,4k``: a k suffix,
duplicates dropped) and bench's (llama-bench's ``128,512``, repeated flags, ranges
``first-last[+step|*mult]``, duplicates kept). Merging them would change one command.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from localllm.errors import InvalidArgument
from localllm.ggml_types import check_kv_type
from localllm.runtime.params import FLASH_ATTN_TYPES

__all__ = [
    "ROPE_METHODS",
    "check_rope_method",
    "parse_count_list",
    "parse_flash_attn_modes",
    "parse_kv_type_list",
    "parse_kv_types",
    "parse_on_off",
    "parse_pairs",
    "parse_size",
    "parse_sweep",
]

ROPE_METHODS = ("none", "linear", "ntk", "yarn")


def check_rope_method(method: str | None) -> str | None:
    """``method`` when it is a RoPE method localllm plans (None: the default plan)."""
    if method is not None and method not in ROPE_METHODS:
        raise InvalidArgument(
            f"unknown RoPE method {method!r}; use one of {', '.join(ROPE_METHODS)}"
        )
    return method


def parse_on_off(value: str, flag: str) -> bool:
    """``on`` / ``off`` (any case) -> True / False."""
    if value.lower() not in ("on", "off"):
        raise InvalidArgument(f"{flag} {value!r}: use on or off")
    return value.lower() == "on"


def parse_count_list(text: str, flag: str) -> tuple[int, ...]:
    """kv-calc's lists: ``"512,2048,4k"`` -> (512, 2048, 4096); a k suffix means x1024."""
    values = []
    for part in text.split(","):
        item = part.strip().lower()
        m = re.fullmatch(r"(\d+)(k?)", item)
        if not m:
            raise InvalidArgument(
                f"{flag} {text!r}: {part.strip()!r} is not a count; "
                f"give whole numbers separated by commas, e.g. {flag} 512,2048,4096"
            )
        value = int(m[1]) * (1024 if m[2] else 1)
        if value <= 0:
            raise InvalidArgument(f"{flag} {text!r}: {value} must be at least 1")
        values.append(value)
    return tuple(dict.fromkeys(values))


_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?:([+*])(\d+))?)?$")
_MAX_RANGE_VALUES = 10_000


def _expand_range(item: str, flag: str, minimum: int) -> list[int]:
    m = _RANGE.match(item)
    if not m:
        raise InvalidArgument(
            f"{flag} {item!r} is not a count; give whole numbers >= {minimum}, "
            f"e.g. {flag} 128,512 or {flag} 128-512*2"
        )
    first = int(m[1])
    if m[2] is None:
        return [first]
    last, op, step = int(m[2]), m[3] or "+", int(m[4] or 1)
    if (op == "+" and step < 1) or (op == "*" and (step < 2 or first < 1)):
        raise InvalidArgument(
            f"{flag} range {item!r} never ends; use +STEP with STEP >= 1, "
            "or *MULT with MULT >= 2 from a start >= 1"
        )
    numbers, n = [], first
    while n <= last:
        numbers.append(n)
        n = n + step if op == "+" else n * step
        if len(numbers) > _MAX_RANGE_VALUES:
            raise InvalidArgument(f"{flag} range {item!r} expands to too many values")
    return numbers


def parse_sweep(values: Sequence[str], flag: str, *, minimum: int = 0) -> tuple[int, ...]:
    """llama-bench's number lists: ``128,512``, repeated flags, ``first-last[+step|*mult]``."""
    out: list[int] = []
    for value in values:
        for item in str(value).split(","):
            for n in _expand_range(item.strip(), flag, minimum):
                if n < minimum:
                    raise InvalidArgument(f"{flag} {n} must be at least {minimum}")
                out.append(n)
    return tuple(out)


def parse_pairs(values: Sequence[str], flag: str = "--pg") -> tuple[tuple[int, int], ...]:
    """llama-bench's ``-pg 512,128``: one prompt,generation pair per flag."""
    pairs = []
    for value in values:
        parts = [p.strip() for p in str(value).split(",")]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise InvalidArgument(
                f"{flag} {value!r} must be two token counts, prompt and generation: {flag} 512,128"
            )
        pairs.append((int(parts[0]), int(parts[1])))
    return tuple(pairs)


def _names(values: Sequence[str]) -> list[str]:
    return [item.strip().lower() for value in values for item in str(value).split(",")]


def parse_kv_types(text: str, flag: str = "--kv-type") -> tuple[str, ...]:
    """kv-calc's ``"f16,q8_0"`` -> ("f16", "q8_0"): each a KV cache type, duplicates dropped."""
    types = tuple(dict.fromkeys(t for t in _names([text]) if t))
    for name in types or (text,):
        check_kv_type(name, flag)
    return types


def parse_kv_type_list(values: Sequence[str], flag: str) -> tuple[str, ...]:
    """bench's KV types: comma lists and repeated flags, swept in order as given."""
    return tuple(check_kv_type(name, flag) for name in _names(values))


def parse_flash_attn_modes(values: Sequence[str], flag: str = "--flash-attn") -> tuple[str, ...]:
    """llama-bench's ``-fa``: on, off, auto (or 1, 0, -1), comma lists and repeats."""
    aliases = {"1": "on", "0": "off", "-1": "auto", "true": "on", "false": "off"}
    modes = []
    for value in values:
        for item in str(value).split(","):
            name = aliases.get(item.strip().lower(), item.strip().lower())
            if name not in FLASH_ATTN_TYPES:
                raise InvalidArgument(
                    f"unknown flash attention mode {item.strip()!r} ({flag}); "
                    f"use one of {', '.join(FLASH_ATTN_TYPES)}"
                )
            modes.append(name)
    return tuple(modes)


_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}  # fmt: skip


def parse_size(text: str, flag: str = "--budget") -> int:
    """``"8GiB"`` -> 8589934592; GiB/MiB are binary, GB/MB decimal, a bare G means GiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m[2].lower() if m else ""
    if not m or unit not in _UNITS:
        raise InvalidArgument(f"{flag} {text!r} is not a size; write e.g. 8GiB, 512MiB or 16GB")
    value = int(float(m[1]) * _UNITS[unit])
    if value <= 0:
        raise InvalidArgument(f"{flag} {text!r} must be more than zero bytes")
    return value
