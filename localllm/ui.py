"""All terminal output: the Rich consoles, the theme, tables, progress and chat UI.

Data goes to stdout (``out``), everything a script should not parse goes to stderr
(``err``): status lines, progress, warnings, errors. Strings that come from a model
file are escaped before they reach either (see ``gguf_meta.escape_untrusted``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.theme import Theme

from localllm.gguf_meta import ModelSpec, escape_untrusted

THEME = Theme(
    {
        "error": "bold red",
        "warn": "yellow",
        "ok": "green",
        "muted": "dim",
        "accent": "cyan",
        "label": "bold",
        "reply": "default",
        "prompt": "bold green",
    }
)

out = Console(theme=THEME, highlight=False, soft_wrap=True)
err = Console(theme=THEME, highlight=False, stderr=True, soft_wrap=True)


# --------------------------------------------------------------------------- basics


def error(message: str) -> None:
    """The one red line a failed command prints."""
    err.print(Text("error: ", style="error") + Text(message))


def warn(message: str) -> None:
    err.print(Text("warning: ", style="warn") + Text(message))


def note(message: str) -> None:
    err.print(Text(message, style="muted"))


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, no colour, no wrapping."""

    def default(obj: Any) -> Any:
        if is_dataclass(obj) and not isinstance(obj, type):
            return asdict(obj)
        return str(obj)

    sys.stdout.write(json.dumps(data, indent=2, default=default) + "\n")
    sys.stdout.flush()


def format_bytes(n: int | float | None) -> str:
    """Binary units, as llama.cpp prints them (MiB, GiB)."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def format_count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


@contextmanager
def spinner(message: str) -> Iterator[None]:
    """A spinner on stderr while something slow happens (silent when not a terminal)."""
    if not err.is_terminal:
        yield
        return
    with err.status(Text(message, style="muted"), spinner="dots"):
        yield


def safe(text: str | None, limit: int | None = None) -> str:
    return escape_untrusted(text or "", limit)


# --------------------------------------------------------------------- list / info


def render_model_list(rows: list[dict[str, Any]]) -> None:
    if not rows:
        note("the store is empty; `localllm pull smollm2-135m` fetches the default model")
        return
    table = Table(box=None, header_style="label", pad_edge=False)
    for col in ("alias", "file", "size", "quant", "architecture", "trained ctx"):
        table.add_column(col, justify="right" if col in ("size", "trained ctx") else "left")
    for row in rows:
        table.add_row(
            Text(row["alias"] or "-"),
            Text(safe(row["file"])),
            format_bytes(row["size_bytes"]),
            Text(row["quant"] or "?"),
            Text(safe(row["architecture"]) if row["architecture"] else "?"),
            str(row["n_ctx_train"]) if row["n_ctx_train"] else "?",
        )
    out.print(table)


def render_info(spec: ModelSpec, kv_per_token_bytes: int, kv_at_train_bytes: int) -> None:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="label")
    table.add_column()

    def row(label: str, value: str | Text) -> None:
        table.add_row(label, value if isinstance(value, Text) else Text(value))

    row("name", safe(spec.name, 80))
    row("source", f"{spec.source}: {safe(spec.path)}" if spec.path else spec.source)
    row("architecture", safe(spec.architecture))
    params = format_count(spec.n_params)
    row("parameters", f"{params} ({spec.n_params:,})" if spec.n_params else "?")
    if spec.file_type:
        row("file type", safe(spec.file_type))
    if spec.quant_mix:
        mix = ", ".join(
            f"{q.type_name} {q.n_tensors} tensors {format_bytes(q.n_bytes)}" for q in spec.quant_mix
        )
        row("quant mix", mix)
    row("layers", str(spec.n_layers))
    row(
        "attention",
        f"{spec.n_heads} heads, {spec.n_kv_heads} KV heads ({spec.attention_kind}, "
        f"group {spec.gqa_group:g}), head dim {spec.head_dim}",
    )
    row("embedding / FFN", f"{spec.n_embd} / {spec.n_ff if spec.n_ff else '?'}")
    row("vocabulary", str(spec.vocab_size) if spec.vocab_size else "?")
    row("trained context", f"{spec.n_ctx_train} tokens")
    rope = f"base {spec.rope_freq_base:g}"
    if spec.rope_dim:
        rope += f", {spec.rope_dim} dims"
    if spec.rope_scaling_type and spec.rope_scaling_type != "none":
        rope += f", {safe(spec.rope_scaling_type)} x{spec.rope_scaling_factor or 1:g}"
        if spec.rope_orig_ctx:
            rope += f" (original context {spec.rope_orig_ctx})"
    row("RoPE", rope)
    if spec.sliding_window:
        row("sliding window", f"{spec.sliding_window} tokens")
    row("chat template", "yes" if spec.has_chat_template else "no")
    row(
        "KV cache (f16)",
        f"{format_bytes(kv_per_token_bytes)} per token, "
        f"{format_bytes(kv_at_train_bytes)} at {spec.n_ctx_train} tokens",
    )
    if spec.weights_bytes is not None:
        row("weights", format_bytes(spec.weights_bytes))
    row("file size", format_bytes(spec.file_bytes))
    out.print(table)


# ---------------------------------------------------------------------------- chat
# (chat REPL rendering lives below this line)


# -------------------------------------------------------------------------- kv-calc
# (kv-calc tables and charts live below this line)


# ------------------------------------------------------------------------- rope/ppl
# (ppl progress and rope-plan rendering live below this line)


# ---------------------------------------------------------------------------- bench
# (bench tables and progress live below this line)


# ----------------------------------------------------------------------------- pull
# (pull progress and listings live below this line)
