"""Context extension on SmolLM2-135M: perplexity and speed per context and RoPE method.

Runs ``localllm.ppl.perplexity`` (the llama-perplexity method) on one chunk of the built-in pydoc
text at 4k, 8k (trained), 16k and 32k tokens with none / linear / ntk / yarn, checks a
few cells against the native ``llama-perplexity`` built from the same llama.cpp
sources, and writes ``benchmarks/rope_extension.md`` (plus the raw numbers as JSON).

Each cell takes ``/tmp/localllm-cpu.lock`` for itself (flock(2), the lock flock(1) uses),
so other CPU-heavy jobs on a shared machine wait between cells, not for the whole grid.

    .venv/bin/python benchmarks/rope_extension.py              # the full grid (long)
    .venv/bin/python benchmarks/rope_extension.py --ctx 4096 --ctx 16384 --native 16384:yarn
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from localllm.gguf.spec import read_model_spec  # noqa: E402
from localllm.plan.rope import DEFAULT_METHOD, ROPE_METHODS, RopePlan, plan_rope  # noqa: E402
from localllm.ppl.perplexity import PerplexityResult, builtin_text, iter_perplexity  # noqa: E402
from localllm.runtime import RopeParams, llama_cpp_version  # noqa: E402

MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
NATIVE = REPO / "benchmarks" / "build" / "bin" / "llama-perplexity"
LOCK = Path("/tmp/localllm-cpu.lock")
OUT_MD = REPO / "benchmarks" / "rope_extension.md"
OUT_JSON = REPO / "benchmarks" / "rope_extension.json"
CONTEXTS = (4096, 8192, 16384, 32768)
NATIVE_CELLS = ("4096:none", "16384:ntk", "16384:yarn")
SPEED_NOTE = """\
Speeds are rough: the machine (2 cores) was shared with other jobs. Each cell held
`/tmp/localllm-cpu.lock`, but test runs that do not take the lock overlapped some
cells (the 4k and 8k rows especially, which is why they read slower than 16k).
The RoPE method itself does not change the amount of work.
"""


@dataclass(frozen=True)
class Cell:
    ctx: int
    method: str  # asked for
    applied: str  # what the plan applied (none within the trained length)
    ppl: float
    ppl_stderr: float
    tokens_per_second: float
    seconds: float
    description: str


@dataclass(frozen=True)
class NativeCheck:
    ctx: int
    method: str
    command: str
    ppl: float
    ppl_stderr: float
    localllm_ppl: float

    @property
    def diff_percent(self) -> float:
        return 100.0 * (self.localllm_ppl - self.ppl) / self.ppl


@contextmanager
def cpu_lock(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    with LOCK.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_cell(ctx: int, method: str, lock: bool) -> Cell:
    with cpu_lock(lock):
        result = None
        for item in iter_perplexity(str(MODEL), None, ctx, method, chunks=1):
            if isinstance(item, PerplexityResult):
                result = item
    assert result is not None
    return Cell(
        ctx=ctx,
        method=method,
        applied=result.rope.method,
        ppl=result.ppl,
        ppl_stderr=result.ppl_stderr,
        tokens_per_second=result.tokens_per_second,
        seconds=result.seconds,
        description=result.rope.description,
    )


def native_rope_flags(params: RopeParams) -> list[str]:
    """llama-perplexity flags that ask for the same RoPE settings as ``params``."""
    flags: list[str] = []
    if params.scaling is not None:
        flags += ["--rope-scaling", params.scaling]
    if params.freq_base:
        flags += ["--rope-freq-base", repr(params.freq_base)]
    if params.freq_scale:
        flags += ["--rope-freq-scale", repr(params.freq_scale)]
    if params.yarn_orig_ctx:
        flags += ["--yarn-orig-ctx", str(params.yarn_orig_ctx)]
    return flags


def run_native(plan: RopePlan, text_file: Path, lock: bool) -> tuple[str, float, float]:
    args = [str(NATIVE), "-m", str(MODEL), "-f", str(text_file), "-c", str(plan.n_ctx)]
    args += ["--chunks", "1", *native_rope_flags(plan.params)]
    with cpu_lock(lock):
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
    found = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"llama-perplexity failed ({proc.returncode}): {proc.stderr[-1500:]}")
    shown = " ".join(a if a != str(text_file) else "pydoc.txt" for a in args)
    return shown.replace(str(REPO) + "/", ""), float(found[1]), float(found[2])


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; this is a report for everyone
    os.replace(tmp, path)


def render(cells: list[Cell], checks: list[NativeCheck], argv: list[str], wall: float) -> str:
    spec = read_model_spec(MODEL)
    by_key = {(c.ctx, c.method): c for c in cells}
    contexts = sorted({c.ctx for c in cells})
    lines = [
        "# RoPE context extension on SmolLM2-135M",
        "",
        "Made by `benchmarks/rope_extension.py`; do not edit by hand. Perplexity is",
        "measured the way `llama-perplexity` measures it (`localllm ppl`), on **one chunk**",
        f"of the built-in pydoc text (Python {platform.python_version()}'s `pydoc_data.topics`),",
        "so each cell is one chunk of `ctx` tokens with its second half scored.",
        "",
        f"- model: `{MODEL.name}` (trained context {spec.n_ctx_train}, RoPE base "
        f"{spec.rope_freq_base:g}, {spec.rope_dim or spec.head_dim} rotary dims)",
        f"- llama-cpp-python {llama_cpp_version()}, CPU, {os.cpu_count()} cores, "
        f"flash attention on, f16 KV cache, batch min(2048, ctx), ubatch 512",
        f"- command: `{' '.join(['.venv/bin/python', 'benchmarks/rope_extension.py', *argv])}`"
        f" ({wall / 60:.0f} min wall)",
        "",
        "## Perplexity (lower is better), ± its standard error",
        "",
        "| ctx | " + " | ".join(ROPE_METHODS) + " |",
        "|---:|" + "---:|" * len(ROPE_METHODS),
    ]
    for ctx in contexts:
        row = [f"{ctx}{' (trained)' if ctx == spec.n_ctx_train else ''}"]
        for method in ROPE_METHODS:
            cell = by_key.get((ctx, method))
            if cell is None:
                row.append("-")
            elif cell.applied != method:
                row.append(f"= none ({cell.ppl:.2f})")
            else:
                row.append(f"{cell.ppl:.2f} ± {cell.ppl_stderr:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Within the trained length no method changes anything (the plan is `none`), so",
        "those rows were measured once; `= none` repeats that number.",
        "",
        "## Speed (tokens/s evaluated, prompt processing of the whole chunk)",
        "",
        "| ctx | " + " | ".join(ROPE_METHODS) + " |",
        "|---:|" + "---:|" * len(ROPE_METHODS),
    ]
    for ctx in contexts:
        row = [str(ctx)]
        for method in ROPE_METHODS:
            cell = by_key.get((ctx, method))
            row.append("-" if cell is None else f"{cell.tokens_per_second:.0f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *SPEED_NOTE.splitlines(), "", "## What each method applied", ""]
    for cell in cells:
        if cell.applied == cell.method and cell.ctx > spec.n_ctx_train:
            lines.append(f"- {cell.ctx}, `{cell.method}`: {cell.description}")
    if checks:
        lines += [
            "",
            "## Agreement with the native llama-perplexity",
            "",
            "Same text file, same settings, `llama-perplexity` built from the same llama.cpp",
            "sources by `benchmarks/build_native.sh`:",
            "",
            "| ctx | method | llama-perplexity | localllm ppl | difference |",
            "|---:|---|---:|---:|---:|",
        ]
        for check in checks:
            lines.append(
                f"| {check.ctx} | {check.method} | {check.ppl:.4f} ± {check.ppl_stderr:.5f} | "
                f"{check.localllm_ppl:.4f} | {check.diff_percent:+.3f}% |"
            )
        lines += [
            "",
            "Commands (pydoc.txt is `localllm.ppl.perplexity.builtin_text()` written to a file):",
            "",
        ]
        lines += [f"    {check.command}" for check in checks]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, action="append", help="contexts (default: 4k-32k)")
    parser.add_argument(
        "--native",
        action="append",
        default=None,
        metavar="CTX:METHOD",
        help="cells to check against llama-perplexity (default: 4096:none 16384:ntk 16384:yarn)",
    )
    parser.add_argument("--no-lock", action="store_true", help="do not take the CPU lock")
    args = parser.parse_args(argv)
    contexts = args.ctx or list(CONTEXTS)
    natives = args.native if args.native is not None else list(NATIVE_CELLS)
    lock = not args.no_lock
    spec = read_model_spec(MODEL)
    start = time.perf_counter()

    cells: list[Cell] = []
    for ctx in contexts:
        baseline: Cell | None = None
        for method in ROPE_METHODS:
            plan = plan_rope(spec, ctx, method)
            if plan.method != method and baseline is not None:
                # Within the trained length every method plans "none": one run serves all.
                cells.append(Cell(**{**baseline.__dict__, "method": method}))
                continue
            cell = run_cell(ctx, method, lock)
            print(
                f"ctx {ctx:>6} {method:<6} ppl {cell.ppl:8.3f} ± {cell.ppl_stderr:.3f} "
                f"{cell.tokens_per_second:6.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )
            cells.append(cell)
            if method == "none":
                baseline = cell

    checks: list[NativeCheck] = []
    if natives and NATIVE.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            text_file = Path(tmp) / "pydoc.txt"
            text_file.write_text(builtin_text(), encoding="utf-8")
            for item in natives:
                ctx_text, _, method = item.partition(":")
                ctx = int(ctx_text)
                plan = plan_rope(spec, ctx, method)
                mine = next((c for c in cells if c.ctx == ctx and c.method == method), None)
                if mine is None:
                    mine = run_cell(ctx, method, lock)
                command, ppl, err = run_native(plan, text_file, lock)
                checks.append(NativeCheck(ctx, method, command, ppl, err, mine.ppl))
                print(f"native {item}: {ppl:.4f} vs {mine.ppl:.4f}", file=sys.stderr)
    elif natives:
        print(f"{NATIVE} not built: skipping the native checks", file=sys.stderr)

    wall = time.perf_counter() - start
    write_atomically(OUT_MD, render(cells, checks, argv, wall))
    raw = {
        "default_method": DEFAULT_METHOD,
        "cells": [c.__dict__ for c in cells],
        "native": [{**c.__dict__, "diff_percent": c.diff_percent} for c in checks],
    }
    write_atomically(OUT_JSON, json.dumps(raw, indent=2) + "\n")
    print(f"wrote {OUT_MD}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
