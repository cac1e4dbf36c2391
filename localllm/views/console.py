"""The terminal: Rich consoles with a semantic theme, and the small things every view uses.

Data goes to stdout (``out``), everything a script should not parse goes to stderr
(``err``): status lines, progress, warnings, errors. Strings that come from a model
file are escaped before they reach either (:func:`safe`).

The consoles are made on first use, and a line for a stream Rich would not style (not a
terminal, no ``FORCE_COLOR``/``TTY_COMPATIBLE``) is written as Rich would write it,
without Rich: a one-shot ``chat -p`` whose stderr a script reads never imports Rich
(~15 ms of each call, benchmarks/chat_oneshot.md).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any, TextIO

from localllm.text import escape_untrusted

if TYPE_CHECKING:  # Rich is imported where a line is styled or a table printed
    from rich.console import Console
    from rich.table import Table
    from rich.theme import Theme

__all__ = [
    "err",
    "error",
    "note",
    "out",
    "print_json",
    "print_unwrapped",
    "safe",
    "spinner",
    "stdout_is_pipe",
    "theme",
    "warn",
]

_STYLES = {
    "error": "bold red",
    "warn": "yellow",
    "ok": "green",
    "muted": "dim",
    "accent": "cyan",
    "label": "bold",
    "reply": "default",
    "prompt": "bold green",
}
# What rich.text.Text removes from a string (rich.control.strip_control_codes).
_CONTROL_CODES = dict.fromkeys((7, 8, 11, 12, 13))


def theme() -> Theme:
    """The semantic styles every view prints with (``error``, ``muted``, ``accent``, ...)."""
    from rich.theme import Theme

    return Theme(_STYLES)


class LazyConsole:
    """A Rich ``Console`` (``.console``) made on first use; attributes are the console's."""

    def __init__(self, *, stderr: bool) -> None:
        object.__setattr__(self, "_stderr", stderr)
        object.__setattr__(self, "_console", None)

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            made = Console(theme=theme(), highlight=False, stderr=self._stderr, soft_wrap=True)
            object.__setattr__(self, "_console", made)
        return self._console  # type: ignore[return-value]

    @property
    def stream(self) -> TextIO:
        return sys.stderr if self._stderr else sys.stdout

    def plain(self) -> bool:
        """Whether Rich would print to this stream without styles (``Console.is_terminal``'s
        rules), and so a line can be written without making the console."""
        if self._console is not None:
            return not self._console.is_terminal
        compatible = os.environ.get("TTY_COMPATIBLE", "")
        if compatible in ("0", "1"):
            return compatible == "0"
        force = os.environ.get("FORCE_COLOR")
        if force is not None:
            return force == ""
        try:
            return not self.stream.isatty()
        except (AttributeError, ValueError):
            return True

    def line(self, text: str, style: str) -> None:
        """One line in one style: styled by Rich, or plain as Rich would write it."""
        if not self.plain():
            from rich.text import Text

            self.console.print(Text(text, style=style))
            return
        self.stream.write(text.translate(_CONTROL_CODES) + "\n")
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.console, name, value)


out = LazyConsole(stderr=False)
err = LazyConsole(stderr=True)


def error(message: str) -> None:
    """The one red line a failed command prints."""
    err.line(f"error: {message}", "error")


def warn(message: str) -> None:
    err.line(f"warning: {message}", "warn")


def note(message: str) -> None:
    err.line(message, "muted")


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
    if err.plain():
        yield
        return
    from rich.text import Text

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
