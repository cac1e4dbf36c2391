#!/usr/bin/env python3
"""Interleaved rounds of two benchmark sides on one GGUF: localllm bench vs native llama-bench.

Both sides get the same file and settings (-p -n -t -r --repack); extra per-side flags
compare settings instead of tools (``--side "rp0=localllm --repack 0"``). Each measurement
runs under ``flock /tmp/localllm-cpu.lock`` (other jobs share this machine: the lock keeps
runs from overlapping) and the order flips each round so neither side always goes first.
Prints a Markdown table of every round's t/s, the medians and the ratio second/first side
(localllm/native by default), and the roofline fraction localllm reports for tg.

    .venv/bin/python benchmarks/synthetic_bench.py /tmp/syn7b.gguf --rounds 5 -r 2 -t 2 --repack 0
    .venv/bin/python benchmarks/synthetic_bench.py /tmp/syn7b.gguf -p 0 -n 64 \\
        --side "repack 0=localllm --repack 0" --side "repack 1=localllm --repack 1"

A synthetic file to measure: ``localllm bench llama-2-7b --synthetic --quant Q4_K_M
--keep-synthetic /tmp/syn7b.gguf -p 32 -n 8 -r 1``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Side", "main"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOCK = "/tmp/localllm-cpu.lock"
NATIVE = HERE / "build" / "bin" / "llama-bench"
LOCALLLM = REPO / ".venv" / "bin" / "localllm"


@dataclass
class Side:
    """One side of the comparison: a tool, its extra flags, and the records it produced."""

    label: str
    tool: str  # "native" or "localllm"
    extra: list[str]
    samples: dict[str, list[float]] = field(default_factory=dict)  # test -> t/s per round
    roofline: dict[str, list[float]] = field(default_factory=dict)  # test -> fraction
    build: str = ""

    def command(self, model: Path, settings: list[str]) -> list[str]:
        if self.tool == "native":
            return [str(NATIVE), "-m", str(model), *settings, *self.extra]
        return [str(LOCALLLM), "bench", str(model), *settings, *self.extra]


def parse_side(text: str) -> Side:
    """``LABEL=TOOL [flags...]`` (TOOL native or localllm)."""
    label, sep, rest = text.partition("=")
    words = shlex.split(rest)
    if not sep or not words or words[0] not in ("native", "localllm"):
        raise argparse.ArgumentTypeError(f"--side {text!r}: want LABEL=native|localllm [flags]")
    return Side(label.strip(), words[0], words[1:])


def test_name(record: dict) -> str:
    p, n = record["n_prompt"], record["n_gen"]
    return f"pp{p}" if n == 0 else f"tg{n}" if p == 0 else f"pp{p}+tg{n}"


def measure(side: Side, cmd: list[str]) -> list[dict]:
    """One measurement, holding the machine's CPU lock while it runs."""
    proc = subprocess.run(["flock", LOCK, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{side.label} failed ({proc.returncode}): {shlex.join(cmd)}\n"
                 f"{proc.stderr.strip()[-2000:]}")  # fmt: skip
    records = json.loads(proc.stdout)
    for record in records:
        name = test_name(record)
        side.samples.setdefault(name, []).append(record["avg_ts"])
        if record.get("roofline_fraction") is not None:
            side.roofline.setdefault(name, []).append(record["roofline_fraction"])
        side.build = record.get("build_commit", "")
    return records


def markdown(sides: list[Side]) -> str:
    """Per-round t/s of both sides per test, medians, and per-round and median ratios."""
    a, b = sides
    tests = list(a.samples)
    head = ["round"]
    for t in tests:
        head += [f"{a.label} {t}", f"{b.label} {t}", "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    rounds = len(a.samples[tests[0]])
    for i in range(rounds):
        row = [str(i + 1)]
        for t in tests:
            x, y = a.samples[t][i], b.samples[t][i]
            row += [f"{x:.2f}", f"{y:.2f}", f"{y / x:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    row = ["median"]
    for t in tests:
        x, y = statistics.median(a.samples[t]), statistics.median(b.samples[t])
        row += [f"{x:.2f}", f"{y:.2f}", f"**{y / x:.3f}**"]
    lines.append("| " + " | ".join(row) + " |")
    row = ["median of ratios"]
    for t in tests:
        ratios = [y / x for x, y in zip(a.samples[t], b.samples[t], strict=True)]
        row += ["", "", f"{statistics.median(ratios):.3f}"]
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", type=Path, help="the GGUF both sides measure")
    ap.add_argument("-p", default="512")
    ap.add_argument("-n", default="128")
    ap.add_argument("-t", default="2")
    ap.add_argument("-r", default="2")
    ap.add_argument("--repack", choices=("0", "1"), help="given to both sides")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--side", type=parse_side, action="append", help="LABEL=TOOL [flags]; two")
    ap.add_argument("--json-out", type=Path, help="write every record here")
    args = ap.parse_args()
    sides = args.side or [Side("native", "native", []), Side("localllm", "localllm", [])]
    if len(sides) != 2:
        ap.error("give --side twice (or not at all: native vs localllm)")
    if not args.model.is_file():
        ap.error(f"no such file: {args.model}")
    settings = ["-p", args.p, "-n", args.n, "-t", args.t, "-r", args.r, "-o", "json"]
    settings += ["--repack", args.repack] if args.repack else []
    for side in sides:
        print(f"{side.label}: {shlex.join(side.command(args.model, settings))}", flush=True)
    everything = []
    for round_no in range(1, args.rounds + 1):
        order = sides if round_no % 2 else sides[::-1]
        for side in order:
            started = time.monotonic()
            records = measure(side, side.command(args.model, settings))
            everything += [{"round": round_no, "side": side.label, **r} for r in records]
            got = ", ".join(f"{test_name(r)} {r['avg_ts']:.2f}" for r in records)
            print(f"round {round_no} {side.label}: {got} ({time.monotonic() - started:.0f} s)",
                  flush=True)  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps(everything, indent=1))
    print()
    print(markdown(sides))
    for side in sides:
        for t, fractions in side.roofline.items():
            print(f"\n{side.label} {t} roofline fraction: median "
                  f"{statistics.median(fractions):.1%} (rounds: "
                  f"{', '.join(f'{f:.1%}' for f in fractions)})")  # fmt: skip
    print(f"\nbuilds: {', '.join(f'{s.label} {s.build}' for s in sides)}; "
          f"{args.rounds} rounds x -r {args.r}, -t {args.t}")  # fmt: skip


if __name__ == "__main__":
    main()
