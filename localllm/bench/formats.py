"""Bench records in llama-bench's output formats: md, csv, json, jsonl.

The CSV and JSON printers write every record field (llama-bench's, then ours); the
Markdown table has llama-bench's columns and widths, a roofline column, and the build and
machine lines under it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localllm.bench.record import EXTRA_FIELDS, LLAMA_BENCH_FIELDS, BenchResult, Environment
from localllm.bench.request import DEFAULT_BATCH, DEFAULT_UBATCH, BenchRequest
from localllm.machine import Bandwidth
from localllm.runtime.params import FLASH_ATTN_TYPES
from localllm.text import escape_untrusted

__all__ = [
    "describe_environment",
    "format_csv_header",
    "format_csv_row",
    "format_json",
    "format_jsonl_row",
    "format_markdown",
]


def _csv_value(name: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"  # std::to_string(bool), as llama-bench writes it
    if name in ("avg_ts", "stddev_ts") or isinstance(value, float):
        return f"{value:f}"
    return str(value)


def _csv_line(values: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n").writerow(values)
    return buf.getvalue()


def _csv_fields() -> list[str]:
    return [*LLAMA_BENCH_FIELDS, *EXTRA_FIELDS]


def format_csv_header() -> str:
    """llama-bench's CSV header line, then our columns."""
    return ",".join(_csv_fields()) + "\n"


def format_csv_row(result: BenchResult) -> str:
    record = result.record()
    return _csv_line([_csv_value(name, record[name]) for name in _csv_fields()])


def format_json(results: Sequence[BenchResult]) -> str:
    """A JSON array of records, as llama-bench's ``-o json``."""
    return json.dumps([r.record() for r in results], indent=2) + "\n"


def format_jsonl_row(result: BenchResult) -> str:
    return json.dumps(result.record()) + "\n"


# Markdown columns as llama-bench's markdown_printer lays them out (width < 0: left-aligned).
_MD_WIDTHS = {"model": -30, "size": 10, "params": 10, "backend": -10, "n_threads": 7,
              "n_batch": 7, "n_ubatch": 8, "type_k": 6, "type_v": 6, "flash_attn": 3,
              "n_ctx": 7, "test": 15, "t/s": 20, "roofline": 8}  # fmt: skip
_MD_NAMES = {"n_threads": "threads", "flash_attn": "fa", "n_ctx": "ctx"}


def _md_fields(request: BenchRequest, results: Sequence[BenchResult]) -> list[str]:
    fields = ["model", "size", "params", "backend", "n_threads"]  # threads: always on CPU
    for name, default in (("n_batch", (DEFAULT_BATCH,)), ("n_ubatch", (DEFAULT_UBATCH,)),
                          ("type_k", ("f16",)), ("type_v", ("f16",)),
                          ("flash_attn", ("auto",))):  # fmt: skip
        if getattr(request, name) != default:
            fields.append(name)
    if any(r.test.ctx_asked for r in results):
        fields.append("n_ctx")
    fields += ["test", "t/s"]
    if any(r.roofline_fraction is not None for r in results):
        fields.append("roofline")
    return fields


def format_markdown(
    request: BenchRequest,
    results: Sequence[BenchResult],
    environment: Environment | None = None,
    bandwidth: Bandwidth | None = None,
) -> str:
    """llama-bench's markdown table (same columns and widths), a roofline column, the build."""
    fields = _md_fields(request, results)
    rows = [_md_cells(r) for r in results]
    # llama-bench's widths, widened where a cell is longer (" (synthetic)" after a model
    # type) so the columns stay aligned.
    widths = {}
    for f in fields:
        width = max([abs(_MD_WIDTHS[f])] + [len(cells[f]) for cells in rows])
        widths[f] = -width if _MD_WIDTHS[f] < 0 else width
    header, rule = "|", "|"
    for f in fields:
        width = widths[f]
        header += f" {_MD_NAMES.get(f, f):{'<' if width < 0 else '>'}{abs(width)}} |"
        rule += f" {'-' * (abs(width) - 1)}{':' if width > 0 else '-'} |"
    lines = [header, rule]
    for cells in rows:
        line = "|"
        for f in fields:
            width = widths[f]
            line += f" {cells[f]:{'<' if width < 0 else '>'}{abs(width)}} |"
        lines.append(line)
    env = environment or (results[0].environment if results else None)
    if env is not None:
        # bench --synthetic --quant A,B: every stand-in's source
        source = ", ".join(dict.fromkeys(r.synthetic for r in results if r.synthetic)) or None
        lines += [
            "",
            f"build: {env.llama_cpp_build} (0)",
            *describe_environment(env, synthetic_source=source),
        ]
        bandwidth = bandwidth or (results[0].bandwidth if results else None)
        if bandwidth is not None and any(r.roofline_fraction is not None for r in results):
            lines.append(
                f"roofline: tg t/s as a share of {bandwidth.bytes_per_s / 1e9:.1f} GB/s memory "
                "read bandwidth / bytes read per generated token (weights + KV)"
            )
    return "\n".join(lines) + "\n"


def _md_cells(r: BenchResult) -> dict[str, str]:
    """One result's markdown cells, by field."""
    size = r.model_size
    return {
        "model": escape_untrusted(r.model_type) + (" (synthetic)" if r.synthetic else ""),
        "size": f"{size / 2**20:.2f} MiB" if size < 2**30 else f"{size / 2**30:.2f} GiB",
        "params": f"{r.model_n_params / 1e6:.2f} M"
        if r.model_n_params < 1e9
        else f"{r.model_n_params / 1e9:.2f} B",
        "backend": r.backends,  # llama-bench's: GPU backends, then RPC with --rpc
        "n_threads": str(r.test.n_threads),
        "n_batch": str(r.test.n_batch),
        "n_ubatch": str(r.test.n_ubatch),
        "type_k": r.test.type_k,
        "type_v": r.test.type_v,
        "flash_attn": str(FLASH_ATTN_TYPES[r.test.flash_attn]),
        "n_ctx": str(r.test.n_ctx),
        "test": r.test.name,
        "t/s": f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}",
        "roofline": f"{r.roofline_fraction:.1%}" if r.roofline_fraction is not None else "",
    }


def describe_environment(env: Environment, *, synthetic_source: str | None = None) -> list[str]:
    """The machine and software behind a result, in a few human lines."""
    return [
        f"localllm {env.localllm_version}, llama-cpp-python {env.llama_cpp_python_version}, "
        f"ggml {env.ggml_version}; Python {env.python_version}; {env.os}",
        f"{env.cpu_model}: {env.cpu_cores} cores, {env.cpu_threads} threads, "
        f"{env.ram_bytes / 2**30:.1f} GiB RAM",
        f"model: synthetic weights with the tensor table of {escape_untrusted(synthetic_source)}"
        " (random: not hashed)"
        if synthetic_source
        else f"model: {escape_untrusted(Path(env.model_path).name)} sha256 {env.model_sha256}",
    ]
