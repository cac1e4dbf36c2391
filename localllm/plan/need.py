"""What one load takes, as the memory check before it keeps it: the record chat carries.

Made by :func:`localllm.plan.need_cache.check_load_need` (kept between runs) or from a whole
plan (:attr:`localllm.plan.preload.LoadPlan.need`).
"""

from __future__ import annotations

from dataclasses import dataclass

from localllm.errors import InsufficientMemory

__all__ = ["LoadNeed", "check_with_draft"]

_GIB = 1 << 30


@dataclass(frozen=True)
class LoadNeed:
    """What one load takes by kv-calc's plan (llama.cpp's dry run), and what is available."""

    label: str
    total_bytes: int  # weights + KV cache + compute buffers
    kv_bytes: int
    available_bytes: int | None  # None: this system does not say


def check_with_draft(target: LoadNeed, draft: LoadNeed) -> None:
    """A draft model (--draft) loads beside the target: both must fit together."""
    available = target.available_bytes
    total = target.total_bytes + draft.total_bytes
    if available is None or total <= available:
        return
    raise InsufficientMemory(
        f"{target.label} with the draft model {draft.label} needs {total / _GIB:.2f} GiB "
        f"({target.total_bytes / _GIB:.2f} + {draft.total_bytes / _GIB:.2f} GiB) but "
        f"{available / _GIB:.2f} GiB is available; use a smaller draft model or --ctx, or drop "
        "--draft; --no-memory-check loads anyway"
    )
