#!/usr/bin/env python3
"""Real weights against synthetic twins of the same tensor table, in one page-cache state.

Writes the twins from the real file's table (localllm.plan.synthetic_gguf, as `bench --synthetic`
does; and an i.i.d. variant without the block-scale spread), then runs interleaved rounds
of native llama-bench on each file, order rotated every round, each run under
``flock /tmp/localllm-cpu.lock``. Before every run the file is dropped from the page cache
(fsync + POSIX_FADV_DONTNEED), so llama.cpp reads every file from disk into the same kind
of page-cache folios: how a file happens to be cached moves tg by more than the weights do
(2 MiB folios are mapped as huge pages). ``--warm-copy`` adds the real bytes copied with
shutil.copyfile and left cached as the copy wrote them, to show that effect.

    .venv/bin/python benchmarks/synthetic_vs_real.py models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --rounds 10 --warm-copy

Prints a Markdown table: t/s per round and file, medians, and each file's median per-round
ratio to the real file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from localllm.plan import synthetic_gguf as synthetic  # noqa: E402
from localllm.plan.tensor_table import table_from_gguf  # noqa: E402

LOCK = "/tmp/localllm-cpu.lock"
NATIVE = HERE / "build" / "bin" / "llama-bench"


def drop_from_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_twins(real: Path, workdir: Path, warm_copy: bool) -> dict[str, tuple[Path, bool]]:
    """label -> (file, drop it from the cache before each run)."""
    table = table_from_gguf(real)
    files = {"real": (real, True)}
    twin = workdir / "synthetic.gguf"
    synthetic.write_synthetic(table, twin)
    files["synthetic"] = (twin, True)
    # The generator before block scales were spread: i.i.d. normal weights.
    iid = workdir / "iid.gguf"
    synthetic.write_synthetic(table, iid, scale_sigma=0.0)
    files["i.i.d."] = (iid, True)
    if warm_copy:
        copy = workdir / "real-copy.gguf"
        shutil.copyfile(real, copy)
        files["real, warm copy"] = (copy, False)
    return files


def run(path: Path, cold: bool, settings: list[str]) -> dict[str, float]:
    """One llama-bench run: test name -> t/s."""
    if cold:
        drop_from_cache(path)
    out = subprocess.run(
        ["flock", LOCK, str(NATIVE), "-m", str(path), *settings, "-o", "jsonl"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    results = {}
    for line in out.splitlines():
        record = json.loads(line)
        test = f"pp{record['n_prompt']}" if record["n_gen"] == 0 else f"tg{record['n_gen']}"
        results[test] = record["avg_ts"]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("-p", default="512")
    parser.add_argument("-n", default="128")
    parser.add_argument("-r", default="5")
    parser.add_argument("-t", default="2")
    parser.add_argument("--warm-copy", action="store_true")
    args = parser.parse_args()
    settings = ["-p", args.p, "-n", args.n, "-r", args.r, "-t", args.t]
    print(f"# {NATIVE.relative_to(REPO)} -m FILE {' '.join(settings)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="synthetic-vs-real-", dir="/tmp") as tmp:
        files = write_twins(args.model, Path(tmp), args.warm_copy)
        labels = list(files)
        samples: dict[tuple[str, str], list[float]] = {}
        tests: list[str] = []
        for round_no in range(args.rounds):
            shift = round_no % len(labels)
            for label in labels[shift:] + labels[:shift]:
                path, cold = files[label]
                for test, ts in run(path, cold, settings).items():
                    samples.setdefault((label, test), []).append(ts)
                    if test not in tests:
                        tests.append(test)
                    print(f"round {round_no + 1} {label} {test} {ts:.2f}", flush=True)
    print()
    for test in tests:
        print(
            f"| round | {' | '.join(labels)} | "
            + " | ".join(f"{x}/real" for x in labels[1:])
            + " |"
        )
        print("|---:|" + "---:|" * (2 * len(labels) - 1))
        real = samples[("real", test)]
        for i in range(args.rounds):
            row = [f"{samples[(x, test)][i]:.1f}" for x in labels]
            row += [f"{samples[(x, test)][i] / real[i]:.3f}" for x in labels[1:]]
            print(f"| {i + 1} | " + " | ".join(row) + " |")
        medians = [f"{statistics.median(samples[(x, test)]):.1f}" for x in labels]
        ratios = [
            statistics.median(a / b for a, b in zip(samples[(x, test)], real, strict=True))
            for x in labels[1:]
        ]
        cells = medians + [f"**{r:.3f}**" for r in ratios]
        print(f"| median ({test}) | " + " | ".join(cells) + " |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
