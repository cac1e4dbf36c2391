"""The bench view: warnings first, a progress bar on stderr, results on stdout.

The progress bar shows when stderr is a terminal and stdout is not piped; then the
output waits for the bar to finish. Without it, CSV and JSONL rows stream as each test
ends, the way llama-bench prints them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from localllm.bench.formats import (
    format_csv_header,
    format_csv_row,
    format_json,
    format_jsonl_row,
    format_markdown,
)
from localllm.bench.record import BenchResult
from localllm.bench.request import BenchRequest
from localllm.bench.run import BenchEvent, BenchPlan, BenchProgress, BenchRun
from localllm.views.console import err, note, stdout_is_pipe, warn

__all__ = ["render_bench"]

_BENCH_STAGES = {
    "bandwidth": "measuring memory bandwidth",
    "loading": "loading the model",
    "hashing": "checksumming the model",
    "warmup": "warm-up",
    "depth": "prefilling depth",
    "rep": "run",
}


class _Output:
    """stdout, held back while a progress bar draws on the terminal."""

    def __init__(self, hold: bool) -> None:
        self.hold = hold
        self.held: list[str] = []

    def emit(self, text: str) -> None:
        if self.hold:
            self.held.append(text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    def flush(self) -> None:
        if self.held:
            sys.stdout.write("".join(self.held))
            sys.stdout.flush()


def _progress(show: bool) -> Progress:
    return Progress(
        TextColumn("[label]{task.fields[test]}"),
        TextColumn("[muted]{task.fields[stage]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err.console,
        disable=not show,
        redirect_stdout=False,
        redirect_stderr=False,
    )


def _show_progress(progress: Progress, task: Any, event: BenchProgress) -> None:
    stage = _BENCH_STAGES.get(event.stage, event.stage)
    if event.stage in ("rep", "depth"):
        stage = f"{stage} {event.rep}/{event.reps}"
    test = f"{event.test} ({event.index}/{event.total})" if event.index else ""
    done = (event.index - 1) * event.reps + max(event.rep - 1, 0) if event.index else 0
    progress.update(task, test=test, stage=stage, completed=done)


def render_bench(request: BenchRequest, events: Iterator[BenchEvent]) -> None:
    """Drive a bench run's events to the terminal in the request's output format."""
    show = err.is_terminal and not stdout_is_pipe()
    output = _Output(hold=show)
    results: list[BenchResult] = []
    run: BenchRun | None = None
    task: Any = None
    with _progress(show) as progress:
        for event in events:
            if isinstance(event, BenchPlan):
                for message in event.warnings:
                    warn(message)
                for message in event.notes:
                    note(message)
                total = len(event.tests) * event.repetitions
                if request.output == "csv" and task is None:  # several quants: one header
                    output.emit(format_csv_header())
                task = progress.add_task("bench", total=total, test="", stage="starting")
            elif isinstance(event, BenchProgress):
                _show_progress(progress, task, event)
            elif isinstance(event, BenchResult):
                results.append(event)
                progress.update(task, completed=len(results) * event.repetitions)
                if request.output == "csv":
                    output.emit(format_csv_row(event))
                elif request.output == "jsonl":
                    output.emit(format_jsonl_row(event))
            elif isinstance(event, BenchRun):
                run = event
    if request.output == "md":
        env, bandwidth = (run.environment, run.bandwidth) if run else (None, None)
        output.held.append(format_markdown(request, results, env, bandwidth))
    elif request.output == "json":
        output.held.append(format_json(results))
    output.flush()
