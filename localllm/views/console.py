"""The terminal: Rich consoles with a semantic theme, and the small things every view uses.

Data goes to stdout (``out``), everything a script should not parse goes to stderr
(``err``): status lines, progress, warnings, errors. Strings that come from a model
file are escaped before they reach either (:func:`safe`).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text
from rich.theme import Theme

from localllm.text import escape_untrusted

if TYPE_CHECKING:  # the views that print tables import it; a one-shot reply does not
    from rich.table import Table

__all__ = [
    "THEME",
    "err",
    "error",
    "note",
    "out",
    "print_json",
    "print_unwrapped",
    "safe",
    "spinner",
    "stdout_is_pipe",
    "warn",
]

THEME = Theme(
    {
        "error": "bold red",
        "warn": "yellow",
        "ok": "green",
        "muted": "dim",
        "accent": "cyan",
        "label": "bold",
        "reply": "default",
        "prompt": "bold green",
    }
)

out = Console(theme=THEME, highlight=False, soft_wrap=True)
err = Console(theme=THEME, highlight=False, stderr=True, soft_wrap=True)


def error(message: str) -> None:
    """The one red line a failed command prints."""
    err.print(Text("error: ", style="error") + Text(message))


def warn(message: str) -> None:
    err.print(Text("warning: ", style="warn") + Text(message))


def note(message: str) -> None:
    err.print(Text(message, style="muted"))


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, no colour, no wrapping."""

    def default(obj: Any) -> Any:
        if is_dataclass(obj) and not isinstance(obj, type):
            return asdict(obj)
        return str(obj)

    sys.stdout.write(json.dumps(data, indent=2, default=default) + "\n")
    sys.stdout.flush()


@contextmanager
def spinner(message: str) -> Iterator[None]:
    """A spinner on stderr while something slow happens (silent when not a terminal)."""
    if not err.is_terminal:
        yield
        return
    with err.status(Text(message, style="muted"), spinner="dots"):
        yield


def safe(text: str | None, limit: int | None = None) -> str:
    return escape_untrusted(text or "", limit)


def print_unwrapped(table: Table) -> None:
    """Print a wide table at its natural width: a wrapped row of figures is unreadable."""
    from rich.measure import Measurement

    width = Measurement.get(out, out.options.update_width(10_000), table).maximum
    previous = out.width  # print() caps its width at the console's, so widen the console
    out.width = max(previous, width)
    try:
        out.print(table)
    finally:
        out.width = previous


def stdout_is_pipe() -> bool:
    """Whether stdout is a pipe (a script reading rows as they come)."""
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return True  # no real stdout (captured): behave as a script would want
