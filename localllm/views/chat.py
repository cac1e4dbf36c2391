"""Views of a chat: the prompt, the streamed reply, the status line, /stats and /help."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from localllm.text import format_bytes
from localllm.views.console import err, note, safe

if TYPE_CHECKING:
    from localllm.chat.history import SessionListing
    from localllm.chat.saved_state import StateRestore
    from localllm.chat.session import ChatSession, SessionSummary
    from localllm.generation import GenerationStats

__all__ = [
    "CHAT_INPUT_HELP",
    "ReplyWriter",
    "chat_banner",
    "chat_help",
    "chat_opened",
    "chat_prompt",
    "format_turn_status",
    "render_chat_stats",
    "render_sessions",
    "sampling_summary",
    "state_restored",
]

CHAT_INPUT_HELP = (
    'Multi-line input: end a line with \\ to continue it, or wrap the text in """ ... """.\n'
    "Ctrl-C stops a reply (the session stays); Ctrl-C at the prompt or Ctrl-D leaves."
)


def _ansi_ok() -> bool:
    """Colour codes in the readline prompt only when readline renders them on a terminal."""
    return (
        "readline" in sys.modules
        and sys.stdout.isatty()
        and not os.environ.get("NO_COLOR")
        and os.environ.get("TERM") != "dumb"
    )


def chat_prompt(continuation: bool) -> str:
    text = "... " if continuation else ">>> "
    if not _ansi_ok():
        return text
    # \001 and \002 tell readline the escape codes take no columns.
    return f"\001\x1b[1;32m\002{text}\001\x1b[0m\002"


class ReplyWriter:
    """Streams reply text to stdout as it arrives; knows whether a line is open."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.at_line_start = True
        self.wrote = False

    def write(self, text: str) -> None:
        if not text:
            return
        # Model output is untrusted: on a terminal, control sequences are escaped.
        sys.stdout.write(safe(text) if self.tty else text)
        sys.stdout.flush()
        self.at_line_start = text.endswith("\n")
        self.wrote = True

    def end_line(self) -> None:
        """Close the reply's line so status lines never land inside it."""
        if not self.at_line_start:
            sys.stdout.write("\n")
            self.at_line_start = True
        sys.stdout.flush()


def format_turn_status(stats: GenerationStats, kv_bytes: int | None) -> str:
    """The dim line after each reply: tokens, speeds, first-token latency, KV fill."""
    fresh = stats.prompt_evaluated
    tokens_in = f"{stats.prompt_tokens} in"
    if stats.prompt_from_state:
        tokens_in += f" ({fresh} new, {stats.prompt_from_state} from the saved state)"
    elif fresh != stats.prompt_tokens:
        tokens_in += f" ({fresh} new)"
    pct = 100.0 * stats.kv_used / stats.kv_cells if stats.kv_cells else 0.0
    kv = f"KV {stats.kv_used}/{stats.kv_cells} cells ({pct:.1f}%"
    kv += f" of {format_bytes(kv_bytes)})" if kv_bytes else ")"
    parts = [
        tokens_in,
        f"{stats.generated_tokens} out",
        f"prompt {stats.prompt_tps:.1f} tok/s",
        f"gen {stats.generation_tps:.1f} tok/s",
        f"first token {stats.ttft_seconds * 1000:.0f} ms",
        kv,
    ]
    if stats.draft_n:
        parts.append(f"drafts {stats.draft_n_accepted}/{stats.draft_n} accepted")
    if stats.window_reevaluated:
        parts.append("prompt re-evaluated: the sliding window had moved past the cached prefix")
    return " · ".join(parts)


def sampling_summary(session: ChatSession) -> str:
    s, o = session.sampling, session.loaded.options
    kv = o.type_k if o.type_k == o.type_v else f"K {o.type_k} V {o.type_v}"
    return (
        f"temp {s.temperature:g} · top-p {s.top_p:g} · top-k {s.top_k} · min-p {s.min_p:g} · "
        f"repeat-penalty {s.repeat_penalty:g} · seed {s.seed if s.seed is not None else 'random'}"
        f" · max-tokens {s.max_tokens} · ctx {session.n_ctx} · KV {kv} · "
        f"flash-attn {'on' if o.flash_attn else 'off'} · threads {o.n_threads or 'auto'}"
    )


