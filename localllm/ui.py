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
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.theme import Theme

from localllm.gguf_meta import ModelSpec, escape_untrusted
from localllm.units import format_bytes

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
        # File names are what people copy into commands: never truncate them.
        table.add_column(
            col,
            justify="right" if col in ("size", "trained ctx") else "left",
            no_wrap=col == "file",
            overflow="fold",
        )
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

if TYPE_CHECKING:
    from collections.abc import Callable

    from localllm.chat import ChatSession, SessionSummary
    from localllm.runtime import GenerationStats

CHAT_INPUT_HELP = (
    'Multi-line input: end a line with \\ to continue it, or wrap the text in """ ... """.\n'
    "Ctrl-C stops a reply (the session stays); Ctrl-C at the prompt or Ctrl-D leaves."
)


def _ansi_ok() -> bool:
    """Colour codes in the readline prompt only when readline renders them on a terminal."""
    import os

    return (
        "readline" in sys.modules
        and sys.stdout.isatty()
        and not os.environ.get("NO_COLOR")
        and os.environ.get("TERM") != "dumb"
    )


def _chat_prompt(continuation: bool) -> str:
    text = "... " if continuation else ">>> "
    if not _ansi_ok():
        return text
    # \001 and \002 tell readline the escape codes take no columns.
    return f"\001\x1b[1;32m\002{text}\001\x1b[0m\002"


class _ReplyWriter:
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
    if fresh != stats.prompt_tokens:
        tokens_in += f" ({fresh} new)"
    pct = 100.0 * stats.kv_used / stats.kv_cells if stats.kv_cells else 0.0
    kv = f"KV {stats.kv_used}/{stats.kv_cells} cells ({pct:.1f}%"
    kv += f" of {format_bytes(kv_bytes)})" if kv_bytes else ")"
    return " · ".join(
        [
            tokens_in,
            f"{stats.generated_tokens} out",
            f"prompt {stats.prompt_tps:.1f} tok/s",
            f"gen {stats.generation_tps:.1f} tok/s",
            f"first token {stats.ttft_seconds * 1000:.0f} ms",
            kv,
        ]
    )


def _sampling_summary(session: ChatSession) -> str:
    s, o = session.sampling, session.runtime.options
    kv = o.type_k if o.type_k == o.type_v else f"K {o.type_k} V {o.type_v}"
    return (
        f"temp {s.temperature:g} · top-p {s.top_p:g} · top-k {s.top_k} · min-p {s.min_p:g} · "
        f"repeat-penalty {s.repeat_penalty:g} · seed {s.seed if s.seed is not None else 'random'}"
        f" · max-tokens {s.max_tokens} · ctx {session.n_ctx} · KV {kv} · "
        f"flash-attn {'on' if o.flash_attn else 'off'} · threads {o.n_threads or 'auto'}"
    )


def chat_opened(session: ChatSession) -> None:
    """What stderr says once the model is loaded: RoPE stretching, if any."""
    plan = session.rope_plan
    if plan is None:
        return
    show_rope_plan(plan)
    if not plan.extended and plan.method == "none":
        # --rope was given inside the trained context: say why nothing changed.
        note(f"rope: {plan.description}")


def _chat_banner(session: ChatSession) -> None:
    name = safe(session.display_name, 80)
    note(f"{name} ({safe(session.spec.name, 60)}) loaded in {session.load_seconds:.1f} s")
    note(_sampling_summary(session))
    if session.system:
        note(f"system: {safe(session.system, 200)}")
    note('/help for commands · """ for multi-line · Ctrl-C stops a reply · Ctrl-D leaves')


def _chat_help() -> None:
    from localllm.chat import SLASH_COMMANDS

    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="accent")
    table.add_column()
    for name, (arg, what) in SLASH_COMMANDS.items():
        table.add_row(f"{name} {arg}".rstrip(), what)
    err.print(table)
    note(CHAT_INPUT_HELP)


def render_chat_stats(summary: SessionSummary, session: ChatSession) -> None:
    """/stats: totals over the session, the context and the settings."""
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="label")
    table.add_column()
    where = safe(str(session.runtime.path))
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
    table.add_row("settings", _sampling_summary(session))
    table.add_row("system", Text(safe(session.system, 300) if session.system else "(none)"))
    err.print(table)


