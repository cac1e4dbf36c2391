"""A wall-time backstop for template renders in the main thread (the CLI).

The operation budget (``budget.py``) is what bounds a render, in any thread. This is the
backstop behind it, for a hole the meter might have: a real-time timer whose signal raises
inside the render. Signals reach only the main thread, so only renders there (the CLI's)
get it; serve's worker threads rely on the budget alone. A timer someone else armed is
left alone (the backstop then stands aside), and the previous handler is restored.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from localllm.templates.budget import OverBudget

__all__ = ["WallTimeExceeded", "backstop_available", "wall_time_backstop"]


class WallTimeExceeded(OverBudget):
    """A render stopped by the wall-time backstop."""


def backstop_available() -> bool:
    """Whether a render here can be stopped by the backstop (main thread, POSIX timers)."""
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )


@contextmanager
def wall_time_backstop(seconds: float | None) -> Iterator[None]:
    """Raise :class:`WallTimeExceeded` in the block after ``seconds`` of wall time.

    A no-op when ``seconds`` is None or not positive, or when :func:`backstop_available`
    says the timer cannot be used here.
    """
    if not seconds or seconds <= 0 or not backstop_available():
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise WallTimeExceeded(f"more than {seconds:.2g} s of wall time (the CLI's backstop)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        # Disarm before restoring, so a late signal never reaches the previous handler;
        # restore even if the signal lands while disarming.
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)
