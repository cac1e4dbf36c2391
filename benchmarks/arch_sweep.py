#!/usr/bin/env python3
"""Every architecture llama.cpp supports, dry-run, beside localllm's analytic KV model.

llama.cpp's own ``test-llama-archs -s SEED -o DIR`` (built by ``make native``) writes one
small random-weight GGUF per architecture (dense and MoE variants). Each file is dry-run
(localllm.runtime.dry_run: no_alloc, nothing allocated) at ctx 4096 with flash attention
on, with the SWA cache sized to the window (llama.cpp's tools) and at full size
(llama-cpp-python's default), and set beside ``localllm.plan.memory``'s analytic figures on
``read_model_spec(file)``. The table shows which architectures the analytic model gets
wrong. A file that makes llama.cpp abort is reported as such (files run in a worker
process, restarted after a crash).

    .venv/bin/python benchmarks/arch_sweep.py                  # writes benchmarks/arch_sweep.md
    .venv/bin/python benchmarks/arch_sweep.py --keep /tmp/archs --ctx 8192 --md -
    .venv/bin/python benchmarks/arch_sweep.py --from-dir /tmp/archs     # reuse those files
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOOL = HERE / "build" / "bin" / "test-llama-archs"
MIB = 1024 * 1024


# ------------------------------------------------------------------------- worker


def _analytic(path: Path, n_ctx: int) -> dict[str, Any]:
    from localllm.errors import LocalLLMError
    from localllm.gguf.header import read_header
    from localllm.gguf.kv_layout import layout_from_header
    from localllm.gguf.spec import read_model_spec
    from localllm.plan.memory import compute_buffer_bytes, context_shape, plan_kv

    try:
        spec = read_model_spec(path)
        layout = layout_from_header(read_header(path).kv)
        window = plan_kv(layout, n_ctx).total_bytes
        full = plan_kv(layout, n_ctx, swa_full=True).total_bytes
        compute = compute_buffer_bytes(spec, context_shape(n_ctx), flash_attn=True, layout=layout)
    except (LocalLLMError, ValueError, KeyError, ZeroDivisionError) as exc:
        return {"analytic_error": f"{type(exc).__name__}: {exc}"}
    return {
        "analytic_kv": window,
        "analytic_kv_full": full,
        "analytic_compute": compute.bytes if compute else None,
        "unmodelled": layout.unmodelled,
    }


def _dry(path: Path, n_ctx: int) -> dict[str, Any]:
    from localllm.errors import LocalLLMError
    from localllm.runtime.dry_run import DryRunSettings, plan_contexts

    settings = [DryRunSettings(n_ctx, swa_full=False), DryRunSettings(n_ctx, swa_full=True)]
    start = time.perf_counter()
    try:
        report = plan_contexts(path, settings)
    except LocalLLMError as exc:
        return {"error": str(exc)}
    window, full = report.contexts
    attention = ("kv", "swa")
    out: dict[str, Any] = {
        "arch": report.architecture,
        "seconds": time.perf_counter() - start,
        "error": window.error,
        "kv_window": window.kv_bytes,
        "kv_full": full.kv_bytes,
        "attention_window": sum(c.bytes for c in window.caches if c.kind in attention),
        "attention_full": sum(c.bytes for c in full.caches if c.kind in attention),
        "compute": window.compute_bytes,
        "exact": all(c.exact for c in window.caches),
        "caches": [
            {
                "kind": c.kind,
                "layers": c.layers,
                "cells": c.cells,
                "exact": c.exact,
                "bytes": c.bytes,
            }
            for c in window.caches
        ],
    }
    return out


def worker(paths: list[Path], n_ctx: int) -> None:
    """Print one JSON line per file; ``START`` first, so a crash names its file."""
    for path in paths:
        print(f"START {path}", flush=True)
        row = {"file": path.name, **_dry(path, n_ctx), **_analytic(path, n_ctx)}
        print(json.dumps(row), flush=True)


# --------------------------------------------------------------------------- main


def generate(tool: Path, seed: int, out: Path) -> list[Path]:
    # -o DIR: "Save generated test models to <dir> instead of running backend tests"
    # (its usage text goes through common's log, silent at the default verbosity).
    proc = subprocess.run(
        [str(tool), "-s", str(seed), "-o", str(out)], capture_output=True, text=True
    )
    paths = sorted(out.glob("*.gguf"))
    if proc.returncode != 0 or not paths:
        sys.exit(f"{tool} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return paths


def run_all(paths: list[Path], n_ctx: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    todo = list(paths)
    while todo:
        cmd = [sys.executable, __file__, "--worker", "--ctx", str(n_ctx), *map(str, todo)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        current = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                current = Path(line[6:])
            elif line.startswith("{"):
                rows.append(json.loads(line))
                todo.remove(current)  # type: ignore[arg-type]
                current = None
        if proc.returncode == 0:
            break
        if current is None:  # died outside a file: nothing to attribute
            sys.exit(f"worker failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no message"]
        rows.append({"file": current.name, "error": f"aborted ({proc.returncode}): {last[0]}"})
        todo.remove(current)
    return rows


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / MIB:.2f}"


def verdict(row: dict[str, Any]) -> str:
    if row.get("error"):
        return "dry run failed"
    if "analytic_error" in row:
        return "analytic failed"
    kv = row["analytic_kv"]
    if kv == row["kv_window"] and row["analytic_kv_full"] == row["kv_full"]:
        return "exact"
    logged = sum(not c["exact"] for c in row["caches"])
    if logged:  # llama.cpp logs those caches to 0.01 MiB only (up to 3 figures each)
        tol = logged * 3 * 0.005 * MIB
        if (
            abs(kv - row["kv_window"]) <= tol
            and abs(row["analytic_kv_full"] - row["kv_full"]) <= tol
        ):
            return "exact (~ caches: to the log's 0.01 MiB)"
    if row.get("unmodelled"):
        return f"not modelled: {row['unmodelled']}"
    if kv == row["kv_full"]:
        return "exact at full SWA only"
    others = sorted({c["kind"] for c in row["caches"]} - {"kv", "swa"})
    if others and kv in (row["attention_window"], row["attention_full"]):
        full = "" if kv == row["attention_window"] else " (at full SWA)"
        return f"attention exact{full}, misses {'+'.join(others)}"
    return "wrong"


def markdown(rows: list[dict[str, Any]], n_ctx: int, seed: int, seconds: float) -> str:
    counts: dict[str, int] = {}
    within = 0
    for row in rows:
        counts[verdict(row)] = counts.get(verdict(row), 0) + 1
        a, c = row.get("analytic_compute"), row.get("compute")
        within += bool(a and c and abs(a - c) <= 0.03 * c)
    lines = [
        "# Architecture sweep: llama.cpp's dry run beside the analytic KV model",
        "",
        f"`test-llama-archs -s {seed} -o DIR` (llama.cpp of llama-cpp-python's sdist), every file "
        f"dry-run at ctx {n_ctx}, flash attention on, ubatch 512, f16 cache "
        "(`.venv/bin/python benchmarks/arch_sweep.py`). KV (window SWA): the SWA cache sized "
        "to the window as llama.cpp's tools do; (full SWA): llama-cpp-python's default. "
        "Analytic: `localllm.plan.memory.plan_kv` on `kv_layout.layout_from_header(file)` (both "
        "SWA sizings must match), `compute_buffer_bytes` on `read_model_spec(file)`. "
        "Caches: kind x layers @ cells per stream; `~` marks a cache "
        "whose bytes are the log's 0.01 MiB figure (not rebuilt to the byte).",
        "",
        f"{len(rows)} files, {seconds:.1f} s. Analytic KV: "
        + "; ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        + f". Analytic compute within 3% of the dry run: {within} of {len(rows)}.",
        "",
        "| file | arch | caches | KV MiB (window SWA) | KV MiB (full SWA) | compute MiB "
        "| analytic KV MiB | analytic compute MiB | analytic KV |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        caches = ", ".join(
            f"{'' if c['exact'] else '~'}{c['kind']}x{c['layers']}@{c['cells']}"
            for c in row.get("caches", [])
        )
        note = row.get("error") or row.get("analytic_error") or ""
        lines.append(
            f"| {row['file']} | {row.get('arch', '')} | {caches or '—'} "
            f"| {_mib(row.get('kv_window'))} | {_mib(row.get('kv_full'))} "
            f"| {_mib(row.get('compute'))} | {_mib(row.get('analytic_kv'))} "
            f"| {_mib(row.get('analytic_compute'))} | {verdict(row)}"
            + (f": {note.replace('|', '/')[:90]}" if note else "")
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tool", type=Path, default=TOOL)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--keep", type=Path, help="write the GGUFs here and keep them")
    ap.add_argument("--from-dir", type=Path, help="dry-run the GGUFs already in this directory")
    ap.add_argument("--md", default=str(HERE / "arch_sweep.md"), help="'-' for stdout")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("files", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.files, args.ctx)
        return
    if not args.from_dir and not args.tool.is_file():
        sys.exit(f"{args.tool} is missing; build it with `make native`")
    with tempfile.TemporaryDirectory(prefix="archs-") as tmp:
        if args.from_dir:
            paths = sorted(args.from_dir.glob("*.gguf"))
        else:
            out = args.keep or Path(tmp)
            out.mkdir(parents=True, exist_ok=True)
            paths = generate(args.tool, args.seed, out)
        start = time.perf_counter()
        rows = run_all(paths, args.ctx)
        text = markdown(rows, args.ctx, args.seed, time.perf_counter() - start)
    if args.md == "-":
        sys.stdout.write(text)
    else:
        Path(args.md).write_text(text)
        print(f"wrote {args.md}: {len(rows)} files")


if __name__ == "__main__":
    main()