def _echo_off() -> Callable[[], None]:
    """Stop the terminal echoing keys typed during a reply (they would land in its text).

    Typed-ahead input stays buffered for the next prompt; returns the function that
    restores the terminal.
    """
    try:
        import termios
    except ImportError:  # not a POSIX terminal
        return lambda: None
    fd = sys.stdin.fileno() if sys.stdin.isatty() else -1
    if fd < 0:
        return lambda: None
    try:
        saved = termios.tcgetattr(fd)
        quiet = list(saved)
        quiet[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
    except termios.error:
        return lambda: None

    def restore() -> None:
        import contextlib

        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, saved)

    return restore


def _stream_turn(session: ChatSession, text: str, writer: _ReplyWriter) -> GenerationStats | None:
    """One reply: streamed to stdout; a first Ctrl-C stops it softly, a second at once."""
    import contextlib
    import signal
    import threading

    from localllm.chat import HistoryTrimmed
    from localllm.runtime import TextChunk

    stop = threading.Event()

    def on_sigint(_signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    stats = None
    previous = signal.signal(signal.SIGINT, on_sigint)
    restore_echo = _echo_off()
    try:
        # closing(): an aborted reply is wound up (history kept) before recovery below.
        with contextlib.closing(session.send(text, stop=stop.is_set)) as events:
            for item in events:
                if isinstance(item, TextChunk):
                    writer.write(item.text)
                elif isinstance(item, HistoryTrimmed):
                    if item.first:
                        note(
                            f"[the context ({item.n_ctx} tokens) is full: dropped the oldest "
                            f"{item.dropped_messages} messages; older turns will keep making room "
                            "from now on (the system prompt stays) · /stats counts them]"
                        )
                else:
                    stats = item
    except KeyboardInterrupt:
        # Aborted inside llama-cpp-python: start the next turn from a clean KV cache.
        session.recover_after_abort()
        writer.end_line()
        note("[interrupted]")
        return None
    finally:
        restore_echo()
        signal.signal(signal.SIGINT, previous)
    writer.end_line()
    if stats is not None:
        if stats.finish_reason == "interrupted":
            note("[interrupted]")
        elif stats.finish_reason == "length":
            note(f"[reply cut at --max-tokens {session.sampling.max_tokens}]")
        note(format_turn_status(stats, session.kv_bytes()))
    return stats


def _run_slash_command(session: ChatSession, name: str, arg: str) -> bool:
    """Do one /command; False means leave the REPL."""
    if name == "/exit":
        return False
    if name == "/help":
        _chat_help()
    elif name == "/reset":
        session.reset()
        note("conversation forgotten (the system prompt and settings stay)")
    elif name == "/system":
        if arg:
            session.set_system(arg)
            note("system prompt set; it applies from the next reply")
        else:
            note(f"system: {safe(session.system) if session.system else '(none)'}")
    elif name == "/stats":
        render_chat_stats(session.summary(), session)
    elif name == "/save":
        path = session.save(arg)
        note(f"saved the transcript ({len(session.transcript)} messages) and settings to {path}")
    else:
        warn(f"unknown command {safe(name, 40)}; /help lists the commands")
    return True


def _line_editing() -> Callable[[], None]:
    """readline editing and a history file when stdin is a terminal; returns the saver."""
    import contextlib

    if not sys.stdin.isatty():
        return lambda: None
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return lambda: None
    from localllm.store import cache_root

    path = cache_root() / "chat_history"
    # First run, or unreadable: start with an empty history.
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)

    def save() -> None:
        # History is a convenience; never fail the chat over it.
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)

    return save


def chat_repl(session: ChatSession) -> None:
    """The interactive chat: read a message or /command, stream the reply, repeat."""
    from localllm.chat import MultilineInput, parse_slash_command
    from localllm.errors import LocalLLMError

    save_history = _line_editing()
    _chat_banner(session)
    pending = MultilineInput()
    writer = _ReplyWriter()
    try:
        while True:
            try:
                line = input(_chat_prompt(pending.pending))
            except EOFError:
                err.print()
                break
            except KeyboardInterrupt:
                err.print()
                if pending.pending:
                    pending.cancel()
                    note("[message discarded]")
                    continue
                break
            text = pending.feed(line)
            if text is None:
                continue
            try:
                command = parse_slash_command(text) if "\n" not in text else None
                if command is not None:
                    if not _run_slash_command(session, *command):
                        break
                elif text.strip():
                    # "//..." is a message that starts with "/", not a command.
                    if text.lstrip().startswith("//"):
                        text = text.lstrip()[1:]
                    _stream_turn(session, text, writer)
            except LocalLLMError as exc:
                writer.end_line()
                error(str(exc))
    finally:
        save_history()


