"""The view of a model split across hosts and GPUs (kv-calc --rpc, or a GPU here): one
table per context size."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.table import Table
from rich.text import Text

from localllm.plan.split import THIS_MACHINE
from localllm.text import format_bytes, format_ranges
from localllm.views.console import note, out, safe

if TYPE_CHECKING:
    from localllm.plan.split import SplitPlan, SplitResult

__all__ = ["render_split"]

_VERDICT_STYLE = {"fits": "ok", "tight": "warn", "too big": "error", "unknown": "muted"}


def _layer_ranges(layers: tuple[int, ...], n_layer: int) -> str:
    """0-10, 11-29 + output: llama.cpp's layer numbers, the output layer named."""
    parts = [format_ranges((i for i in layers if i < n_layer), ", ")]
    if n_layer in layers:
        parts.append("output")
    return ", ".join(p for p in parts if p) or "-"


def _plan_table(plan: SplitPlan, n_layer: int) -> Table:
    title = f"ctx {plan.ctx}" + (f" x {plan.n_seq} sequences" if plan.n_seq > 1 else "")
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", padding=(0, 1))
    for name in ("host", "layers", "weights", "KV", "compute", "total", "verdict"):
        justify = "left" if name in ("host", "layers", "verdict") else "right"
        # The endpoint and the figures stay whole; the layer list may fold.
        if name == "layers":
            table.add_column(name, min_width=10, overflow="fold")
        else:
            table.add_column(name, justify=justify, no_wrap=True)
    for h in plan.hosts:
        table.add_row(
            safe(h.host, 40),
            _layer_ranges(h.layers, n_layer),
            format_bytes(h.weights_bytes),
            format_bytes(h.kv_bytes),
            format_bytes(h.compute_bytes + h.output_bytes),
            format_bytes(h.total_bytes),
            Text(h.verdict, style=_VERDICT_STYLE.get(h.verdict, "")),
        )
    return table


def _memory_line(plan: SplitPlan, gpus: tuple[str, ...]) -> str:
    parts = []
    for h in plan.hosts:
        where = "available" if h.host == THIS_MACHINE else "free" if h.host in gpus else "reported"
        if h.shared_bytes:  # unified GPUs' shares live in this machine's RAM too
            where += f" (for its share and {format_bytes(h.shared_bytes)} of unified GPU memory)"
        parts.append(f"{h.host} {format_bytes(h.memory_bytes)} {where}")
    return "memory: " + "; ".join(parts)


def render_split(result: SplitResult) -> None:
    """Per context: each host's layers, weights, KV, compute and whether it fits."""
    req = result.request
    out.print(
        Text(
            f"{safe(result.label, 80)}: {result.n_layer} layers + output, weights "
            f"{format_bytes(result.weights_bytes)}, split by llama.cpp's dry run "
            f"(-ngl {req.n_gpu_layers}"
            + (
                f", --tensor-split {','.join(f'{x:g}' for x in req.tensor_split)}"
                if req.tensor_split
                else ""
            )
            + ")"
        )
    )
    for plan in result.plans:
        if plan.error:
            out.print(Text(f"ctx {plan.ctx}: llama.cpp refused the context: {plan.error}"))
            continue
        out.print(_plan_table(plan, result.n_layer))
    if req.budget_bytes is not None:
        budget = result.budget
        cap = format_bytes(req.budget_bytes)
        if budget is None:
            out.print(Text(f"no context of 256 tokens fits every host within {cap} each"))
        else:
            capped = " (the trained context)" if result.budget_capped else ""
            out.print(Text(f"largest context every host holds within {cap} each: "
                           f"{budget.ctx}{capped}"))  # fmt: skip
            out.print(_plan_table(budget, result.n_layer))
    shown = next((p for p in result.plans if p.hosts), None)
    if shown is not None:
        out.print(Text(_memory_line(shown, result.gpus)))
    for message in result.notes:
        note(message)
