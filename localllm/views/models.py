"""Views of models: the store listing, a model's facts, hub listings and pulls."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from localllm.text import format_bytes, format_count
from localllm.views.console import err, note, out, safe, warn

if TYPE_CHECKING:
    from localllm.inventory.listing import ModelInfo, ModelListing
    from localllm.plan.kvcalc import KVRow
    from localllm.store.hub import PullResult, RepoListing

__all__ = [
    "download_progress",
    "render_hub_listing",
    "render_info",
    "render_model_list",
    "render_pull_result",
]


def render_model_list(rows: Sequence[ModelListing]) -> None:
    """``localllm list``: one row per stored model; unreadable ones flagged on stderr."""
    if not rows:
        note("the store is empty; `localllm pull smollm2-135m` fetches the default model")
        return
    table = Table(box=None, header_style="label", pad_edge=False)
    for col in ("alias", "file", "size", "quant", "architecture", "trained ctx"):
        # File names are what people copy into commands: never truncate them.
        table.add_column(
            col,
            justify="right" if col in ("size", "trained ctx") else "left",
            no_wrap=col == "file",
            overflow="fold",
        )
    for row in rows:
        table.add_row(
            Text(row.alias or "-"),
            Text(safe(row.file)),
            format_bytes(row.size_bytes),
            Text(row.quant or "?"),
            Text(safe(row.architecture) if row.architecture else "?"),
            str(row.n_ctx_train) if row.n_ctx_train else "?",
        )
    out.print(table)
    for row in rows:
        if row.problem:
            warn(row.problem)


def render_info(info: ModelInfo) -> None:
    """``localllm info``: the architecture facts and the f16 KV cost."""
    spec = info.spec
    kv_per_token_bytes, kv_at_train_bytes = info.kv_per_token_bytes, info.kv_at_train_bytes
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="label")
    table.add_column()

    def row(label: str, value: str | Text) -> None:
        table.add_row(label, value if isinstance(value, Text) else Text(value))

    row("name", safe(spec.name, 80))
    row("source", f"{spec.source}: {safe(spec.path)}" if spec.path else spec.source)
    row("architecture", safe(spec.architecture))
    params = format_count(spec.n_params)
    row("parameters", f"{params} ({spec.n_params:,})" if spec.n_params else "?")
    if spec.file_type:
        row("file type", safe(spec.file_type))
    if spec.quant_mix:
        mix = ", ".join(
            f"{q.type_name} {q.n_tensors} tensors {format_bytes(q.n_bytes)}" for q in spec.quant_mix
        )
        row("quant mix", mix)
    row("layers", str(spec.n_layers))
    if spec.has_attention:
        row(
            "attention",
            f"{spec.n_heads} heads, {spec.n_kv_heads} KV heads ({spec.attention_kind}, "
            f"group {spec.gqa_group:g}), head dim {spec.head_dim}",
        )
    else:  # Mamba, RWKV
        row("attention", "none (a recurrent state per sequence)")
    row("embedding / FFN", f"{spec.n_embd} / {spec.n_ff if spec.n_ff else '?'}")
    row("vocabulary", str(spec.vocab_size) if spec.vocab_size else "?")
    row("trained context", f"{spec.n_ctx_train} tokens")
    rope = f"base {spec.rope_freq_base:g}"
    if spec.rope_dim:
        rope += f", {spec.rope_dim} dims"
    if spec.rope_scaling_type and spec.rope_scaling_type != "none":
        rope += f", {safe(spec.rope_scaling_type)} x{spec.rope_scaling_factor or 1:g}"
        if spec.rope_orig_ctx:
            rope += f" (original context {spec.rope_orig_ctx})"
    row("RoPE", rope)
    if spec.sliding_window:
        row("sliding window", f"{spec.sliding_window} tokens")
    row("chat template", _template_status(info))
    row(
        "KV cache (f16)",
        f"{format_bytes(kv_per_token_bytes)} per token, "
        f"{format_bytes(kv_at_train_bytes)} at {spec.n_ctx_train} tokens",
    )
    if info.weights_bytes is not None:
        row("weights", format_bytes(info.weights_bytes))
    for plan in info.plans:
        row(f"memory at {plan.ctx}", _plan_text(plan))
    if info.plan_source:
        row("memory source", f"{info.plan_source} (f16 cache, flash attention, ubatch 512)")
    row("file size", format_bytes(spec.file_bytes))
    out.print(table)


def _plan_text(plan: KVRow) -> str:
    """One context's plan: the total, then what it is made of."""
    parts = [f"weights {format_bytes(plan.weights_bytes)}"] if plan.weights_bytes else []
    parts.append(f"KV {format_bytes(plan.kv_bytes)}")
    if plan.swa_cells is not None and plan.other_swa_kv_bytes is not None:
        parts[-1] += f" (SWA cache {plan.swa_cells} cells; {format_bytes(plan.other_swa_kv_bytes)}"
        parts[-1] += " with --swa-full)"
    if plan.compute_bytes is not None:
        parts.append(f"compute {format_bytes(plan.compute_bytes)}")
    if plan.output_bytes is not None:
        parts.append(f"output {format_bytes(plan.output_bytes)}")
    return f"{format_bytes(plan.total_bytes)} = " + " + ".join(parts)