def chat_one_shot(session: ChatSession, text: str, as_json: bool = False) -> None:
    """-p or piped stdin: only the reply on stdout (or one JSON object), stats on stderr."""
    from localllm.chat import stats_as_json
    from localllm.runtime import GenerationStats, TextChunk

    writer = _ReplyWriter()
    stats = None
    for item in session.send(text):
        if isinstance(item, TextChunk) and not as_json:
            writer.write(item.text)
        elif isinstance(item, GenerationStats):
            stats = item
    assert stats is not None  # the stream always ends with its stats
    if as_json:
        print_json(
            {
                "model": session.display_name,
                "reply": stats.text,
                "finish_reason": stats.finish_reason,
                "stats": stats_as_json(stats),
                "settings": session.settings(),
            }
        )
        return
    if not writer.wrote:
        writer.at_line_start = False  # an empty reply still ends with a newline
    writer.end_line()
    note(format_turn_status(stats, session.kv_bytes()))


# -------------------------------------------------------------------------- kv-calc
# (kv-calc tables and charts live below this line)

if TYPE_CHECKING:
    from localllm.kvcalc import KVCalcResult, KVRow, VerifyReport

_VERDICT_STYLE = {"fits": "ok", "tight": "warn", "too big": "error", "unknown": "muted"}
KV_CHART_WIDTH = 48


def _print_unwrapped(table: Table) -> None:
    """Print a wide table at its natural width: a wrapped row of figures is unreadable."""
    from rich.measure import Measurement

    width = Measurement.get(out, out.options.update_width(10_000), table).maximum
    previous = out.width  # print() caps its width at the console's, so widen the console
    out.width = max(previous, width)
    try:
        out.print(table)
    finally:
        out.width = previous


def _kv_types(row: KVRow) -> str:
    return row.type_k if row.type_k == row.type_v else f"{row.type_k}/{row.type_v}"


def render_kv_calc(result: KVCalcResult) -> None:
    """kv-calc's header, its table of rows and, for a sweep, the chart."""
    facts, spec = result.facts, result.facts.spec
    head = Table(box=None, show_header=False, pad_edge=False)
    head.add_column(style="label")
    head.add_column()
    head.add_row("model", Text(f"{safe(facts.label, 80)} ({facts.source})"))
    head.add_row(
        "attention",
        f"{spec.n_layers} layers, {spec.n_heads} heads, {spec.n_kv_heads} KV heads "
        f"({spec.attention_kind}, group {spec.gqa_group:g}), head dim {spec.head_dim}",
    )
    head.add_row(
        "KV per token",
        f"{format_bytes(result.per_token_bytes)}; as MHA "
        f"{format_bytes(round(result.per_token_bytes * result.gqa_saving_factor))}: "
        f"GQA saves {result.gqa_saving_factor:g}x",
    )
    weights = format_bytes(facts.weights_bytes) if facts.weights_bytes else "?"
    head.add_row("weights", f"{weights} ({safe(facts.weights_note)})")
    fa = "on" if result.request.flash_attn else "off"
    head.add_row("settings", f"flash attention {fa}, ubatch {result.request.ubatch}")
    head.add_row("available RAM", format_bytes(result.available_bytes))
    out.print(head)
    out.print()
    if result.request.budget_bytes is not None:
        render_kv_budget(result)
    else:
        render_kv_rows(result)
    if len(result.rows) > 1:
        out.print()
        render_kv_chart(result)
    for message in result.notes:
        note(message)
    for message in result.warnings:
        warn(message)


