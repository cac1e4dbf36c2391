#!/usr/bin/env python3
"""Constrained generation: tokens/s of a reply under a JSON grammar against free text.

Tool calls (`tool_choice` required or named) and `response_format` constrain every
token of a reply with a GBNF grammar. This times the engine `serve` runs (one slot,
greedy, 2 threads by default) on the same prompt with llama.cpp's JSON grammar and
without, each reply to its natural end (forcing a grammar past the end of its object
leaves only whitespace allowed, a refused pick at every token), interleaved rounds, the
median of each round's ratio.

    .venv/bin/python benchmarks/grammar.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama_cpp.llama_grammar import JSON_GBNF  # noqa: E402

from localllm.runtime.batch_engine import BatchEngine  # noqa: E402
from localllm.runtime.batch_records import (  # noqa: E402
    GenerationDone,
    GenerationParams,
    run_request,
)
from localllm.runtime.params import LoadOptions  # noqa: E402

DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = (
    "<|im_start|>user\nDescribe a person (name, age, city, three hobbies, employer) as "
    "a JSON object.<|im_end|>\n<|im_start|>assistant\n"
)


def generate(engine: BatchEngine, prompt: list[int], params: GenerationParams) -> GenerationDone:
    engine.forget(0)  # every reply from an empty slot
    return run_request(engine, prompt, params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    engine = BatchEngine.load(
        args.model, LoadOptions(n_ctx=2048, n_threads=args.threads), spec="off"
    )
    prompt = engine.tokenize(PROMPT, add_bos=False)
    kinds = {
        "free": GenerationParams(max_tokens=args.max_tokens, temperature=0.0),
        "json grammar": GenerationParams(
            max_tokens=args.max_tokens, temperature=0.0, grammar=JSON_GBNF
        ),
    }
    tps: dict[str, list[float]] = {k: [] for k in kinds}
    ratios = []
    try:
        for r in range(args.rounds):
            order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
            got = {k: generate(engine, prompt, kinds[k]) for k in order}
            for k, d in got.items():
                tps[k].append(d.generation_tps)
            ratios.append(got["json grammar"].generation_tps / got["free"].generation_tps)
            print(
                f"round {r + 1}: "
                + ", ".join(
                    f"{k} {d.generation_tps:.1f} t/s ({d.completion_tokens})"
                    for k, d in got.items()
                ),
                file=sys.stderr,
            )
    finally:
        engine.close()
    print("| reply | t/s (median) | x free (median of rounds) |\n|---|---|---|")
    for k in kinds:
        ratio = 1.0 if k == "free" else statistics.median(ratios)
        print(f"| {k} | {statistics.median(tps[k]):.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
