"""Views of kv-calc: the header, the table of rows, the budget, the chart, --verify."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from localllm.text import format_bytes
from localllm.views.console import err, note, out, print_unwrapped, safe, warn

if TYPE_CHECKING:
    from localllm.plan.kvcalc import KVCalcResult, KVRow
    from localllm.plan.quant_choice import QuantChoice, QuantRow
    from localllm.plan.verify import VerifyReport

__all__ = ["choice_progress", "render_kv_calc", "render_kv_verify", "render_quant_choice"]

_VERDICT_STYLE = {"fits": "ok", "tight": "warn", "too big": "error", "unknown": "muted"}
KV_CHART_WIDTH = 48


def _kv_types(row: KVRow) -> str:
    return row.type_k if row.type_k == row.type_v else f"{row.type_k}/{row.type_v}"


def render_kv_calc(result: KVCalcResult) -> None:
    """kv-calc's header, its table of rows and, for a sweep, the chart."""
    facts, spec = result.facts, result.facts.spec
    head = Table(box=None, show_header=False, pad_edge=False)
    head.add_column(style="label")
    head.add_column()
    head.add_row("model", Text(f"{safe(facts.label, 80)} ({facts.source})"))
    if not spec.has_attention:  # Mamba, RWKV: a fixed-size state per sequence, no KV
        head.add_row("attention", f"{spec.n_layers} layers, none (a recurrent state)")
    else:
        head.add_row(
            "attention",
            f"{spec.n_layers} layers, {spec.n_heads} heads, {spec.n_kv_heads} KV heads "
            f"({spec.attention_kind}, group {spec.gqa_group:g}), head dim {spec.head_dim}",
        )
        head.add_row(
            "KV per token",
            f"{format_bytes(result.per_token_bytes)}; as MHA "
            f"{format_bytes(round(result.per_token_bytes * result.gqa_saving_factor))}: "
            f"GQA saves {result.gqa_saving_factor:g}x",
        )
    layout = result.layout
    if layout.has_swa:
        sliding = sum(a.swa for a in layout.attention)
        beyond = format_bytes(result.per_token_beyond_window)
        head.add_row(
            "sliding window",
            f"{sliding} of {len(layout.attention)} layers attend to {layout.n_swa} tokens; "
            f"past the window a token adds {beyond}",
        )
    weights = format_bytes(result.weights_bytes) if result.weights_bytes else "?"
    source = "llama_model_size" if result.plan_source != "estimate" else facts.weights_note
    head.add_row("weights", f"{weights} ({safe(source)})")
    fa = "on" if result.request.flash_attn else "off"
    swa = ", SWA cache full size" if result.request.swa_full else ""
    head.add_row("settings", f"flash attention {fa}, ubatch {result.request.ubatch}{swa}")
    head.add_row("figures", _source_text(result))
    head.add_row("available RAM", format_bytes(result.available_bytes))
    out.print(head)
    out.print()
    if result.request.budget_bytes is not None:
        render_kv_budget(result)
    else:
        render_kv_rows(result)
    if len(result.rows) > 1:
        out.print()
        render_kv_chart(result)
    for message in result.notes:
        note(message)
    for message in result.warnings:
        warn(message)


def _source_text(result: KVCalcResult) -> Text:
    if result.plan_source == "estimate":
        return Text("estimate (localllm's arithmetic)", style="warn")
    return Text(f"{result.plan_source}: what llama.cpp would allocate", style="ok")


def render_kv_rows(result: KVCalcResult) -> None:
    swa = any(r.swa_cells is not None for r in result.rows)
    table = Table(box=None, header_style="label", pad_edge=False)
    columns = ["ctx", "batch", "K/V type", "cells", "K", "V", "KV", "per token",
               "MHA", "MQA"]  # fmt: skip
    if swa:
        columns += ["SWA cells", "other SWA"]
    columns += ["compute", "total", "fit"]
    for col in columns:
        table.add_column(
            col, justify="left" if col in ("K/V type", "fit") else "right", no_wrap=True
        )
    for r in result.rows:
        cells = [str(r.ctx), str(r.batch), _kv_types(r), str(r.cells),
                 format_bytes(r.k_bytes), format_bytes(r.v_bytes), format_bytes(r.kv_bytes),
                 format_bytes(r.bytes_per_token), format_bytes(r.mha_kv_bytes),
                 format_bytes(r.mqa_kv_bytes)]  # fmt: skip
        if swa:
            cells += [str(r.swa_cells), format_bytes(r.other_swa_kv_bytes)]
        cells += [format_bytes(r.compute_bytes), format_bytes(r.total_bytes)]
        table.add_row(*cells, Text(r.verdict, style=_VERDICT_STYLE.get(r.verdict, "")))
    print_unwrapped(table)


