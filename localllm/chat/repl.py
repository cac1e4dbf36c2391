"""The chat REPL: input lines and slash commands, one streamed reply at a time, signals.

A first Ctrl-C during a reply stops it softly (the partial reply stays in the history),
a second at once; Ctrl-C or Ctrl-D at the prompt leaves. Keys typed during a reply are
not echoed into it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from localllm.chat.history import list_sessions, new_session_id, save_session
from localllm.chat.saved_state import StateWriter
from localllm.chat.session import ChatSession, HistoryTrimmed, stats_as_json
from localllm.errors import LocalLLMError
from localllm.generation import GenerationStats, TextChunk
from localllm.paths import cache_root
from localllm.text import format_bytes
from localllm.views.chat import (
    ReplyWriter,
    chat_banner,
    chat_help,
    chat_prompt,
    format_turn_status,
    render_chat_stats,
    render_sessions,
)
from localllm.views.console import err, error, note, print_json, safe, warn

__all__ = [
    "SLASH_COMMANDS",
    "MultilineInput",
    "chat_one_shot",
    "chat_repl",
    "parse_slash_command",
]

# name -> (argument, what it does); the REPL's /help is rendered from this.
SLASH_COMMANDS: dict[str, tuple[str, str]] = {
    "/help": ("", "show this help"),
    "/reset": ("", "forget the conversation (the system prompt stays)"),
    "/system": ("[TEXT]", "set the system prompt (no TEXT: show it)"),
    "/stats": ("", "session statistics: tokens, speed, KV cache, settings"),
    "/save": ("FILE", "write the transcript and settings as JSON"),
    "/sessions": ("", "saved sessions; `localllm chat --resume ID` continues one"),
    "/exit": ("", "leave (also /quit, /bye, Ctrl-D, Ctrl-C at the prompt)"),
}
_ALIASES = {"/quit": "/exit", "/bye": "/exit", "/?": "/help", "/clear": "/reset"}


def parse_slash_command(line: str) -> tuple[str, str] | None:
    """``"/save a.json"`` -> ``("/save", "a.json")``; ``None`` when it is a message."""
    stripped = line.strip()
    if not stripped.startswith("/") or stripped.startswith("//"):
        return None
    name, _, arg = stripped.partition(" ")
    name = name.lower()
    return _ALIASES.get(name, name), arg.strip()


@dataclass
class MultilineInput:
    """Joins REPL lines into one message.

    A line ending in a backslash continues on the next line; a line that is exactly
    ``\"\"\"`` opens a block that the next such line closes (text may follow the opening
    quotes on the same line).
    """

    lines: list[str] = field(default_factory=list)
    in_block: bool = False

    @property
    def pending(self) -> bool:
        """Whether more lines are needed before the message is complete."""
        return self.in_block or bool(self.lines)

    def feed(self, line: str) -> str | None:
        """Add one line; return the full message once it is complete."""
        if self.in_block:
            if line.rstrip().endswith('"""'):
                self.lines.append(line.rstrip()[:-3])
                return self._finish()
            self.lines.append(line)
            return None
        if not self.lines and line.lstrip().startswith('"""'):
            rest = line.lstrip()[3:]
            if rest.rstrip().endswith('"""') and rest.strip() != "":
                return rest.rstrip()[:-3]
            self.in_block = True
            if rest.strip():
                self.lines.append(rest)
            return None
        if line.endswith("\\"):
            self.lines.append(line[:-1])
            return None
        self.lines.append(line)
        return self._finish()

    def cancel(self) -> None:
        self.lines.clear()
        self.in_block = False

    def _finish(self) -> str:
        text = "\n".join(self.lines)
        self.cancel()
        return text


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
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, saved)

    return restore


def _stream_turn(session: ChatSession, text: str, writer: ReplyWriter) -> GenerationStats | None:
    """One reply: streamed to stdout; a first Ctrl-C stops it softly, a second at once."""
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


def _run_slash_command(session: ChatSession, name: str, arg: str, record: _Recorder) -> bool:
    """Do one /command; False means leave the REPL."""
    if name == "/exit":
        return False
    if name == "/help":
        chat_help(SLASH_COMMANDS)
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
        record.wait()
        if record.state.last is not None:
            last = record.state.last
            note(
                f"KV state: {last.n_tokens} tokens, {format_bytes(last.bytes)} written in "
                f"{last.seconds:.2f} s after the last reply (`chat --resume` loads it)"
            )
    elif name == "/save":
        path = session.save(arg)
        note(f"saved the transcript ({len(session.transcript)} messages) and settings to {path}")
    elif name == "/sessions":
        render_sessions(list_sessions(), current=session.session_id)
    else:
        warn(f"unknown command {safe(name, 40)}; /help lists the commands")
    return True


def _line_editing() -> Callable[[], None]:
    """readline editing and a history file when stdin is a terminal; returns the saver."""
    if not sys.stdin.isatty():
        return lambda: None
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return lambda: None
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


class _Recorder:
    """Writes the session to disk after every turn, then its KV state (in the background);
    a failure is said once, never fatal."""

    def __init__(self, session: ChatSession, enabled: bool, state_max: int) -> None:
        self.session = session
        self.enabled = enabled
        self.failed = False
        self.state = StateWriter(session, state_max if enabled else 0)
        self.state_failed = False
        if enabled and session.session_id is None:
            session.session_id = new_session_id()

    def __call__(self, turn: bool = False) -> None:
        if not self.enabled or self.session.session_id is None:
            return
        try:
            save_session(self.session.session_id, self.session.transcript_json())
        except OSError as exc:
            if not self.failed:
                warn(f"cannot save this session ({exc.strerror or exc}); the chat goes on")
            self.failed = True
            return
        if turn:
            self.state.start()

    def wait(self) -> None:
        """Let the KV state write finish before the context is used again."""
        self.state.wait()
        if self.state.failure and not self.state_failed:
            warn(f"the KV state is not saved ({self.state.failure}); --resume re-reads instead")
            self.state_failed = True


def chat_repl(session: ChatSession, keep_history: bool = True, state_max: int = 0) -> None:
    """The interactive chat: read a message or /command, stream the reply, repeat.

    With ``keep_history`` the conversation is written to disk after every turn, and its
    KV state too when ``state_max`` (bytes for all saved states) is not 0.
    """
    save_history = _line_editing()
    record = _Recorder(session, keep_history, state_max)
    chat_banner(session)
    if record.enabled:
        note(f"session {session.session_id} is saved after every turn (--no-history: off)")
    pending = MultilineInput()
    writer = ReplyWriter()
    try:
        while True:
            try:
                line = input(chat_prompt(pending.pending))
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
                    if not _run_slash_command(session, *command, record):
                        break
                    if command[0] in ("/reset", "/system"):
                        record()
                elif text.strip():
                    # "//..." is a message that starts with "/", not a command.
                    if text.lstrip().startswith("//"):
                        text = text.lstrip()[1:]
                    record.wait()
                    try:
                        _stream_turn(session, text, writer)
                    finally:
                        record(turn=True)  # completed or interrupted, the turn is on disk
            except LocalLLMError as exc:
                writer.end_line()
                error(str(exc))
    finally:
        record.wait()
        save_history()


def chat_one_shot(session: ChatSession, text: str, as_json: bool = False) -> None:
    """-p or piped stdin: only the reply on stdout (or one JSON object), stats on stderr."""
    writer = ReplyWriter()
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
