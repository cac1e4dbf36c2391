"""Views of running servers: ``localllm ps`` and ``localllm stop``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from localllm.text import format_bytes
from localllm.views.console import note, out, safe, warn

if TYPE_CHECKING:
    from localllm.serve.registry import RunningModel, StopResult

__all__ = ["render_ps", "render_stop"]


def _until(seconds: float | None, status: str) -> str:
    if status != "loaded":
        return "-"
    if seconds is None:
        return "forever"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


def render_ps(rows: Sequence[RunningModel]) -> None:
    """``localllm ps``: one row per model a running server offers, loaded ones first."""
    if not rows:
        note("no localllm server is running here (start one: localllm serve)")
        return
    table = Table(box=None, header_style="label", pad_edge=False)
    for col in ("model", "status", "ctx", "slots", "memory (plan)", "unloads in", "server"):
        table.add_column(col, justify="right" if col in ("ctx", "slots") else "left")
    ordered = sorted(rows, key=lambda r: (r.status != "loaded", r.server, r.model_id))
    for r in ordered:
        if r.problem:
            continue
        table.add_row(
            Text(safe(r.model_id)),
            r.status,
            str(r.n_ctx) if r.n_ctx else "?",
            str(r.n_parallel) if r.n_parallel else "?",
            format_bytes(r.memory_bytes) if r.memory_bytes else "?",
            _until(r.expires_in, r.status),
            r.server,
        )
    out.print(table)
    for r in rows:
        if r.problem:
            warn(f"{r.server}: {r.problem}")


def render_stop(results: Sequence[StopResult]) -> None:
    for r in results:
        if r.unloaded:
            note(f"{safe(r.model_id)} unloaded from {r.server}")
        else:
            warn(f"{r.server}: {safe(r.message)}")
