"""The Typer option declarations several commands share (one flag, one declaration)."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = [
    "RESUME_LATEST",
    "DraftOpt",
    "JsonOpt",
    "ModelArg",
    "NoMemoryCheckOpt",
    "OnOffOpt",
    "RepackOpt",
    "RopeOpt",
    "SpecOpt",
    "SwaFullOpt",
    "ThreadsOpt",
]

ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="Catalog alias (smollm2-135m, llama-2-7b-chat:Q4_K_M), a .gguf path, "
        "org/repo:QUANT, or hf://org/repo/file.gguf. Default: $LOCALLLM_MODEL or smollm2-135m.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
RopeOpt = Annotated[
    str | None,
    typer.Option(
        "--rope",
        help="RoPE scaling past the trained context: none, linear, ntk or yarn "
        "(default: yarn when --ctx exceeds the trained length).",
        show_default=False,
    ),
]
OnOffOpt = Annotated[str, typer.Option("--flash-attn", help="Flash attention: on or off.")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", "-t", help="CPU threads (1-512).", show_default="physical cores"),
]
RepackOpt = Annotated[
    str | None,
    typer.Option(
        "--repack",
        help="1: repack weights for faster CPU kernels (llama.cpp's default), 0: don't. "
        "Default: 1, but 0 on AMX CPUs (llama.cpp#20824).",
        show_default=False,
    ),
]
NoMemoryCheckOpt = Annotated[
    bool,
    typer.Option("--no-memory-check", help="Load even when the memory plan does not fit."),
]
SpecOpt = Annotated[
    str,
    typer.Option(
        "--spec",
        help="Speculative decoding: auto (n-gram drafts while they pay), off, or ngram "
        "(always draft).",
    ),
]
DraftOpt = Annotated[
    str | None,
    typer.Option(
        "--draft",
        help="A draft MODEL for speculative decoding (same tokenizer as the model).",
        show_default=False,
    ),
]
SwaFullOpt = Annotated[
    bool,
    typer.Option(
        "--swa-full",
        help="Keep a full-size cache for sliding-window layers (default: sized to the window, "
        "as llama.cpp's tools do).",
    ),
]
# `--resume` alone means the latest session: main() inserts this before the next option.
RESUME_LATEST = "latest"
