#!/usr/bin/env python3
"""Speculative decoding: localllm's engine with ``--spec off``, ``auto`` and ``ngram``.

The engine measured is the one `localllm chat` and `localllm serve` both run (a one-slot
:class:`~localllm.runtime.batch_engine.BatchEngine`, loaded once per mode). Each task is a
chat-formatted prompt of one kind (a code rewrite and other edits that return their
input, a quoting summary, free chat, a long multi-turn conversation); each round runs
every mode once on it, in turn, the slot's cells dropped first, under
``/tmp/localllm-cpu.lock``; the order of the modes rotates from round to round. Greedy,
fixed budget. Reported per task and mode: the median generation tokens/s (tokens after
the first over the time from the first to the last), its ratio to ``off`` within each
round (median of the ratios), drafted and accepted tokens, and how much of the ``off``
reply the reply keeps (the share of its tokens in the common prefix: batched
verification can flip near-ties).

With ``--native``, native llama-server (``benchmarks/build/bin/llama-server``, started
with ``--spec-type ngram-mod``, one slot, the same threads) answers the same prompt in
each round through ``/completion``; its own ``timings`` are used.

    .venv/bin/python benchmarks/speculative.py --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import fcntl
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from localllm.runtime.batch_engine import BatchEngine  # noqa: E402
from localllm.runtime.batch_records import (  # noqa: E402
    GenerationDone,
    GenerationParams,
    run_request,
)
from localllm.runtime.params import LoadOptions  # noqa: E402

DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCK = "/tmp/localllm-cpu.lock"
LLAMA_SERVER = REPO / "benchmarks" / "build" / "bin" / "llama-server"
MODES = ("off", "auto", "ngram")

CODE = "\n".join(
    [
        "def load_rows(path):",
        "    rows = []",
        "    with open(path) as handle:",
        "        for line in handle:",
        "            line = line.strip()",
        "            if not line or line.startswith('#'):",
        "                continue",
        "            fields = line.split(',')",
        "            rows.append(fields)",
        "    return rows",
        "",
        "def total(rows, column):",
        "    result = 0",
        "    for row in rows:",
        "        result += float(row[column])",
        "    return result",
        "",
        "def average(rows, column):",
        "    if not rows:",
        "        return 0.0",
        "    return total(rows, column) / len(rows)",
        "",
        "def largest(rows, column):",
        "    best = None",
        "    for row in rows:",
        "        value = float(row[column])",
        "        if best is None or value > best:",
        "            best = value",
        "    return best",
        "",
        "def report(path, column):",
        "    rows = load_rows(path)",
        "    print('rows:', len(rows))",
        "    print('total:', total(rows, column))",
        "    print('average:', average(rows, column))",
        "    print('largest:', largest(rows, column))",
    ]
)
PASSAGE = (
    "The lighthouse stood on the northern cape for two hundred years. Its keeper, a man "
    "named Tomas, climbed the ninety steps every evening to light the lamp. In the winter "
    "of 1887 a storm broke the great lens, and for three nights the cape was dark. Tomas "
    "kept a fire burning on the gallery with driftwood and oil until the new lens arrived "
    "from the mainland. The ships that passed in those nights all reached the harbour. "
    "When the inspector came in spring, he wrote that the keeper had done more than his "
    "duty, and the village gave Tomas a silver watch that his granddaughter still keeps."
)
RECIPE = (
    "Pancakes for four:\n"
    "1. Sift 200 g of flour, a pinch of salt and two teaspoons of baking powder into a bowl.\n"
    "2. Whisk two eggs with 300 ml of milk and 30 g of melted butter.\n"
    "3. Pour the wet mixture into the flour and stir until just combined.\n"
    "4. Let the batter rest for ten minutes while the pan heats.\n"
    "5. Grease a frying pan lightly and heat it over a medium flame.\n"
    "6. Pour a ladle of batter into the pan and cook until bubbles form on top.\n"
    "7. Flip the pancake and cook the other side for one more minute.\n"
    "8. Serve warm with maple syrup, berries or lemon and sugar."
)
JSON = (
    '{"name": "Ada", "age": 36, "city": "London", "languages": ["English", "French"], '
    '"employer": {"name": "Analytical Engines Ltd", "since": 1843}, "active": true}'
)
TYPOS = (
    "The comitee met on Tuesday to discus the new budjet. Every departmant presented its "
    "plans, and the finance team explaned how the mony would be spent. After a long debait, "
    "the members agreed to postpone the final desicion untill next month, when more "
    "informaton about the costs will be availble. The chairman thanked everyone for there "
    "time and closed the meeting at five o'clock."
)
TURNS = [
    ("user", "Give me a simple pancake recipe as numbered steps."),
    ("assistant", RECIPE),
    ("user", "Can I make the batter the night before?"),
    (
        "assistant",
        "Yes. Keep it covered in the fridge and stir it gently before cooking; the "
        "pancakes may rise a little less because the baking powder weakens overnight.",
    ),
    ("user", "Write the whole recipe again exactly as before, but with three eggs."),
]
TASKS: dict[str, list[tuple[str, str]]] = {
    "code rewrite": [("user", f"Rewrite this code, renaming `rows` to `records`:\n\n{CODE}")],
    "quoting summary": [
        (
            "user",
            f"Summarize this passage, quoting its most important sentences word for "
            f"word:\n\n{PASSAGE}",
        )
    ],
    # More edits that return their input: SmolLM2 copies these faithfully, where its
    # reply to the renaming request above wanders (and near-ties decide how).
    "code docstrings": [
        (
            "user",
            "Add a one-line docstring to each function of this code and return the whole "
            f"code:\n\n{CODE}",
        )
    ],
    "json edit": [("user", f"Return this JSON with the age changed to 37:\n\n{JSON}")],
    "typo fix": [
        (
            "user",
            f"Correct the spelling mistakes in this text and return the whole corrected "
            f"text:\n\n{TYPOS}",
        )
    ],
    "free chat": [("user", "What are some good habits for staying healthy while working?")],
    "long multi-turn": TURNS,
}


def chatml(messages: list[tuple[str, str]]) -> str:
    """SmolLM2's template (ChatML) with its default system prompt."""
    text = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n"
    )
    for role, content in messages:
        text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