def render_kv_rows(result: KVCalcResult) -> None:
    swa = any(r.swa_cells is not None for r in result.rows)
    table = Table(box=None, header_style="label", pad_edge=False)
    columns = ["ctx", "batch", "K/V type", "cells", "K", "V", "KV", "per token",
               "MHA", "MQA"]  # fmt: skip
    if swa:
        columns += ["SWA cells", "SWA KV"]
    columns += ["compute", "total", "fit"]
    for col in columns:
        table.add_column(
            col, justify="left" if col in ("K/V type", "fit") else "right", no_wrap=True
        )
    for r in result.rows:
        cells = [str(r.ctx), str(r.batch), _kv_types(r), str(r.cells),
                 format_bytes(r.k_bytes), format_bytes(r.v_bytes), format_bytes(r.kv_bytes),
                 format_bytes(r.bytes_per_token), format_bytes(r.mha_kv_bytes),
                 format_bytes(r.mqa_kv_bytes)]  # fmt: skip
        if swa:
            cells += [str(r.swa_cells), format_bytes(r.swa_kv_bytes)]
        cells += [format_bytes(r.compute_bytes), format_bytes(r.total_bytes)]
        table.add_row(*cells, Text(r.verdict, style=_VERDICT_STYLE.get(r.verdict, "")))
    _print_unwrapped(table)


def render_kv_budget(result: KVCalcResult) -> None:
    budget = result.request.budget_bytes
    out.print(Text(f"largest context in {format_bytes(budget)}", style="label"))
    table = Table(box=None, header_style="label", pad_edge=False)
    for col in ("K/V type", "batch", "max ctx", "KV", "total"):
        table.add_column(col, justify="left" if col == "K/V type" else "right")
    trained = result.facts.spec.n_ctx_train
    for b in result.budget:
        types = b.type_k if b.type_k == b.type_v else f"{b.type_k}/{b.type_v}"
        if b.max_ctx:
            ctx = str(b.max_ctx)
            if b.capped:
                ctx = f"{ctx} (trained)" if b.max_ctx == trained else f">= {ctx}"
            table.add_row(types, str(b.batch), ctx, format_bytes(b.kv_bytes),
                          format_bytes(b.total_bytes))  # fmt: skip
        else:
            table.add_row(types, str(b.batch), Text("none fits", style="error"), "-", "-")
    out.print(table)


def render_kv_chart(result: KVCalcResult) -> None:
    """KV size per row as bars, the same model as MHA behind them, the weights as a line.

    The lecture's picture: past some context or batch the KV cache outgrows the weights.
    """
    rows = result.rows
    axis = "context" if len({r.ctx for r in rows}) > 1 else "batch"
    weights = result.facts.weights_bytes or 0
    show_mha = any(r.mha_kv_bytes > r.kv_bytes for r in rows)
    top = max([r.mha_kv_bytes if show_mha else r.kv_bytes for r in rows] + [weights]) or 1
    scale = KV_CHART_WIDTH / top
    mark = round(weights * scale) if weights else None
    labels = [f"{r.ctx} x{r.batch} {_kv_types(r)}" for r in rows]
    pad = max(len(label) for label in labels)
    title = Text(f"KV cache against {axis}  ", style="label")
    title.append("█ this model", style="ok")
    if show_mha:
        title.append("  ░ as MHA", style="muted")
    if mark is not None:
        title.append(f"  │ weights {format_bytes(weights)}", style="accent")
    out.print(title)
    for label, r in zip(labels, rows, strict=True):
        kv_len = round(r.kv_bytes * scale)
        mha_len = round(r.mha_kv_bytes * scale) if show_mha else 0
        line = Text(label.rjust(pad) + " ")
        over = bool(weights) and r.kv_bytes > weights
        for i in range(KV_CHART_WIDTH + 1):
            if mark is not None and i == mark:
                line.append("│", style="accent")
            elif i < kv_len:
                line.append("█", style="error" if over else "ok")
            elif i < mha_len:
                line.append("░", style="muted")
            else:
                line.append(" ")
        line.append(f" {format_bytes(r.kv_bytes)}", style="muted")
        if show_mha and r.mha_kv_bytes > r.kv_bytes:
            line.append(f" (MHA {format_bytes(r.mha_kv_bytes)})", style="muted")
        out.print(line)