def _template_status(info: ModelInfo) -> str | Text:
    """Whether the GGUF's chat template parses, and what it supports."""
    caps = info.template
    if caps is None:
        if info.spec.source not in ("gguf", "hub header"):
            return Text("not known without the file", style="muted")
        return "none in the file"
    if caps.error is not None:
        return Text(f"does not work: {safe(caps.error, 160)}", style="error")
    supports = [name for name, on in (("system role", caps.system_role), ("tools", caps.tools),
                                      ("tool calls", caps.tool_calls)) if on]  # fmt: skip
    missing = [name for name in ("system role", "tools") if name not in supports]
    text = "parses"
    if supports:
        text += "; " + ", ".join(supports)
    if missing:
        text += "; no " + ", no ".join(missing)
    return text


@contextmanager
def download_progress(label: str) -> Iterator[Callable[[int, int | None], None]]:
    """A progress bar on stderr (size, speed, ETA); yields the callback the core calls.

    Silent when stderr is not a terminal: scripts get the final status line only.
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    if not err.is_terminal:
        yield lambda done, total: None
        return
    columns = (
        TextColumn("[accent]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err.console, transient=True) as progress:
        task = progress.add_task(label, total=None)  # a pulsing bar until the size is known
        started: list[bool] = []

        def update(done: int, total: int | None) -> None:
            if not started:  # the first report may be a resumed offset: not counted as speed
                started.append(True)
                progress.reset(task, total=total, completed=done)
            else:
                progress.update(task, completed=done, total=total)

        yield update


def render_hub_listing(listing: RepoListing) -> None:
    """``pull REPO --list``: the GGUF files of a repo, their quants and sizes."""
    out.print(
        Text(f"{listing.repo}", style="label")
        + Text(f" @ {listing.revision[:12]}" + (" (gated)" if listing.gated else ""), "muted")
    )
    if not listing.files:
        note(f"{listing.repo} has no .gguf files ({listing.other_files} other files)")
        return
    table = Table(box=None, header_style="label", pad_edge=False)
    table.add_column("quant")
    table.add_column("size", justify="right")
    table.add_column("file")
    table.add_column("stored")
    for file in listing.files:
        table.add_row(
            Text(file.quant or "?"),
            format_bytes(file.size_bytes),
            Text(safe(file.path)),
            Text("yes", style="ok") if file.in_store else Text("-", style="muted"),
        )
    out.print(table)
    example = next((f.quant for f in listing.files if f.quant), None)
    if example:
        note(f"pull one with `localllm pull {listing.repo}:{example}`")
        note(f"or measure its speed first: `localllm bench {listing.repo}:{example} --synthetic`")


def render_pull_result(result: PullResult) -> None:
    """The one status line of a finished pull (stderr)."""
    if result.already_present:
        size = format_bytes(result.size_bytes)
        note(f"{result.filename}: already in the store, verified ({size})")
        return
    resumed = f", resumed at {format_bytes(result.resumed_from)}" if result.resumed_from else ""
    note(
        f"{result.filename}: sha256 verified and stored in {result.path.parent} "
        f"({format_bytes(result.size_bytes)}, sha256 {result.sha256[:12]}…{resumed})"
    )
