"""Byte counts in the binary units llama.cpp prints (MiB, GiB), for tables and messages."""

from __future__ import annotations

__all__ = ["format_bytes"]


def format_bytes(n: int | float | None) -> str:
    """``98362432`` -> ``"93.81 MiB"``; None (unknown) -> ``"?"``."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
