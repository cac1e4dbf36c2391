"""Cold-run time of ``localllm kv-calc``: a fresh process each time, as a user runs it.

The budget is 0.4 s per run (without --verify kv-calc never imports llama_cpp). Run it
alone on the machine, e.g.::

    flock /tmp/localllm-cpu.lock .venv/bin/python benchmarks/kv_calc_cold_start.py

It times a preset (no file), the real SmolLM2 GGUF (header read) and, for reference,
``localllm --help``; it also reports the slowest imports of one kv-calc run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 0.4
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def localllm() -> list[str]:
    script = Path(sys.executable).with_name("localllm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "localllm"]


def time_runs(args: list[str], runs: int) -> list[float]:
    env = {**os.environ, "COLUMNS": "200"}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, env=env, cwd=REPO, check=False)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
    return times


def slowest_imports(args: list[str], top: int = 8) -> list[tuple[int, str]]:
    """Cumulative import times (us) of one run, from python -X importtime."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "localllm", *args],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    modules = {name.strip() for _, name in rows}
    if "llama_cpp" in modules:
        raise SystemExit("kv-calc imported llama_cpp")
    return sorted(rows, reverse=True)[:top]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    opts = parser.parse_args()
    cases = {
        "kv-calc llama-2-70b --ctx 512,4096": ["kv-calc", "llama-2-70b", "--ctx", "512,4096"],
        "kv-calc <SmolLM2 GGUF> --ctx 512,4096": ["kv-calc", str(SMOLLM2), "--ctx", "512,4096"],
        "--help": ["--help"],
    }
    over = False
    print(f"{'command':42} {'min':>7} {'median':>7} {'max':>7}   ({opts.runs} cold runs)")
    for label, args in cases.items():
        times = time_runs([*localllm(), *args], opts.runs)
        median = statistics.median(times)
        flag = "" if label == "--help" or median <= BUDGET_SECONDS else "  over budget"
        over = over or bool(flag)
        print(f"{label:42} {min(times):7.3f} {median:7.3f} {max(times):7.3f}{flag}")
    print("\nslowest imports of one kv-calc run on the GGUF (cumulative):")
    for micros, name in slowest_imports(cases["kv-calc <SmolLM2 GGUF> --ctx 512,4096"]):
        print(f"  {micros / 1000:7.1f} ms  {name.strip()}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
