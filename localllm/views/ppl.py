"""Views of perplexity runs and RoPE plans."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from localllm.views.console import err, note, out, safe, warn

if TYPE_CHECKING:
    from localllm.plan.rope import RopePlan
    from localllm.ppl.perplexity import PerplexityProgress, PerplexityResult

__all__ = ["PplProgress", "render_ppl", "show_rope_plan"]


def show_rope_plan(plan: RopePlan) -> None:
    """On stderr, what a RoPE plan did: its sentence when extending, its warning if any."""
    if plan.n_ctx > plan.n_ctx_train or plan.method != "none":
        note(f"rope: {plan.description}")
    if plan.warning:
        warn(plan.warning)


class PplProgress:
    """A progress bar over the tokens a perplexity run decodes (silent off a terminal)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[muted]chunk {task.fields[chunk]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[muted]tokens"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("[accent]ppl {task.fields[ppl]}"),
            TimeRemainingColumn(),
            console=err.console,
            disable=not err.is_terminal,
        )
        self._task: Any = None

    def __enter__(self) -> PplProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)  # type: ignore[arg-type]

    def update(self, item: PerplexityProgress) -> None:
        fields = {
            "chunk": f"{item.chunk}/{item.chunks}",
            "tps": f"{item.tokens_per_second:.0f}",
            "ppl": f"{item.ppl:.4f}" if item.ppl is not None else "-",
        }
        if self._task is None:
            self._task = self._progress.add_task("ppl", total=item.tokens_total, **fields)
        self._progress.update(self._task, completed=item.tokens_done, **fields)


def render_ppl(result: PerplexityResult) -> None:
    """The perplexity line (stdout) and how it was measured (stderr)."""
    out.print(f"PPL = {result.ppl:.4f} +/- {result.ppl_stderr:.5f}")
    note(
        f"{safe(result.model)} on {safe(result.text)}: ctx {result.ctx}, {result.chunks} "
        f"chunks, {result.tokens} tokens scored of {result.text_tokens}, "
        f"{result.tokens_per_second:.1f} tok/s over {result.seconds:.1f} s; "
        f"rope {result.rope.method}"
    )
