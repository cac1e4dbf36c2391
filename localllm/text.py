"""Text for people: byte counts as llama.cpp prints them and back, untrusted strings made safe."""

from __future__ import annotations

import re
from collections.abc import Iterable

from localllm.errors import InvalidArgument

__all__ = ["escape_untrusted", "format_bytes", "format_count", "format_ranges", "parse_size"]

# Bidirectional overrides can disguise what a string says (trojan source).
_BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def format_bytes(n: int | float | None) -> str:
    """``98362432`` -> ``"93.81 MiB"`` (llama.cpp's binary units); None (unknown) -> ``"?"``."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def format_ranges(values: Iterable[int], sep: str = ",") -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``: runs of consecutive numbers as ranges."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and runs[-1][1] == v - 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return sep.join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def format_count(n: int | None) -> str:
    """``134515008`` -> ``"134.52M"``; None -> ``"?"``."""
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def escape_untrusted(text: str, limit: int | None = None) -> str:
    """Make a string from a model file (or a model's output) safe for a terminal.

    Control characters other than newline and tab become ``\\xNN``, bidirectional
    overrides ``\\uNNNN``; ``limit`` cuts the result with an ellipsis.
    """
    out = []
    for ch in text:
        code = ord(ch)
        if ch in "\n\t":
            out.append(ch)
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif ch in _BIDI_CONTROLS:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    escaped = "".join(out)
    if limit is not None and len(escaped) > limit:
        escaped = escaped[: limit - 1] + "…"
    return escaped


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
