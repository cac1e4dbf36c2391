#!/usr/bin/env python3
"""localllm bench against native llama-bench: same model, same settings, interleaved.

Builds llama-bench from the llama.cpp tree inside llama-cpp-python's sdist (the commit
our Python package runs) with build_native.sh, then alternates native and localllm runs
for a few rounds (the order flips each round so neither always goes first). Each round,
the native run and ours back to back, holds ``/tmp/localllm-cpu.lock`` (flock(2), the
lock flock(1) takes) so the two sides of a ratio see the same machine and no other heavy
job on a shared machine runs between them. Prints every round's t/s and the ratios
localllm / native per test.

    .venv/bin/python benchmarks/native_compare.py                # pp512 and tg128, -t 2
    .venv/bin/python benchmarks/native_compare.py --rounds 5 -r 5 -t 2 --markdown
"""

from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOCK = "/tmp/localllm-cpu.lock"
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_native() -> Path:
    """build_native.sh is idempotent: it configures and builds only what changed."""
    built = HERE / "build" / "bin" / "llama-bench"
    out = subprocess.run(["bash", str(HERE / "build_native.sh")], capture_output=True, text=True)
    if out.returncode != 0:
        # Its final copy fails while another job runs a tool from bin/ ("Text file busy");
        # the binary already there is from the same tree.
        if not built.is_file():
            sys.exit(f"build_native.sh failed:\n{out.stderr.strip()}")
        print(f"note: build_native.sh failed ({out.stderr.strip().splitlines()[-1]}); "
              f"using the existing {built}")  # fmt: skip
    return built


def run_json(cmd: list[str]) -> list[dict]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}")
    return json.loads(proc.stdout)


def test_name(record: dict) -> str:
    p, n = record["n_prompt"], record["n_gen"]
    return f"pp{p}" if n == 0 else f"tg{n}" if p == 0 else f"pp{p}+tg{n}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("-p", default="512")
    ap.add_argument("-n", default="128")
    ap.add_argument("-t", default="2")
    ap.add_argument("-r", default="5")
    ap.add_argument(
        "--repack",
        choices=("0", "1"),
        help="use_extra_bufts on both sides (default: localllm's choice, 0 on AMX CPUs)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = ap.parse_args()

    native = build_native()
    localllm = [sys.executable, "-m", "localllm", "bench"]
    if args.repack is None:
        from localllm.runtime.library import choose_repack

        args.repack = "1" if choose_repack(None).repack else "0"
    settings = ["-p", args.p, "-n", args.n, "-t", args.t, "-r", args.r, "-o", "json"]
    settings += ["--repack", args.repack]
    commands = {
        "native": [str(native), "-m", str(args.model), *settings],
        "localllm": [*localllm, str(args.model), *settings],
    }
    print(f"native:   {' '.join(commands['native'])}")
    print(f"localllm: {' '.join(commands['localllm'])}")
    samples: dict[str, dict[str, list[float]]] = {"native": {}, "localllm": {}}
    meta: dict[str, dict] = {}
    for round_no in range(1, args.rounds + 1):
        order = ["native", "localllm"] if round_no % 2 else ["localllm", "native"]
        line = [f"round {round_no}:"]
        with open(LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            outputs = {tool: run_json(commands[tool]) for tool in order}
        for tool in order:
            for record in outputs[tool]:
                name = test_name(record)
                samples[tool].setdefault(name, []).append(record["avg_ts"])
                meta.setdefault(tool, record)
                line.append(f"{tool} {name} {record['avg_ts']:.2f}±{record['stddev_ts']:.2f}")
        print("  ".join(line), flush=True)

    print()
    rows = []
    for name in samples["native"]:
        nat, ours = samples["native"][name], samples["localllm"][name]
        per_round = [o / n for o, n in zip(ours, nat, strict=True)]
        rows.append(
            (name, statistics.mean(nat), statistics.mean(ours),
             statistics.mean(ours) / statistics.mean(nat), statistics.median(per_round),
             min(per_round), max(per_round))
        )  # fmt: skip
    print(f"{'test':<10} {'native t/s':>11} {'localllm t/s':>13} {'ratio':>7} "
          f"{'median':>7} {'min':>6} {'max':>6}")  # fmt: skip
    for name, nat, ours, ratio, median, low, high in rows:
        print(f"{name:<10} {nat:>11.2f} {ours:>13.2f} {ratio:>7.3f} {median:>7.3f} "
              f"{low:>6.3f} {high:>6.3f}")  # fmt: skip
    native_build = meta["native"]["build_commit"]
    ours_build = meta["localllm"]["build_commit"]
    print(
        f"\nbuilds: native {native_build}, localllm (llama-cpp-python) {ours_build}; "
        f"{meta['native']['cpu_info']}, {args.t} threads, {args.rounds} rounds x -r {args.r}"
    )
    if args.markdown:
        print("\n| test | native t/s (mean of rounds) | localllm t/s | ratio | per-round ratios |")
        print("| --- | ---: | ---: | ---: | --- |")
        for name, nat, ours, ratio, *_ in rows:
            rounds = ", ".join(
                f"{o / n:.3f}"
                for o, n in zip(samples["localllm"][name], samples["native"][name], strict=True)
            )
            print(f"| {name} | {nat:.2f} | {ours:.2f} | {ratio:.3f} | {rounds} |")


if __name__ == "__main__":
    main()
