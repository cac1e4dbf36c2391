#!/usr/bin/env python3
"""`chat --resume` with and without the saved KV state: prompt tokens evaluated and time
to first token.

One session is made in the REPL (a pseudo-terminal): a long system prompt (about
``--system-tokens`` tokens) and one turn; the REPL writes the session and its KV state
after the reply, and ``/stats`` says how long that write took. Then each round resumes it
twice in fresh processes, ``chat --resume ID -p QUESTION --json``: once with the state on
disk, once with it moved aside (so the history is read again), in alternating order. Each
resume takes ``/tmp/localllm-cpu.lock`` (flock(2)) for itself. ``ttft_seconds`` counts from
before the state is loaded (the load is inside it) to the first streamed text; model load
is outside both.

    .venv/bin/python benchmarks/resume.py                           # SmolLM2-135M
    .venv/bin/python benchmarks/resume.py --preset llama-2-7b       # a synthetic 7B stand-in

Goal (issue 25): with the state, <= 20% of the prompt evaluated and the first token in
<= 25% of the time without it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = "/tmp/localllm-cpu.lock"
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "Which colour goes with the number 7?"
KEYS = ("prompt_tokens", "prompt_evaluated", "ttft_seconds", "state_load_seconds", "wall_seconds")


@contextmanager
def cpu_lock():
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def system_prompt(tokens: int, per_fact: int) -> str:
    """Numbered facts, about ``tokens`` long: a fact is ~11 tokens of SmolLM2's vocabulary,
    ~50 of a synthetic one (its text falls back to byte tokens, a space to three)."""
    colours = ["red", "green", "blue", "amber", "violet", "teal", "grey", "gold"]
    n = tokens // per_fact
    facts = [f"Fact {i}: number {i} goes with {colours[i % 8]}." for i in range(n)]
    return "You answer from these facts only. " + " ".join(facts)


def synthetic_model(preset: str, quant: str, directory: Path) -> Path:
    """A preset's tensor table with random weights (bench --synthetic's machinery)."""
    from localllm.plan.synthetic_gguf import write_synthetic
    from localllm.plan.tensor_table import tensor_table_of

    table, _label = tensor_table_of(preset, quant, directory)
    path = directory / f"{preset}-{quant}.gguf"
    write_synthetic(table, path)
    return path


def make_session(env: dict, model: Path, args: argparse.Namespace) -> tuple[str, float, str]:
    """The session (id), the KV-state write time /stats reports, its status line."""
    import pexpect

    child = pexpect.spawn(
        sys.executable,
        ["-m", "localllm", "chat", str(model), *args.chat_flags,
         "--system", system_prompt(args.system_tokens, args.per_fact)],
        env=env, cwd=str(REPO), encoding="utf-8", timeout=3600, dimensions=(50, 200),
    )  # fmt: skip
    child.expect_exact(">>> ")
    child.sendline("Remember these facts.")
    if child.expect([r"\d+ in · \d+ out[^\n]*", r"error: [^\n]*"]) == 1:
        raise SystemExit(f"the first turn failed: {child.match[0]}")
    status = child.match[0].strip()
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"KV state: (\d+) tokens, ([^\n]+) written in ([\d.]+) s")
    written = float(child.match[3])
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    sessions = list((Path(env["XDG_STATE_HOME"]) / "localllm" / "sessions").glob("*.json"))
    assert len(sessions) == 1, sessions
    return sessions[0].stem, written, status


def resume_once(env: dict, session_id: str) -> dict:
    cmd = [sys.executable, "-m", "localllm", "chat", "--resume", session_id, "-p", QUESTION,
           "--json"]  # fmt: skip
    with cpu_lock():
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"resume failed ({proc.returncode}): {proc.stderr[-2000:]}")
    stats = json.loads(proc.stdout)["stats"]
    note = next((ln for ln in proc.stderr.splitlines() if "KV state" in ln), "")
    return {**stats, "wall_seconds": wall, "note": re.sub(r"\x1b\[[0-9;]*m", "", note)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", help="a synthetic stand-in of this preset (llama-2-7b, ...)")
    ap.add_argument("--quant", default="Q4_0", help="the preset's quantization")
    ap.add_argument("--model", default=str(SMOLLM2), help="a GGUF (without --preset)")
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=3072)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the synthetic file and state go")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="localllm-resume-", dir=args.workdir))
    try:
        env = {**os.environ, "COLUMNS": "200", "TERM": "xterm", "NO_COLOR": "1",
               "XDG_STATE_HOME": str(work / "state"), "XDG_CACHE_HOME": str(work / "cache"),
               "PYTHONPATH": str(REPO)}  # fmt: skip
        if args.preset:
            model = synthetic_model(args.preset, args.quant, work)
            # A stand-in has no chat template of its own: llama.cpp's chatml.
            template = ["--template", "chatml"]
            args.per_fact = 50
        else:
            model, template = Path(args.model), []
            args.per_fact = 11
        args.chat_flags = ["--temp", "0", "--seed", "1", "--max-tokens", "8", "--ctx",
                           str(args.ctx), "-t", str(args.threads), *template]  # fmt: skip
        with cpu_lock():
            session_id, written, status = make_session(env, model, args)
        kv = work / "cache" / "localllm" / "kv"
        aside = work / "aside"
        aside.mkdir()
        state_bytes = sum(p.stat().st_size for p in kv.iterdir())
        print(f"model {model.name}; session {session_id}; first turn: {status}")
        print(f"KV state written after the reply: {state_bytes / 2**20:.1f} MiB in {written:.2f} s")
        rows: dict[str, list[dict]] = {"state": [], "no state": []}
        for r in range(args.rounds):
            order = ["state", "no state"] if r % 2 == 0 else ["no state", "state"]
            for side in order:
                if side == "no state":
                    for p in kv.iterdir():
                        shutil.move(p, aside / p.name)
                rows[side].append(resume_once(env, session_id))
                if side == "no state":
                    for p in aside.iterdir():
                        shutil.move(p, kv / p.name)
                s = rows[side][-1]
                print(f"round {r + 1} {side:8}: {s['prompt_evaluated']}/{s['prompt_tokens']} "
                      f"evaluated, {s['prompt_from_state']} from the state, ttft "
                      f"{s['ttft_seconds']:.2f} s (state load {s['state_load_seconds']:.2f} s), "
                      f"wall {s['wall_seconds']:.1f} s", flush=True)  # fmt: skip
        med = {
            side: {k: statistics.median(x[k] for x in xs) for k in KEYS}
            for side, xs in rows.items()
        }
        ratios = [a["ttft_seconds"] / b["ttft_seconds"] for a, b in zip(rows["state"],
                  rows["no state"], strict=True)]  # fmt: skip
        s, n = med["state"], med["no state"]
        print("\n| | prompt tokens | evaluated | first token (s) | state load (s) | wall (s) |")
        print("|---|---|---|---|---|---|")
        for side in ("no state", "state"):
            m = med[side]
            print(f"| {side} | {m['prompt_tokens']:.0f} | {m['prompt_evaluated']:.0f} | "
                  f"{m['ttft_seconds']:.2f} | {m['state_load_seconds']:.2f} | "
                  f"{m['wall_seconds']:.1f} |")  # fmt: skip
        print(f"\nevaluated with the state: {100 * s['prompt_evaluated'] / s['prompt_tokens']:.1f}%"
              f" of the prompt; first token {100 * s['ttft_seconds'] / n['ttft_seconds']:.1f}% "
              f"of the time without it (medians; per-round ratios "
              f"{', '.join(f'{100 * x:.1f}%' for x in ratios)})")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