def render_kv_verify(report: VerifyReport) -> None:
    """Estimate against what llama.cpp allocated, per quantity, with the difference."""
    out.print(Text(f"llama.cpp's own report for {safe(report.path)}", style="label"))
    table = Table(box=None, header_style="label", pad_edge=False)
    for col in ("ctx", "batch", "K/V type", "buffer", "estimate", "llama.cpp", "difference", ""):
        table.add_column(
            col, justify="left" if col in ("K/V type", "buffer", "") else "right", no_wrap=True
        )
    for v in report.lines:
        types = v.type_k if v.type_k == v.type_v else f"{v.type_k}/{v.type_v}"
        if v.error:
            table.add_row(str(v.ctx), str(v.batch), types, v.quantity, "-", "-", "-",
                          Text(safe(v.error, 100), style="error"))  # fmt: skip
            continue
        if v.quantity == "cells":
            est, act = str(v.estimate), str(v.actual)
            diff = str(v.difference) if v.difference is not None else "?"
        else:
            # llama.cpp prints MiB with 2 decimals: compare at that resolution.
            est = f"{v.estimate / 1048576:.2f} MiB" if v.estimate is not None else "?"
            act = f"{v.actual / 1048576:.2f} MiB" if v.actual is not None else "?"
            if v.exact:
                diff = "0.00 MiB"
            elif v.relative is None or v.difference is None:
                diff = "?"
            else:
                diff = f"{v.difference / 1048576:+.2f} MiB ({v.relative:+.1%})"
        if v.exact:
            verdict = Text("exact" if v.quantity == "cells" else "equal at 0.01 MiB", style="ok")
        else:
            verdict = Text("estimate", style="muted")
        table.add_row(str(v.ctx), str(v.batch), types, v.quantity, est, act, diff, verdict)
    _print_unwrapped(table)


# ------------------------------------------------------------------------- rope/ppl
# (ppl progress and rope-plan rendering live below this line)


def show_rope_plan(plan: Any) -> None:
    """On stderr, what a RoPE plan did: its sentence when extending, its warning if any."""
    if plan.n_ctx > plan.n_ctx_train or plan.method != "none":
        note(f"rope: {plan.description}")
    if plan.warning:
        warn(plan.warning)