def render_kv_budget(result: KVCalcResult) -> None:
    budget = result.request.budget_bytes
    out.print(Text(f"largest context in {format_bytes(budget)}", style="label"))
    table = Table(box=None, header_style="label", pad_edge=False)
    for col in ("K/V type", "batch", "max ctx", "KV", "total"):
        table.add_column(col, justify="left" if col == "K/V type" else "right")
    trained = result.facts.spec.n_ctx_train
    for b in result.budget:
        types = b.type_k if b.type_k == b.type_v else f"{b.type_k}/{b.type_v}"
        if b.max_ctx:
            ctx = str(b.max_ctx)
            if b.capped:
                ctx = f"{ctx} (trained)" if b.max_ctx == trained else f">= {ctx}"
            table.add_row(types, str(b.batch), ctx, format_bytes(b.kv_bytes),
                          format_bytes(b.total_bytes))  # fmt: skip
        else:
            table.add_row(types, str(b.batch), Text("none fits", style="error"), "-", "-")
    out.print(table)


def render_kv_chart(result: KVCalcResult) -> None:
    """KV size per row as bars, the same model as MHA behind them, the weights as a line.

    The lecture's picture: past some context or batch the KV cache outgrows the weights.
    """
    rows = result.rows
    axis = "context" if len({r.ctx for r in rows}) > 1 else "batch"
    weights = result.weights_bytes or 0
    show_mha = any(r.mha_kv_bytes > r.kv_bytes for r in rows)
    top = max([r.mha_kv_bytes if show_mha else r.kv_bytes for r in rows] + [weights]) or 1
    scale = KV_CHART_WIDTH / top
    mark = round(weights * scale) if weights else None
    labels = [f"{r.ctx} x{r.batch} {_kv_types(r)}" for r in rows]
    pad = max(len(label) for label in labels)
    title = Text(f"KV cache against {axis}  ", style="label")
    title.append("█ this model", style="ok")
    if show_mha:
        title.append("  ░ as MHA", style="muted")
    if mark is not None:
        title.append(f"  │ weights {format_bytes(weights)}", style="accent")
    out.print(title)
    for label, r in zip(labels, rows, strict=True):
        kv_len = round(r.kv_bytes * scale)
        mha_len = round(r.mha_kv_bytes * scale) if show_mha else 0
        line = Text(label.rjust(pad) + " ")
        over = bool(weights) and r.kv_bytes > weights
        for i in range(KV_CHART_WIDTH + 1):
            if mark is not None and i == mark:
                line.append("│", style="accent")
            elif i < kv_len:
                line.append("█", style="error" if over else "ok")
            elif i < mha_len:
                line.append("░", style="muted")
            else:
                line.append(" ")
        line.append(f" {format_bytes(r.kv_bytes)}", style="muted")
        if show_mha and r.mha_kv_bytes > r.kv_bytes:
            line.append(f" (MHA {format_bytes(r.mha_kv_bytes)})", style="muted")
        out.print(line)


def render_kv_verify(report: VerifyReport) -> None:
    """Estimate against what llama.cpp allocated, per quantity, with the difference."""
    out.print(Text(f"llama.cpp's own report for {safe(report.path)}", style="label"))
    table = Table(box=None, header_style="label", pad_edge=False)
    for col in ("ctx", "batch", "K/V type", "buffer", "estimate", "llama.cpp", "difference", ""):
        table.add_column(
            col, justify="left" if col in ("K/V type", "buffer", "") else "right", no_wrap=True
        )
    for v in report.lines:
        types = v.type_k if v.type_k == v.type_v else f"{v.type_k}/{v.type_v}"
        if v.error:
            table.add_row(str(v.ctx), str(v.batch), types, v.quantity, "-", "-", "-",
                          Text(safe(v.error, 100), style="error"))  # fmt: skip
            continue
        if v.quantity == "cells":
            est, act = str(v.estimate), str(v.actual)
            diff = str(v.difference) if v.difference is not None else "?"
        else:
            # llama.cpp prints MiB with 2 decimals: compare at that resolution.
            est = f"{v.estimate / 1048576:.2f} MiB" if v.estimate is not None else "?"
            act = f"{v.actual / 1048576:.2f} MiB" if v.actual is not None else "?"
            if v.exact:
                diff = "0.00 MiB"
            elif v.relative is None or v.difference is None:
                diff = "?"
            else:
                diff = f"{v.difference / 1048576:+.2f} MiB ({v.relative:+.1%})"
        if v.exact:
            verdict = Text("exact" if v.quantity == "cells" else "equal at 0.01 MiB", style="ok")
        else:
            verdict = Text("estimate", style="muted")
        table.add_row(str(v.ctx), str(v.batch), types, v.quantity, est, act, diff, verdict)
    print_unwrapped(table)


