#!/usr/bin/env python3
"""Speculative drafting replayed: `auto`'s policy against measured decode costs, no noise.

Each task of ``speculative.py`` is answered greedily once at 1 thread (the reply every
mode gives there), then replayed step by step: the policy (``DraftPolicy``, the n-gram
index, the decode-cost fit) asks for a draft, the draft is checked against the reply,
and the step costs what a decode of that many tokens measured on this machine
(``llama_decode`` with ``--cells`` cells in the cache, ``--threads`` threads, median of
``--repeats`` runs per size, linear between measured sizes). The ratio to `off` is the
replay's time for one token per decode over its time with drafts. ``oracle`` drafts
exactly the tokens that will be accepted: the ceiling of any drafter on these costs.

What the replay leaves out: the engine's own per-step work, decode costs that move with
the cache's length, and the 2-thread replies (another text on some tasks). Use it to
compare policies, then measure the winner with ``speculative.py``.

    .venv/bin/python benchmarks/speculative_replay.py --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import llama_cpp  # noqa: E402
from speculative import DEFAULT_MODEL, TASKS, chatml  # noqa: E402

from localllm.runtime.speculation import (  # noqa: E402
    DecodeCost,
    DraftPolicy,
    NgramIndex,
    verify_draft,
)

SIZES = (1, 2, 3, 4, 5, 6, 8, 9, 12, 16, 17, 24, 32, 33, 48, 64)
STOP = "<|im_end|>"


def greedy_replies(llm: llama_cpp.Llama, max_tokens: int) -> dict[str, tuple[list, list]]:
    """Each task's prompt tokens and greedy reply tokens (up to the end of turn)."""
    out = {}
    for task, messages in TASKS.items():
        prompt = llm.tokenize(chatml(messages).encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(prompt)
        reply: list[int] = []
        for _ in range(max_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if token == llm.token_eos() or llm.detokenize([token]).decode(errors="ignore") == STOP:
                break
            reply.append(token)
            llm.eval([token])
        out[task] = (prompt, reply)
    return out


def decode_costs(
    llm: llama_cpp.Llama, cells: int, repeats: int, sizes: tuple[int, ...] = SIZES
) -> dict[int, float]:
    """Median seconds of one ``llama_decode`` of n tokens (all wanting logits)."""
    lc, ctx = llama_cpp, llm.ctx
    tokens = llm.tokenize(b"the quick brown fox jumps over the lazy dog " * 200)[:cells]
    llm.reset()
    llm.eval(tokens)
    memory = lc.llama_get_memory(ctx)
    batch = lc.llama_batch_init(max(sizes), 0, 1)
    seen: dict[int, list[float]] = {}
    try:
        for rep in range(repeats + 1):
            for n in sizes:
                for i in range(n):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = tokens[i], cells + i, 1
                    batch.seq_id[i][0], batch.logits[i] = 0, True
                batch.n_tokens = n
                started = time.perf_counter()
                if lc.llama_decode(ctx, batch) != 0:
                    raise SystemExit(f"llama_decode failed for {n} tokens")
                elapsed = time.perf_counter() - started
                lc.llama_memory_seq_rm(memory, 0, cells, -1)
                if rep:  # the first pass warms up
                    seen.setdefault(n, []).append(elapsed)
    finally:
        lc.llama_batch_free(batch)
    return {n: statistics.median(v) for n, v in seen.items()}


def cost_of(table: dict[int, float], n: int) -> float:
    sizes = sorted(table)
    for lo, hi in itertools.pairwise(sizes):
        if lo <= n <= hi:
            return table[lo] + (table[hi] - table[lo]) * (n - lo) / (hi - lo)
    raise ValueError(f"no measured decode size around {n}")


def agreeing(draft: list[int], reply: list[int], pos: int) -> int:
    """How many leading tokens of ``draft`` the engine's accept rule keeps when the target
    samples ``reply`` from ``pos`` on."""
    return verify_draft(draft, lambda i: reply[pos + i] if pos + i < len(reply) else None).accepted


def replay(prompt: list, reply: list, mode: str, table: dict[int, float]) -> tuple:
    """(seconds, drafted, accepted) for one reply under ``mode``: auto, ngram, oracle."""
    index, cost = NgramIndex(prompt=prompt), DecodeCost()
    policy = DraftPolicy(forced=mode == "ngram")
    index.append(reply[0])  # the prompt's decode samples the first token
    pos, seconds, drafted, accepted = 1, 0.0, 0, 0
    while pos < len(reply):
        if mode == "oracle":
            draft = index.draft(max(SIZES) - 1)
            draft = draft[: agreeing(draft, reply, pos)]
        else:
            want = policy.length(cost, 1, index.echoes_reply())
            draft = index.draft(min(want, len(reply) - pos - 1))
        n = 1 + len(draft)
        seconds += cost_of(table, n)
        cost.observe(n, cost_of(table, n))
        ok = agreeing(draft, reply, pos)
        if draft and mode != "oracle":
            policy.record(len(draft), ok, cost, 1)
        drafted, accepted = drafted + len(draft), accepted + ok
        index.extend(reply[pos : pos + ok + 1])
        pos += ok + 1
    return seconds, drafted, accepted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2, help="threads for the decode costs")
    ap.add_argument("--cells", type=int, default=300, help="KV cells in use while timing")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()
    common = dict(n_ctx=4096, verbose=False, flash_attn=True)
    replies = greedy_replies(
        llama_cpp.Llama(str(args.model), n_threads=1, logits_all=True, **common), args.max_tokens
    )
    llm = llama_cpp.Llama(
        str(args.model), n_threads=args.threads, n_threads_batch=args.threads, **common
    )
    table = decode_costs(llm, args.cells, args.repeats)
    print(
        f"decode ms ({args.threads} threads, {args.cells} cells): "
        + ", ".join(f"{n}: {s * 1000:.1f}" for n, s in sorted(table.items()))
    )
    print("\n| task | tokens | auto | ngram | oracle | auto drafted/accepted |")
    print("|---|---|---|---|---|---|")
    for task, (prompt, reply) in replies.items():
        plain = (len(reply) - 1) * table[1]
        runs = {mode: replay(prompt, reply, mode, table) for mode in ("auto", "ngram", "oracle")}
        ratios = " | ".join(f"{plain / runs[m][0]:.2f}x" for m in ("auto", "ngram", "oracle"))
        print(f"| {task} | {len(reply)} | {ratios} | {runs['auto'][1]}/{runs['auto'][2]} |")


if __name__ == "__main__":
    main()
