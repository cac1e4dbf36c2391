"""Text for people: byte counts as llama.cpp prints them, untrusted strings made safe."""

from __future__ import annotations

__all__ = ["escape_untrusted", "format_bytes", "format_count"]

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