# ------------------------------------------------------------- kv-calc ORG/REPO


@contextmanager
def choice_progress(repo: str) -> Iterator[Callable[[str, int, int], None]]:
    """One progress line on stderr while a repo's headers are read and planned (silent
    when stderr is not a terminal); yields the callback the core calls."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if not err.is_terminal:
        yield lambda what, done, total: None
        return
    columns = (TextColumn("[accent]{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=err.console, transient=True) as progress:
        name = escape(safe(repo, 60))
        task = progress.add_task(f"{name}: listing", total=None)

        def update(what: str, done: int, total: int) -> None:
            progress.update(task, description=f"{name}: {what}", completed=done, total=total)

        yield update


def _max_ctx(row: QuantRow) -> str | Text:
    if row.max_ctx is None:
        return "?"
    if row.max_ctx == 0:
        return Text("none", style="error")
    return f"{row.max_ctx} (trained)" if row.max_ctx_trained else str(row.max_ctx)


def render_quant_choice(choice: QuantChoice) -> None:
    """Each file of the repo at the context asked, sorted by size; the choice on the last line."""
    ctx = choice.rows[0].ctx if choice.rows else 0
    types = choice.type_k if choice.type_k == choice.type_v else f"{choice.type_k}/{choice.type_v}"
    batch = f" x {choice.batch} sequences" if choice.batch > 1 else ""
    out.print(
        Text(f"{safe(choice.repo, 80)}", style="label")
        + Text(f" @ {choice.revision[:12]}: {ctx} tokens{batch}, KV {types}, "
               f"{format_bytes(choice.available_bytes)} available", style="muted")
    )  # fmt: skip
    table = Table(box=None, header_style="label", pad_edge=False)
    for col in ("", "quant", "file size", "weights", "KV", "compute", "total", "fit",
                "max ctx", "KV/token", "file"):  # fmt: skip
        left = col in ("", "quant", "fit", "file")
        table.add_column(col, justify="left" if left else "right", no_wrap=True)
    for r in choice.rows:
        mark = Text("→", style="ok") if r.recommended else Text("")
        quant = Text(safe(r.quant or "?", 20) + (" imatrix" if r.imatrix else ""))
        name = safe(r.file, 80) + (f" (+{r.parts - 1} parts)" if r.parts > 1 else "")
        if r.error is not None:
            table.add_row(mark, quant, format_bytes(r.file_bytes), "-", "-", "-", "-",
                          Text("error", style="error"), "-", "-", Text(name))  # fmt: skip
            continue
        table.add_row(
            mark, quant, format_bytes(r.file_bytes), format_bytes(r.weights_bytes),
            format_bytes(r.kv_bytes), format_bytes(r.compute_bytes), format_bytes(r.total_bytes),
            Text(r.verdict, style=_VERDICT_STYLE.get(r.verdict, "")), _max_ctx(r),
            format_bytes(r.kv_per_token), Text(name),
        )  # fmt: skip
    print_unwrapped(table)
    for r in choice.rows:
        if r.error is not None:
            warn(f"{safe(r.file, 80)}: {safe(r.error, 200)}")
    for message in choice.skipped:
        note(f"left out: {safe(message, 160)}")
    read = f"{choice.headers_read} headers read ({format_bytes(choice.bytes_read)})"
    note(f"{read}, {choice.headers_cached} from the cache; no weights downloaded")
    for message in choice.warnings:
        warn(message)
    line = Text("recommended: ", style="label")
    if choice.recommended is None:
        line.append("none", style="error")
        line.append(f" ({safe(choice.reason, 300)})")
    else:
        line.append(f"{safe(choice.recommended, 100)}", style="ok")
        line.append(f" ({safe(choice.reason, 300)})")
    out.print(line)
