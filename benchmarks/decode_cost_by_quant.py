#!/usr/bin/env python3
"""What a decode of k tokens costs against one, by weight type: how much a draft can save.

A speculative step verifies its drafted tokens in one ``llama_decode``; that pays as far
as a batch of k tokens costs less than k decodes of one, which depends on whether
ggml's CPU backend has a batched kernel for the weights' type. The model (SmolLM2's
Q4_1 file by default) is requantized into a temporary folder with
``llama_model_quantize`` (for the costs only: a requantized file is not the model's
own), and each type's decode costs are timed as ``speculative_replay.py`` times them
(``--cells`` cells in the cache, median of ``--repeats``), in ``--passes`` interleaved
passes.

    .venv/bin/python benchmarks/decode_cost_by_quant.py --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import llama_cpp  # noqa: E402
import speculative_replay  # noqa: E402
from speculative import DEFAULT_MODEL  # noqa: E402

SIZES = (1, 2, 4, 8, 16, 32)
TYPES = {
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
}


def requantize(source: Path, target: Path, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = ftype, True, 2
    if llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    ):
        raise SystemExit(f"llama_model_quantize failed for {target.name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cells", type=int, default=300, help="KV cells in use while timing")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--passes", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="localllm-quants-") as tmp:
        files = {f"{args.model.name} (as given)": args.model}
        for name, ftype in TYPES.items():
            files[name] = Path(tmp) / f"{name}.gguf"
            requantize(args.model, files[name], ftype)
        print("| weights | " + " | ".join(f"{n} tokens" for n in SIZES) + " |")
        print("|---" * (len(SIZES) + 1) + "|")
        for _ in range(args.passes):
            for name, path in files.items():
                llm = llama_cpp.Llama(
                    str(path), n_ctx=4096, n_threads=args.threads,
                    n_threads_batch=args.threads, flash_attn=True, verbose=False,
                )  # fmt: skip
                costs = speculative_replay.decode_costs(llm, args.cells, args.repeats, SIZES)
                llm.close()
                one = costs[1]
                cells = [f"{one * 1000:.1f} ms"] + [f"{costs[n] / one:.1f}x" for n in SIZES[1:]]
                print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