class Native:
    """llama-server with ``--spec-type ngram-mod``, asked through /completion.

    Its ngram-mod table is the slot's and outlives requests: a second round of the same
    prompt drafts from the first round's reply (all 62 drafts of a 70-token reply
    accepted, 2.9x). localllm's n-grams are the request's own (prompt and reply), so
    each round asks a freshly started server."""

    def __init__(self, model: Path, threads: int, kv_type: str = "f16") -> None:
        self.model, self.threads, self.kv_type = model, threads, kv_type
        self._start()

    def restart(self) -> None:
        self.close()
        self._start()

    def _start(self) -> None:
        model, threads = self.model, self.threads
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc = subprocess.Popen(
            [str(LLAMA_SERVER), "-m", str(model), "-t", str(threads), "-c", "4096",
             "--port", str(self.port), "--spec-type", "ngram-mod", "-np", "1",
             "-ctk", self.kv_type, "-ctv", self.kv_type],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        raise SystemExit("llama-server did not start")

    def generate(self, text: str, max_tokens: int) -> dict[str, Any]:
        body = json.dumps(
            {"prompt": text, "n_predict": max_tokens, "temperature": 0, "top_k": 1,
             "cache_prompt": False, "stop": ["<|im_end|>"]}
        ).encode()  # fmt: skip
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/completion",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=600) as reply:
            return json.loads(reply.read())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@contextmanager
def cpu_lock() -> Any:
    with open(LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def generate(engine: BatchEngine, prompt: list[int], max_tokens: int) -> GenerationDone:
    engine.forget(0)  # every reply from an empty slot
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, stop=("<|im_end|>",))
    return run_request(engine, prompt, params)


def kept(reference: str, text: str) -> float:
    """The share of ``reference`` (characters) that ``text`` starts with."""
    n = next((i for i, (a, b) in enumerate(zip(reference, text, strict=False)) if a != b), None)
    if n is None:
        n = min(len(reference), len(text))
    return n / max(1, len(reference))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--no-lock", action="store_true", help="do not take " + LOCK)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    ap.add_argument("--native", action="store_true", help="also llama-server --spec-type ngram-mod")
    ap.add_argument("--kv-type", default="f16", help="KV cache type for K and V (both sides)")
    args = ap.parse_args()
    options = LoadOptions(
        n_ctx=4096, n_threads=args.threads, type_k=args.kv_type, type_v=args.kv_type
    )
    engines = {mode: BatchEngine.load(args.model, options, spec=mode) for mode in MODES}
    results: dict[tuple[str, str], list[GenerationDone]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    native = Native(args.model, args.threads, args.kv_type) if args.native else None
    try:
        for task in args.tasks.split(","):
            messages = TASKS[task]
            prompt = engines["off"].tokenize(chatml(messages), add_bos=False)
            for r in range(args.rounds):
                with cpu_lock() if not args.no_lock else _nothing():
                    order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]  # rotated
                    done = {m: generate(engines[m], prompt, args.max_tokens) for m in order}
                    if native is not None:
                        native.restart()  # its n-gram table outlives requests: see Native
                        done["native ngram-mod"] = as_done(
                            native.generate(chatml(messages), args.max_tokens)
                        )
                for m in done:
                    results.setdefault((task, m), []).append(done[m])
                    base = done["off"].generation_tps
                    ratios.setdefault((task, m), []).append(done[m].generation_tps / base)
                print(
                    f"{task} round {r + 1}: "
                    + ", ".join(f"{m} {d.generation_tps:.1f} t/s" for m, d in done.items()),
                    file=sys.stderr,
                )
    finally:
        for engine in engines.values():
            engine.close()
        if native is not None:
            native.close()
    print(table(results, ratios))


def as_done(reply: dict[str, Any]) -> GenerationDone:
    """llama-server's /completion reply as the engine's record (its own timings)."""
    t = reply["timings"]
    n = int(t["predicted_n"])
    return GenerationDone(
        text=reply["content"], finish_reason="stop", prompt_tokens=int(t["prompt_n"]),
        cached_tokens=0, completion_tokens=n, queued_seconds=0.0,
        prompt_seconds=t["prompt_ms"] / 1000, slot=0,
        # llama-server's predicted_per_second is n / time; ours counts n - 1 tokens.
        generation_seconds=(n - 1) / t["predicted_per_second"] if n > 1 else 0.0,
        draft_n=int(t.get("draft_n", 0)), draft_n_accepted=int(t.get("draft_n_accepted", 0)),
    )  # fmt: skip


@contextmanager
def _nothing() -> Any:
    yield


def table(
    results: dict[tuple[str, str], list[GenerationDone]],
    ratios: dict[tuple[str, str], list[float]],
) -> str:
    lines = [
        "| task | --spec | tokens | t/s (median) | x off (median of rounds) "
        "| drafted | accepted | reply kept vs off |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (task, mode), runs in results.items():
        reference = results[(task, "off")][0].text
        last = runs[-1]
        lines.append(
            f"| {task} | {mode} | {last.completion_tokens} "
            f"| {statistics.median(d.generation_tps for d in runs):.1f} "
            f"| {statistics.median(ratios[(task, mode)]):.2f} "
            f"| {last.draft_n} | {last.draft_n_accepted} "
            f"| {100 * kept(reference, last.text):.0f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
