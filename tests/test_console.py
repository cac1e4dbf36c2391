"""The consoles (localllm.views.console): a line for a stream Rich would not style is
written as Rich writes it, without importing Rich; a terminal's line is Rich's."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from localllm.views import console

LINES = [
    ("error: no such model: [bold]x[/] \x07bell\rreturn", "error"),
    ("warning: " + "a long line " * 20, "warn"),
    ("31 in · 9 out · prompt 245.1 tok/s · KV 40/4096 cells", "muted"),
]


def _rich(text: str, style: str, **kwargs: object) -> str:
    from rich.console import Console
    from rich.text import Text

    buf = io.StringIO()
    made = Console(file=buf, theme=console.theme(), highlight=False, soft_wrap=True, **kwargs)  # type: ignore[arg-type]
    made.print(Text(text, style=style))
    return buf.getvalue()


@pytest.mark.parametrize(("text", "style"), LINES)
def test_a_plain_line_is_what_rich_writes(
    text: str, style: str, capsys: pytest.CaptureFixture[str]
) -> None:
    lazy = console.LazyConsole(stderr=True)
    assert lazy.plain()  # captured stderr is not a terminal
    lazy.line(text, style)
    assert capsys.readouterr().err == _rich(text, style)
    assert lazy._console is None  # written without making the console


def test_forced_colour_is_styled_by_rich(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    lazy = console.LazyConsole(stderr=True)
    assert not lazy.plain()
    lazy.line(*LINES[0])
    # One style for the whole line: the red error line is red to its end.
    assert capsys.readouterr().err == _rich(*LINES[0], force_terminal=True)
    assert _rich(*LINES[0], force_terminal=True).startswith("\x1b[1;31merror: no such model")
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # Rich's own override wins over FORCE_COLOR
    assert console.LazyConsole(stderr=True).plain()


def test_note_warn_and_error_go_through_the_lazy_console(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(console, "err", console.LazyConsole(stderr=True))
    console.note("loaded")
    console.warn("careful")
    console.error("broken")
    assert capsys.readouterr().err == "loaded\nwarning: careful\nerror: broken\n"


def test_the_lazy_console_is_the_rich_console(capsys: pytest.CaptureFixture[str]) -> None:
    from rich.console import Console

    lazy = console.LazyConsole(stderr=False)
    assert isinstance(lazy.console, Console) and lazy.console is lazy.console
    lazy.width = 123  # attributes are the console's, read and written
    assert lazy.console.width == 123 == lazy.width
    lazy.print("[accent]x[/]")  # the theme's styles resolve
    assert capsys.readouterr().out == "x\n"


@pytest.mark.slow
def test_a_one_shot_chat_read_by_a_script_imports_no_rich(store_with_smollm2: object) -> None:
    """What a script calling `chat -p` pays (benchmarks/chat_oneshot.md): its stderr is a
    pipe, so the status line is written without Rich."""
    code = (
        "import sys\nfrom localllm.cli import main\n"
        "sys.argv = ['localllm', 'chat', '-p', 'hi', '--temp', '0', '--max-tokens', '2']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print('rich' in sys.modules, file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    *status, imported = out.stderr.strip().splitlines()
    assert out.returncode == 0 and imported == "False", out.stderr
    assert " in · " in status[-1] and " out · " in status[-1]  # the status line, plain