class PplProgress:
    """A progress bar over the tokens a perplexity run decodes (silent off a terminal)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[muted]chunk {task.fields[chunk]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[muted]tokens"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("[accent]ppl {task.fields[ppl]}"),
            TimeRemainingColumn(),
            console=err,
            disable=not err.is_terminal,
        )
        self._task: Any = None

    def __enter__(self) -> PplProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)  # type: ignore[arg-type]

    def update(self, item: Any) -> None:
        fields = {
            "chunk": f"{item.chunk}/{item.chunks}",
            "tps": f"{item.tokens_per_second:.0f}",
            "ppl": f"{item.ppl:.4f}" if item.ppl is not None else "-",
        }
        if self._task is None:
            self._task = self._progress.add_task("ppl", total=item.tokens_total, **fields)
        self._progress.update(self._task, completed=item.tokens_done, **fields)


def render_ppl(result: Any) -> None:
    """The perplexity line (stdout) and how it was measured (stderr)."""
    out.print(f"PPL = {result.ppl:.4f} +/- {result.ppl_stderr:.5f}")
    note(
        f"{safe(result.model)} on {safe(result.text)}: ctx {result.ctx}, {result.chunks} "
        f"chunks, {result.tokens} tokens scored of {result.text_tokens}, "
        f"{result.tokens_per_second:.1f} tok/s over {result.seconds:.1f} s; "
        f"rope {result.rope.method}"
    )


# ---------------------------------------------------------------------------- bench
# (bench tables and progress live below this line)


def _stdout_is_pipe() -> bool:
    import os
    import stat

    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return True  # no real stdout (captured): behave as a script would want


_BENCH_STAGES = {
    "bandwidth": "measuring memory bandwidth",
    "loading": "loading the model",
    "hashing": "checksumming the model",
    "warmup": "warm-up",
    "depth": "prefilling depth",
    "rep": "run",
}


def render_bench(request: Any, events: Iterator[Any]) -> None:
    """Drive a bench run: warnings first, a progress bar on stderr, results on stdout.

    The progress bar shows when stderr is a terminal and stdout is not piped; then the
    output waits for the bar to finish. Without it, CSV and JSONL rows stream as each
    test ends, the way llama-bench prints them.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from localllm.bench import (
        BenchPlan,
        BenchProgress,
        BenchResult,
        BenchRun,
        format_csv_header,
        format_csv_row,
        format_json,
        format_jsonl_row,
        format_markdown,
    )

    show = err.is_terminal and not _stdout_is_pipe()
    held: list[str] = []

    def emit(text: str) -> None:
        if show:
            held.append(text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    progress = Progress(
        TextColumn("[label]{task.fields[test]}"),
        TextColumn("[muted]{task.fields[stage]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not show,
        redirect_stdout=False,
        redirect_stderr=False,
    )
    results: list[Any] = []
    run = None
    task: Any = None
    with progress:
        for event in events:
            if isinstance(event, BenchPlan):
                for message in event.warnings:
                    warn(message)
                for message in event.notes:
                    note(message)
                total = len(event.tests) * event.repetitions
                task = progress.add_task("bench", total=total, test="", stage="starting")
                if request.output == "csv":
                    emit(format_csv_header())
            elif isinstance(event, BenchProgress):
                stage = _BENCH_STAGES.get(event.stage, event.stage)
                if event.stage in ("rep", "depth"):
                    stage = f"{stage} {event.rep}/{event.reps}"
                test = f"{event.test} ({event.index}/{event.total})" if event.index else ""
                done = (event.index - 1) * event.reps + max(event.rep - 1, 0) if event.index else 0
                progress.update(task, test=test, stage=stage, completed=done)
            elif isinstance(event, BenchResult):
                results.append(event)
                progress.update(task, completed=len(results) * event.repetitions)
                if request.output == "csv":
                    emit(format_csv_row(event))
                elif request.output == "jsonl":
                    emit(format_jsonl_row(event))
            elif isinstance(event, BenchRun):
                run = event
    if request.output == "md":
        held.append(format_markdown(request, results, run))
    elif request.output == "json":
        held.append(format_json(results))
    if held:
        sys.stdout.write("".join(held))
        sys.stdout.flush()


# ----------------------------------------------------------------------------- pull
# (pull progress and listings live below this line)


@contextmanager
def download_progress(label: str) -> Iterator[Any]:
    """A progress bar on stderr (size, speed, ETA); yields the callback the core calls.

    Silent when stderr is not a terminal: scripts get the final status line only.
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    if not err.is_terminal:
        yield lambda done, total: None
        return
    columns = (
        TextColumn("[accent]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(label, total=None)  # a pulsing bar until the size is known
        started: list[bool] = []

        def update(done: int, total: int | None) -> None:
            if not started:  # the first report may be a resumed offset: not counted as speed
                started.append(True)
                progress.reset(task, total=total, completed=done)
            else:
                progress.update(task, completed=done, total=total)

        yield update


def render_hub_listing(listing: Any) -> None:
    """``pull REPO --list``: the GGUF files of a repo, their quants and sizes."""
    out.print(
        Text(f"{listing.repo}", style="label")
        + Text(f" @ {listing.revision[:12]}" + (" (gated)" if listing.gated else ""), "muted")
    )
    if not listing.files:
        note(f"{listing.repo} has no .gguf files ({listing.other_files} other files)")
        return
    table = Table(box=None, header_style="label", pad_edge=False)
    table.add_column("quant")
    table.add_column("size", justify="right")
    table.add_column("file")
    table.add_column("stored")
    for file in listing.files:
        table.add_row(
            Text(file.quant or "?"),
            format_bytes(file.size_bytes),
            Text(safe(file.path)),
            Text("yes", style="ok") if file.in_store else Text("-", style="muted"),
        )
    out.print(table)
    example = next((f.quant for f in listing.files if f.quant), None)
    if example:
        note(f"pull one with `localllm pull {listing.repo}:{example}`")


def render_pull_result(result: Any) -> None:
    """The one status line of a finished pull (stderr)."""
    if result.already_present:
        size = format_bytes(result.size_bytes)
        note(f"{result.filename}: already in the store, verified ({size})")
        return
    resumed = f", resumed at {format_bytes(result.resumed_from)}" if result.resumed_from else ""
    note(
        f"{result.filename}: sha256 verified and stored in {result.path.parent} "
        f"({format_bytes(result.size_bytes)}, sha256 {result.sha256[:12]}…{resumed})"
    )
