"""The view of `localllm system`: backends, devices, CPU, defaults and memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.table import Table
from rich.text import Text

from localllm.text import format_bytes
from localllm.views.console import out, print_unwrapped, safe

if TYPE_CHECKING:
    from localllm.inventory.system import SystemReport

__all__ = ["render_system"]


def _devices_table(report: SystemReport) -> Table:
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1))
    for name in ("device", "type", "backend", "description", "free", "total"):
        table.add_column(name, justify="right" if name in ("free", "total") else "left")
    for d in report.devices:
        # ggml-cpu cannot tell free memory: it reports the total; say so rather than repeat it.
        free = "-" if d.type == "CPU" else format_bytes(d.memory_free_bytes)
        kind = d.type + (" (unified)" if d.unified else "")
        table.add_row(
            safe(d.name, 20),
            kind,
            safe(d.backend, 20),
            safe(d.description, 60),
            free,
            format_bytes(d.memory_total_bytes),
        )
    return table


def render_system(report: SystemReport) -> None:
    """What llama.cpp sees here, then the defaults localllm derives from it."""
    out.print(
        Text(f"llama-cpp-python {report.llama_cpp_python}; backends: {', '.join(report.backends)}")
    )
    print_unwrapped(_devices_table(report))
    out.print(Text(f"CPU features: {' '.join(report.cpu_features) or '-'}"))
    out.print(Text(f"threads default: {report.threads} (physical cores, as llama.cpp)"))
    out.print(Text(f"repack default: {'on' if report.repack else 'off'} ({report.repack_reason})"))
    out.print(Text(f"-ngl default: {report.gpu_layers_default}"))
    out.print(
        Text(
            f"memory: {format_bytes(report.ram_bytes)} RAM, "
            f"{format_bytes(report.available_memory_bytes)} available "
            f"(source: {report.available_memory_source})"
        )
    )
    if report.bandwidth_bytes_per_s is not None:
        rate = f"{report.bandwidth_bytes_per_s / 1e9:.1f} GB/s"
        out.print(Text(f"memory bandwidth: {rate} ({report.bandwidth_note})"))
    else:
        out.print(Text(f"memory bandwidth: {report.bandwidth_note}"))
