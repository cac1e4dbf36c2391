"""The real `localllm chat` REPL driven through a pseudo-terminal on the real SmolLM2."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pexpect
import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

PROMPT = ">>> "
STATUS = re.compile(r"(\d+) in(?: \((\d+) new\))? · (\d+) out · .*?KV (\d+)/(\d+) cells[^\n]*\n")
SYSTEM = "You are a helpful assistant."
# Long questions with short replies fill a 256-token context in a few cheap turns.
SLASHED = "/etc/hosts is a file. What is it for?"  # sent as "//etc/hosts ..."
FILLER = "The quick brown fox jumps over the lazy dog near the river on a sunny day. " * 2


def _spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "COLUMNS": "200", "LINES": "50", "TERM": "xterm", "NO_COLOR": "1"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "localllm", "chat", "--temp", "0", "--seed", "5", *args],
        env=env,
        cwd=str(REPO),
        encoding="utf-8",
        timeout=90,
        dimensions=(50, 200),
    )
    child.expect_exact(PROMPT)
    return child


def _say(child: pexpect.spawn, text: str) -> re.Match[str]:
    """Send one message, wait for its status line and the next prompt; the status match."""
    child.sendline(text)
    child.expect(STATUS)
    match = child.match
    child.expect_exact(PROMPT)
    return match


def _command(child: pexpect.spawn, line: str) -> str:
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before


def _leave(child: pexpect.spawn, how: str) -> int:
    if how == "eof":
        child.sendeof()
    elif how == "intr":
        child.sendintr()
    else:
        child.sendline(how)  # /exit, /quit, /bye
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def _counts(smollm2_loaded, messages: list[dict[str, str]]) -> int:
    from support.reference_chat import reference_prompt_tokens

    from localllm.generation import ChatMessage

    return len(reference_prompt_tokens(smollm2_loaded, [ChatMessage(**m) for m in messages]))


def test_two_turns_keep_history_and_reset_forgets(
    store_with_smollm2: Path, smollm2_loaded, tmp_path: Path
) -> None:
    child = _spawn("--max-tokens", "24", "--system", SYSTEM)
    first = _say(child, "My cat is called Pixel.")
    second = _say(child, "What is my cat called?")
    saved = tmp_path / "two.json"
    assert "saved the transcript" in _command(child, f"/save {saved}")
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    # Turn two's prompt is the whole history, formatted by the GGUF's own template,
    # and only its new suffix was evaluated (the KV prefix of turn one was reused).
    assert int(first[1]) == _counts(smollm2_loaded, messages[:2])
    assert int(second[1]) == _counts(smollm2_loaded, messages[:4])
    assert second[2] is not None and int(second[2]) < int(second[1])

    assert "conversation forgotten" in _command(child, "/reset")
    third = _say(child, "What is my cat called?")
    # After /reset the prompt is the system prompt and the new question only.
    expected = [{"role": "system", "content": SYSTEM}, messages[3]]
    assert int(third[1]) == _counts(smollm2_loaded, expected)
    _command(child, f"/save {saved}")
    after = json.loads(saved.read_text())["messages"]
    assert after[:2] == expected and len(after) == 3

    assert _leave(child, "eof") == 0
    # readline history was kept in the isolated cache directory.
    history = Path(os.environ["XDG_CACHE_HOME"]) / "localllm" / "chat_history"
    assert "What is my cat called?" in history.read_text()


def test_ctrl_c_mid_reply_stops_it_and_keeps_the_session(
    store_with_smollm2: Path, tmp_path: Path, cli
) -> None:
    ask = "Write a very long story about a dragon and a knight."
    # First, that this reply would run all 160 tokens: a Ctrl-C that came after its end
    # would then time out below instead of failing.
    uncut = cli("chat", "-p", ask, "--temp", "0", "--seed", "5", "--max-tokens", "160", "--json")
    assert json.loads(uncut.stdout)["finish_reason"] == "length", uncut.stderr
    child = _spawn("--max-tokens", "160")
    child.sendline(ask)
    child.expect_exact(ask + "\r\n")  # the terminal's echo of the line
    child.expect(r"\w+\W+\w+")  # the reply is streaming
    child.sendintr()
    child.expect_exact("[interrupted]")
    stopped = child.expect(STATUS)
    assert stopped == 0 and int(child.match[3]) < 160
    child.expect_exact(PROMPT)

    after = _say(child, "Thanks. Now say just hi.")
    assert int(after[3]) > 0
    saved = tmp_path / "interrupted.json"
    _command(child, f"/save {saved}")
    data = json.loads(saved.read_text())
    partial = data["messages"][1]
    assert partial["role"] == "assistant" and partial["content"].strip()
    assert data["turns"][0]["finish_reason"] == "interrupted"
    assert data["turns"][0]["generated_tokens"] < 160
    # Ctrl-C at the prompt leaves cleanly.
    assert _leave(child, "intr") == 0


def test_overflow_drops_old_turns_and_says_so_once(
    store_with_smollm2: Path, smollm2_loaded, tmp_path: Path
) -> None:
    child = _spawn("--ctx", "256", "--max-tokens", "32", "--system", SYSTEM)
    statuses, shown = [], []
    for n in (3, 4, 5, 6):
        child.sendline(f"{FILLER}Tell me one fact about the number {n}.")
        child.expect(STATUS)
        statuses.append(child.match)
        shown.append(child.before)
        child.expect_exact(PROMPT)
    # A message that cannot fit at all gets one clear line and the chat goes on.
    child.sendline("word " * 300)
    child.expect(r"error: this message is \d+ tokens.*context holds 256")
    child.expect_exact(PROMPT)
    statuses.append(_say(child, "And the number 7?"))
    saved = tmp_path / "overflow.json"
    _command(child, f"/save {saved}")
    stats = re.sub(r"\x1b\[[0-9;]*m", "", _command(child, "/stats"))  # NO_COLOR keeps bold
    assert _leave(child, "/bye") == 0

    # The user is told once, however many turns are dropped later.
    assert "".join(shown).count("is full: dropped the oldest") == 1
    for status in statuses:
        assert int(status[4]) <= 256 and int(status[5]) == 256
        assert int(status[1]) + 32 <= 256
    data = json.loads(saved.read_text())
    dropped = data["dropped_messages"]
    assert dropped >= 4
    messages = data["messages"]
    assert messages[0] == {"role": "system", "content": SYSTEM}
    # The last prompt was the system prompt plus the turns that were not dropped.
    in_context = [messages[0], *messages[1 + dropped : -1]]
    assert int(statuses[-1][1]) == _counts(smollm2_loaded, in_context)
    # /stats counts what was dropped, and what is left (system prompt aside).
    kept = len(messages) - 1 - dropped
    assert re.search(rf"history\s+{kept} messages in context, {dropped} dropped to fit", stats)


def test_multiline_input_and_help(store_with_smollm2: Path, tmp_path: Path) -> None:
    child = _spawn("--max-tokens", "8")
    help_text = _command(child, "/help")
    for name in ("/help", "/reset", "/system", "/stats", "/save", "/exit", '"""'):
        assert name in help_text
    shown = []
    child.sendline('"""')
    child.sendline("first line")
    child.sendline('second line"""')
    child.expect(STATUS)
    shown.append(child.before)
    child.expect_exact(PROMPT)
    child.sendline("third \\")
    child.sendline("fourth")
    child.expect(STATUS)
    shown.append(child.before)
    child.expect_exact(PROMPT)
    # A doubled slash sends the line as a message that starts with one slash.
    child.sendline("/" + SLASHED)
    child.expect(STATUS)
    shown.append(child.before)
    child.expect_exact(PROMPT)
    assert "system: (none)" in _command(child, "/system")
    _command(child, "/system Be brief.")
    stats = re.sub(r"\x1b\[[0-9;]*m", "", _command(child, "/stats"))  # NO_COLOR keeps bold
    assert "turns" in stats and "Be brief." in stats and "KV cache" in stats
    saved = tmp_path / "multi.json"
    _command(child, f"/save {saved}")
    assert "unknown command" in _command(child, "/nope")
    assert _leave(child, "/exit") == 0
    data = json.loads(saved.read_text())
    users = [m["content"] for m in data["messages"] if m["role"] == "user"]
    assert users == ["first line\nsecond line", "third \nfourth", SLASHED]
    assert data["messages"][0] == {"role": "system", "content": "Be brief."}
    # A reply that used its whole budget says so, one that ended by itself does not.
    reasons = [turn["finish_reason"] for turn in data["turns"]]
    assert "length" in reasons
    for reason, text in zip(reasons, shown, strict=True):
        assert ("[reply cut at --max-tokens 8]" in text) == (reason == "length"), text
