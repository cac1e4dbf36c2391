#!/usr/bin/env python3
"""Time to first token and generation speed: `localllm chat -p` vs raw llama-cpp-python.

Both sides get the same model file, prompt, context, flash-attention setting and greedy
sampling (temperature 0, fixed seed, fixed max tokens, EOS honoured), and each round runs
each side in a fresh process, alternating, so neither enjoys a warmer cache. Model load
is excluded on both sides: time to first token runs from the request to the first
streamed text, generation speed counts the tokens after the first over the wall time
between the first and the last streamed chunk (llama.cpp's own decode timer is shown
too). Run it alone on the machine:

    flock /tmp/localllm-cpu.lock .venv/bin/python benchmarks/chat_latency.py

Goal: tokens/s ratio (ours / raw) >= 0.95, time to first token <= 1.1x raw.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROMPT = (
    "Write a detailed story about a lighthouse keeper who finds a message in a bottle. "
    "Describe the island, the storm, and what the message says."
)


def raw_once(model: str, prompt: str, max_tokens: int, n_ctx: int, seed: int) -> dict:
    """One request through llama-cpp-python as its README shows, timed like ours."""
    import llama_cpp

    from localllm.machine import physical_cores

    # Same threads as localllm uses (llama-cpp-python alone would generate on cores // 2).
    threads = physical_cores()
    llama = llama_cpp.Llama(
        model_path=model,
        n_ctx=n_ctx,
        flash_attn=True,
        seed=seed,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    ctx = llama._ctx.ctx
    llama_cpp.llama_perf_context_reset(ctx)
    pieces: list[str] = []
    first = last = None
    start = time.perf_counter()
    for chunk in llama.create_chat_completion(
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        temperature=0.0,
        max_tokens=max_tokens,
        seed=seed,
    ):
        text = chunk["choices"][0]["delta"].get("content")
        if text:
            last = time.perf_counter()
            first = first or last
            pieces.append(text)
    perf = llama_cpp.llama_perf_context(ctx)
    llama.close()
    generated = int(perf.n_eval) + (1 if pieces else 0)
    return {
        "reply": "".join(pieces),
        "ttft_seconds": (first or time.perf_counter()) - start,
        "generated_tokens": generated,
        "stream_seconds": (last - first) if first and last else 0.0,
        "generation_seconds": perf.t_eval_ms / 1000.0,
        "decode_tokens": int(perf.n_eval),
    }


def ours_once(model: str, prompt: str, max_tokens: int, n_ctx: int, seed: int) -> dict:
    """One `localllm chat -p ... --json` in its own process; its own stats exclude load."""
    cmd = [
        sys.executable, "-m", "localllm", "chat", model, "-p", prompt, "--json",
        "--temp", "0", "--seed", str(seed), "--max-tokens", str(max_tokens),
        "--ctx", str(n_ctx), "--flash-attn", "on",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if proc.returncode != 0:
        sys.exit(f"localllm chat failed ({proc.returncode}): {proc.stderr.strip()}")
    data = json.loads(proc.stdout)
    stats = data["stats"]
    return {
        "reply": data["reply"],
        "ttft_seconds": stats["ttft_seconds"],
        "generated_tokens": stats["generated_tokens"],
        "stream_seconds": stats["stream_seconds"],
        "generation_seconds": stats["generation_seconds"],
        "decode_tokens": stats["generated_tokens"] - 1,
    }


def raw_in_subprocess(model: str, prompt: str, max_tokens: int, n_ctx: int, seed: int) -> dict:
    cmd = [
        sys.executable, __file__, "--raw-worker", "--model", model, "--prompt", prompt,
        "--max-tokens", str(max_tokens), "--ctx", str(n_ctx), "--seed", str(seed),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if proc.returncode != 0:
        sys.exit(f"raw worker failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def wall_tps(run: dict) -> float:
    """Tokens after the first over the time between the first and the last chunk."""
    s = run["stream_seconds"]
    return (run["generated_tokens"] - 1) / s if s > 0 else 0.0


def decode_tps(run: dict) -> float:
    """llama.cpp's own decode timer (evaluated tokens / t_eval)."""
    s = run["generation_seconds"]
    return run["decode_tokens"] / s if s > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--raw-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_worker:
        result = raw_once(args.model, args.prompt, args.max_tokens, args.ctx, args.seed)
        sys.stdout.write(json.dumps(result) + "\n")
        return

    ours: list[dict] = []
    raw: list[dict] = []
    for i in range(args.rounds):
        # Alternate which side goes first so drift on a shared machine hits both.
        order = [("ours", ours_once, ours), ("raw", raw_in_subprocess, raw)]
        for name, fn, sink in order if i % 2 == 0 else order[::-1]:
            run = fn(args.model, args.prompt, args.max_tokens, args.ctx, args.seed)
            sink.append(run)
            print(
                f"round {i + 1} {name:4}: ttft {run['ttft_seconds'] * 1000:7.1f} ms  "
                f"gen {wall_tps(run):6.1f} tok/s (wall)  {decode_tps(run):6.1f} tok/s "
                f"(llama.cpp)  {run['generated_tokens']} tokens",
                file=sys.stderr,
            )

    def med(runs: list[dict], fn) -> float:
        return statistics.median(fn(r) for r in runs)

    summary = {
        "model": os.path.basename(args.model),
        "prompt_chars": len(args.prompt),
        "max_tokens": args.max_tokens,
        "ctx": args.ctx,
        "rounds": args.rounds,
        "same_reply": all(o["reply"] == r["reply"] for o, r in zip(ours, raw, strict=True)),
        "ours": {
            "ttft_ms": round(med(ours, lambda r: r["ttft_seconds"]) * 1000, 1),
            "gen_tps_wall": round(med(ours, wall_tps), 1),
            "gen_tps_llama": round(med(ours, decode_tps), 1),
        },
        "raw": {
            "ttft_ms": round(med(raw, lambda r: r["ttft_seconds"]) * 1000, 1),
            "gen_tps_wall": round(med(raw, wall_tps), 1),
            "gen_tps_llama": round(med(raw, decode_tps), 1),
        },
    }
    o, r = summary["ours"], summary["raw"]
    summary["ratios"] = {
        "gen_tps_wall": round(o["gen_tps_wall"] / r["gen_tps_wall"], 3),
        "gen_tps_llama": round(o["gen_tps_llama"] / r["gen_tps_llama"], 3),
        "ttft": round(o["ttft_ms"] / r["ttft_ms"], 3),
    }
    summary["goals_met"] = {
        "gen_tps_ratio_ge_0.95": summary["ratios"]["gen_tps_wall"] >= 0.95,
        "ttft_ratio_le_1.1": summary["ratios"]["ttft"] <= 1.1,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"model {summary['model']}, ctx {args.ctx}, max tokens {args.max_tokens}, "
        f"{args.rounds} rounds each, medians; identical replies: {summary['same_reply']}"
    )
    print(f"{'':22}{'ttft ms':>10}{'gen tok/s wall':>16}{'gen tok/s llama':>17}")
    for name, row in (("localllm chat -p", o), ("raw llama-cpp-python", r)):
        print(
            f"{name:22}{row['ttft_ms']:>10.1f}{row['gen_tps_wall']:>16.1f}"
            f"{row['gen_tps_llama']:>17.1f}"
        )
    ratios = summary["ratios"]
    print(
        f"{'ratio ours/raw':22}{ratios['ttft']:>10.3f}{ratios['gen_tps_wall']:>16.3f}"
        f"{ratios['gen_tps_llama']:>17.3f}"
    )
    goals = summary["goals_met"]
    print(
        f"goals: tokens/s ratio >= 0.95: {goals['gen_tps_ratio_ge_0.95']}, "
        f"ttft <= 1.1x: {goals['ttft_ratio_le_1.1']}"
    )


if __name__ == "__main__":
    main()
