"""Every flag grammar of the command line, parsed into plain values or one-line errors.

Two number-list grammars live here on purpose: kv-calc's (``512,2048,4k``: a k suffix,
duplicates dropped) and bench's (llama-bench's ``128,512``, repeated flags, ranges
``first-last[+step|*mult]``, duplicates kept). Merging them would change one command.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from localllm.errors import InvalidArgument
from localllm.gguf.ggml_types import check_kv_type
from localllm.runtime.params import FLASH_ATTN_TYPES
from localllm.text import parse_size

__all__ = [
    "MAX_SEQUENCES",
    "MAX_THREADS",
    "MAX_TOKENS",
    "ROPE_METHODS",
    "check_count",
    "check_rope_method",
    "check_threads",
    "parse_count_list",
    "parse_duration",
    "parse_flash_attn_modes",
    "parse_kv_type_list",
    "parse_kv_types",
    "parse_on_off",
    "parse_pairs",
    "parse_repack",
    "parse_size",
    "parse_sweep",
    "parse_tensor_split",
    "threads_warning",
]

ROPE_METHODS = ("none", "linear", "ntk", "yarn")
# ggml's GGML_MAX_N_THREADS: a threadpool cannot hold more.
MAX_THREADS = 512
# Contexts, prompts and batches: 2^24 tokens (16.7M) is past every trained context and
# any plan a machine holds; beyond it the numbers are typos.
MAX_TOKENS = 1 << 24
# llama.cpp's LLAMA_MAX_SEQ: parallel sequences one context can hold.
MAX_SEQUENCES = 256


def check_count(value: int | None, flag: str, *, low: int = 1, high: int = MAX_TOKENS) -> None:
    """A whole number flag within [low, high], or the one line that says what would work."""
    if value is not None and not low <= value <= high:
        raise InvalidArgument(f"{flag} {value} is out of range; use {low} to {high}")


def check_threads(value: int | None, flag: str = "--threads") -> None:
    """Threads 1..512 (ggml's limit); more than the machine has is allowed, with a warning."""
    check_count(value, flag, high=MAX_THREADS)


def threads_warning(value: int | None, flag: str = "--threads") -> str | None:
    """The warning for more threads than this process may run on (allowed, but slower)."""
    from localllm.machine import online_cpus

    cpus = online_cpus()
    if value is None or value <= cpus:
        return None
    return (
        f"{flag} {value} is more threads than the {cpus} CPU cores this process may use; "
        f"they will share cores and run slower than {flag} {cpus}"
    )


def parse_repack(value: str | None) -> bool | None:
    """llama-bench's ``--repack 0|1`` (weights into llama.cpp's extra buffer types)."""
    if value is None:
        return None
    if value.strip() not in ("0", "1"):
        raise InvalidArgument(f"--repack {value!r}: use 0 or 1, as llama-bench's --repack")
    return value.strip() == "1"


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


def parse_count_list(text: str, flag: str, *, maximum: int = MAX_TOKENS) -> tuple[int, ...]:
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
        check_count(value, flag, high=maximum)
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


def parse_sweep(
    values: Sequence[str], flag: str, *, minimum: int = 0, maximum: int = MAX_TOKENS
) -> tuple[int, ...]:
    """llama-bench's number lists: ``128,512``, repeated flags, ``first-last[+step|*mult]``."""
    out: list[int] = []
    for value in values:
        for item in str(value).split(","):
            for n in _expand_range(item.strip(), flag, minimum):
                if n < minimum:
                    raise InvalidArgument(f"{flag} {n} must be at least {minimum}")
                check_count(n, flag, low=minimum, high=maximum)
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


def parse_tensor_split(value: str | None, endpoints: tuple[str, ...]) -> tuple[float, ...]:
    """--tensor-split's proportions, one per RPC device (llama.cpp's comma or slash list)."""
    if not value:
        return ()
    if not endpoints:
        raise InvalidArgument("--tensor-split shares layers between --rpc devices; add --rpc")
    parts = value.replace("/", ",").split(",")
    try:
        shares = tuple(float(p) for p in parts)
    except ValueError:
        raise InvalidArgument(
            f"--tensor-split {value!r} is not a list of numbers; use e.g. 3,1"
        ) from None
    if any(not math.isfinite(s) or s < 0 for s in shares) or not any(shares):
        raise InvalidArgument(
            f"--tensor-split {value!r} needs non-negative proportions, at least one above 0"
        )
    if len(shares) > len(endpoints):
        raise InvalidArgument(
            f"--tensor-split {value!r} has {len(shares)} shares for {len(endpoints)} --rpc "
            "server(s); give one per server"
        )
    return shares


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, flag: str) -> float | None:
    """``300``, ``30s``, ``5m``, ``1h`` -> seconds; ``-1`` (or any negative) -> None: never."""
    value = text.strip().lower()
    if re.fullmatch(r"-\d+(?:\.\d+)?[a-z]*", value):
        return None
    match = _DURATION.match(value)
    if not match:
        raise InvalidArgument(
            f"{flag} {text!r} is not a duration; use seconds (300), 30s, 5m, 1h, 0 or -1"
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
