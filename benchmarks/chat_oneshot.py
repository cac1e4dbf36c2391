#!/usr/bin/env python3
"""One-shot `localllm chat -p` against a plain llama-cpp-python script: whole-process wall
time, peak RSS and CPU time, what a script calling `chat -p` in a loop pays per call.

Both sides are fresh processes answering the same prompt from the same file with the same
settings: localllm's defaults (context min(trained, 4096), flash attention on, threads =
physical cores, temperature 0, no repeat penalty, at most 16 tokens). The plain side is
the eight lines a llama-cpp-python user writes (PLAIN below). Each round runs both, in
alternating order, under /tmp/localllm-cpu.lock; the figure is the median of the
per-round ratios (ours / plain). CPU time (user + system, from wait4) is printed too:
on a shared machine it moves far less with other load than wall time does. One
warm-up of each side first fills the page cache and localllm's caches (its dry-run
figures, under a temporary $XDG_CACHE_HOME, as after a user's first call); `--cold`
adds rounds of localllm with an empty cache, for the first call's price.

    .venv/bin/python -u benchmarks/chat_oneshot.py --rounds 11 [--base ../main]

Goal (issue 23): wall <= 1.2x and peak RSS <= 1.1x the plain script.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCK = "/tmp/localllm-cpu.lock"

PLAIN = """\
import sys
from llama_cpp import Llama
path, prompt, threads, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
kw = dict(n_ctx=4096, n_threads=threads, n_threads_batch=threads, flash_attn=True)
llm = Llama(path, verbose=False, **kw)
msgs = [{"role": "user", "content": prompt}]
out = llm.create_chat_completion(msgs, temperature=0, repeat_penalty=1.0, max_tokens=n)
print(out["choices"][0]["message"]["content"])
"""


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str, float]:
    """One run: wall time, peak RSS (ru_maxrss of this child alone, via wait4), its stdout
    and its CPU time (user + system: what it cost, whatever else the machine ran)."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: exec with stdout to a pipe-less temp file
        try:
            os.chdir(env.get("_ONESHOT_CWD", str(REPO)))
            out_fd = os.open(env["_ONESHOT_OUT"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err_fd = os.open(env["_ONESHOT_ERR"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out_fd, 1)
            os.dup2(err_fd, 2)
            os.execve(cmd[0], cmd, env)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    out = Path(env["_ONESHOT_OUT"]).read_text(errors="replace").strip()
    if os.waitstatus_to_exitcode(status) != 0:
        err = Path(env["_ONESHOT_ERR"]).read_text(errors="replace").strip()
        sys.exit(f"{' '.join(cmd[:4])} failed: {err[-400:]}")
    return wall, usage.ru_maxrss * 1024, out, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--prompt", default="hi")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--cold", action="store_true", help="also time localllm with empty caches")
    ap.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK}")
    ap.add_argument(
        "--base", metavar="CHECKOUT",
        help="also time `chat -p` from another checkout (e.g. main's) in the same rounds",
    )  # fmt: skip
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from localllm.machine import physical_cores

    threads = physical_cores()
    work = Path(tempfile.mkdtemp(prefix="chat-oneshot-"))
    plain_py = work / "plain.py"
    plain_py.write_text(PLAIN)
    python = str(REPO / ".venv" / "bin" / "python")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "XDG_CACHE_HOME": str(work / "cache"),
        "XDG_STATE_HOME": str(work / "state"),
        "LOCALLLM_NO_HISTORY": "1",
        "NO_COLOR": "1",
        "_ONESHOT_OUT": str(work / "out"),
        "_ONESHOT_ERR": str(work / "err"),
    }
    plain = [python, str(plain_py), args.model, args.prompt, str(threads), str(args.max_tokens)]
    ours = [python, "-m", "localllm", "chat", args.model, "-p", args.prompt, "--temp", "0",
            "--max-tokens", str(args.max_tokens)]  # fmt: skip

    sides = [("plain", plain), ("ours", ours)]
    if args.base:
        root = str(Path(args.base).resolve())
        # `python -m` puts the working directory first on sys.path: run it from there.
        base_env = {**env, "PYTHONPATH": root, "_ONESHOT_CWD": root}
        sides.append(("base", ours))

    lock = open(LOCK, "a")  # noqa: SIM115 (held across rounds, released per round)

    def locked(fn):  # type: ignore[no-untyped-def]
        if not args.no_lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return fn()
        finally:
            if not args.no_lock:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # Warm-up: page cache, and localllm's caches as after a user's first run.
    _, _, plain_reply, _ = locked(lambda: run_measured(plain, env))
    _, _, ours_reply, _ = locked(lambda: run_measured(ours, env))
    if args.base:
        locked(lambda: run_measured(ours, base_env))
    print(f"plain reply: {plain_reply!r}\nours reply:  {ours_reply!r}")
    print(
        f"threads {threads}, {args.rounds} rounds, {args.max_tokens} tokens, prompt {args.prompt!r}"
    )

    rows = []
    for r in range(args.rounds):
        order = sides[r % len(sides) :] + sides[: r % len(sides)]  # rotate who goes first

        def one_round(order=order):  # type: ignore[no-untyped-def]
            return {
                name: run_measured(cmd, base_env if name == "base" else env) for name, cmd in order
            }

        got = locked(one_round)
        rows.append(got)
        p, o = got["plain"], got["ours"]
        print(f"round {r + 1:2d}: plain {p[0]:.3f} s {p[1] / 2**20:6.1f} MiB | "
              f"ours {o[0]:.3f} s {o[1] / 2**20:6.1f} MiB | "
              f"wall x{o[0] / p[0]:.3f} rss x{o[1] / p[1]:.3f} cpu x{o[3] / p[3]:.3f}"
              + (f" | base {got['base'][0]:.3f} s x{got['base'][0] / p[0]:.3f}"
                 if "base" in got else ""))  # fmt: skip

    def med(side: str, i: int) -> float:
        return statistics.median(row[side][i] for row in rows)

    wall_ratio = statistics.median(row["ours"][0] / row["plain"][0] for row in rows)
    rss_ratio = statistics.median(row["ours"][1] / row["plain"][1] for row in rows)
    cpu_ratio = statistics.median(row["ours"][3] / row["plain"][3] for row in rows)
    print()
    print("| | plain llama-cpp-python | localllm chat -p | ratio (median of rounds) |")
    print("|---|---|---|---|")
    print(f"| wall, median | {med('plain', 0):.3f} s | {med('ours', 0):.3f} s | {wall_ratio:.3f} |")
    print(f"| peak RSS, median | {med('plain', 1) / 2**20:.1f} MiB | "
          f"{med('ours', 1) / 2**20:.1f} MiB | {rss_ratio:.3f} |")  # fmt: skip
    print(f"| CPU time (user + system), median | {med('plain', 3):.3f} s | "
          f"{med('ours', 3):.3f} s | {cpu_ratio:.3f} |")  # fmt: skip
    if args.base:
        base_ratio = statistics.median(row["base"][0] / row["plain"][0] for row in rows)
        base_rss = statistics.median(row["base"][1] / row["plain"][1] for row in rows)
        print(f"| base checkout: wall, peak RSS | | {med('base', 0):.3f} s, "
              f"{med('base', 1) / 2**20:.1f} MiB | {base_ratio:.3f}, {base_rss:.3f} |")  # fmt: skip
    if args.cold:
        cold = []
        for r in range(max(3, args.rounds // 3)):
            cold_env = {**env, "XDG_CACHE_HOME": str(work / f"cold-{r}")}
            got = locked(lambda e=cold_env: (run_measured(plain, e), run_measured(ours, e)))
            cold.append(got[1][0] / got[0][0])
        print(f"| wall, first run (empty caches) | | | {statistics.median(cold):.3f} |")


if __name__ == "__main__":
    main()