def chat_opened(session: ChatSession) -> None:
    """What stderr says once the model is loaded: a changed default, RoPE stretching."""
    for message in session.notes:
        note(message)
    plan = session.rope_plan
    if plan is None:
        return
    from localllm.views.ppl import show_rope_plan  # a RoPE plan: past the trained context only

    show_rope_plan(plan)
    if not plan.extended and plan.method == "none":
        # --rope was given inside the trained context: say why nothing changed.
        note(f"rope: {plan.description}")


def state_restored(restore: StateRestore, session_id: str) -> None:
    """--resume: one line on the saved KV state, loaded or not used (and why)."""
    if restore.note is not None:
        note(safe(restore.note, 200))
        return
    note(
        f"session {session_id}: {restore.tokens} tokens of KV state loaded "
        f"({format_bytes(restore.bytes)} in {restore.seconds:.2f} s); only new text is evaluated"
    )


def chat_banner(session: ChatSession) -> None:
    name = safe(session.display_name, 80)
    note(f"{name} ({safe(session.spec.name, 60)}) loaded in {session.load_seconds:.1f} s")
    note(sampling_summary(session))
    if session.system:
        note(f"system: {safe(session.system, 200)}")
    note('/help for commands · """ for multi-line · Ctrl-C stops a reply · Ctrl-D leaves')


def chat_help(commands: Mapping[str, tuple[str, str]]) -> None:
    """/help: the slash commands and the input rules."""
    from rich.table import Table  # a table: the REPL's commands, not a one-shot reply

    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="accent")
    table.add_column()
    for name, (arg, what) in commands.items():
        table.add_row(f"{name} {arg}".rstrip(), what)
    err.print(table)
    note(CHAT_INPUT_HELP)


def render_chat_stats(summary: SessionSummary, session: ChatSession) -> None:
    """/stats: totals over the session, the context and the settings."""
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="label")
    table.add_column()
    where = safe(str(session.loaded.path))
    table.add_row("model", Text(f"{safe(session.display_name)} ({where})"))
    table.add_row("turns", str(summary.turns))
    table.add_row(
        "prompt",
        f"{summary.prompt_tokens_evaluated} tokens evaluated, {summary.prompt_tps:.1f} tok/s",
    )
    table.add_row(
        "generation", f"{summary.generated_tokens} tokens, {summary.generation_tps:.1f} tok/s"
    )
    if summary.last is not None:
        table.add_row("last reply", format_turn_status(summary.last, summary.kv_bytes))
    table.add_row(
        "history",
        f"{summary.history_messages} messages in context, "
        f"{summary.dropped_messages} dropped to fit",
    )
    pct = 100.0 * summary.kv_used / summary.kv_cells if summary.kv_cells else 0.0
    table.add_row(
        "KV cache",
        f"{summary.kv_used}/{summary.kv_cells} cells ({pct:.1f}%), "
        f"{format_bytes(summary.kv_bytes)} allocated",
    )
    table.add_row("settings", sampling_summary(session))
    table.add_row("template", Text(session.chat_format.describe()))
    table.add_row("system", Text(safe(session.system, 300) if session.system else "(none)"))
    err.print(table)


def render_sessions(rows: list[SessionListing], current: str | None = None) -> None:
    """/sessions: the newest saved sessions, this one marked."""
    if not rows:
        note("no saved sessions yet")
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="label", pad_edge=False)
    for col in ("", "id", "saved", "model", "messages", "KV state", "first message"):
        table.add_column(col, no_wrap=col != "first message", overflow="ellipsis")
    for row in rows:
        mark = "*" if row.id == current else ""
        if row.problem:
            problem = Text(safe(row.problem, 80), style="error")
            table.add_row(mark, row.id, "", problem, "", "", "")
            continue
        first = safe(row.first_message.replace("\n", " "), 50)
        state = format_bytes(row.state_bytes) if row.state_bytes else "-"
        table.add_row(mark, row.id, row.saved_at, Text(safe(row.model, 40)), str(row.messages),
                      state, Text(first))  # fmt: skip
    err.print(table)
    note("continue one with `localllm chat --resume ID`")
