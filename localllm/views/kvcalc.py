"""Views of kv-calc: the header, the table of rows, the budget, the chart, --verify."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from localllm.text import format_bytes
from localllm.views.console import note, out, print_unwrapped, safe, warn

if TYPE_CHECKING:
    from localllm.plan.kvcalc import KVCalcResult, KVRow
    from localllm.plan.verify import VerifyReport

__all__ = ["render_kv_calc", "render_kv_verify"]

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
