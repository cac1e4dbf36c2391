"""Chat sessions on disk: written after every turn, resumed with --resume, pruned, private."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from pathlib import Path

import pexpect
import pytest
from conftest import REPO

from localllm.chat.history import (
    KEEP_SESSIONS,
    history_enabled,
    list_sessions,
    load_session,
    save_session,
    sessions_dir,
)
from localllm.errors import InvalidArgument, LocalLLMError

PROMPT = ">>> "


def _record(messages: list[dict[str, str]]) -> dict[str, object]:
    return {
        "saved_at": "2026-11-26T20:00:00+00:00",
        "model": {"ref": "smollm2-135m", "path": "/x.gguf", "sha256": "ab" * 32},
        "settings": {"system": None, "sampling": {"temperature": 0.0}, "runtime": {"n_ctx": 512}},
        "messages": messages,
        "dropped_messages": 0,
    }


def test_a_session_file_is_private_and_reads_back(isolated_paths: Path) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    path = save_session("20261126-200000-abcd", _record(messages))
    assert path.parent == sessions_dir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = load_session(None)
    assert saved.id == "20261126-200000-abcd"
    assert saved.system == "be brief"
    assert [(m.role, m.content) for m in saved.messages] == [("user", "hi")]
    assert saved.model_sha256 == "ab" * 32


def test_only_the_newest_sessions_are_kept(isolated_paths: Path) -> None:
    for i in range(KEEP_SESSIONS + 5):
        path = save_session(f"s{i:04d}", _record([{"role": "user", "content": str(i)}]))
        os.utime(path, ns=(i * 10**9, i * 10**9))  # a clear order, however fast the disk
    kept = sorted(p.stem for p in sessions_dir().glob("*.json"))
    assert len(kept) == 200 == KEEP_SESSIONS
    assert kept[0] == "s0005" and kept[-1] == f"s{KEEP_SESSIONS + 4:04d}"


def test_a_corrupt_session_is_one_line_and_left_in_place(isolated_paths: Path) -> None:
    sessions_dir().mkdir(parents=True)
    bad = sessions_dir() / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(LocalLLMError) as caught:
        load_session("broken")
    assert "\n" not in str(caught.value) and "left in place" in str(caught.value)
    assert bad.read_text() == "{not json"
    assert list_sessions()[0].problem is not None


def test_session_ids_cannot_name_other_files(isolated_paths: Path) -> None:
    for bad in ("../etc/passwd", "a/b", ""):
        with pytest.raises(InvalidArgument, match="is not one localllm makes"):
            load_session(bad)


@pytest.mark.parametrize(("value", "on"), [("", True), ("0", True), ("1", False), ("yes", False)])
def test_history_can_be_turned_off_by_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, on: bool
) -> None:
    monkeypatch.setenv("LOCALLLM_NO_HISTORY", value)
    assert history_enabled() is on
    assert history_enabled(no_history=True) is False


def test_resume_without_sessions_is_one_line(cli, isolated_paths: Path) -> None:
    result = cli("chat", "--resume")
    assert result.exit_code == 1
    assert "no saved chat session" in result.error_line


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["smollm2-135m"], "MODEL"),
        (["--ctx", "1024"], "--ctx"),
        (["--template", "chatml"], "--template"),
        (["--kv-type", "q8_0"], "--kv-type"),
        (["--temp", "0", "--system", "x"], "--system"),
    ],
)
def test_resume_refuses_flags_that_change_the_conversation(
    cli, isolated_paths: Path, flags: list[str], named: str
) -> None:
    save_session("s1", _record([{"role": "user", "content": "hi"}]))
    result = cli("chat", "--resume", "s1", *flags)
    assert result.exit_code == 2
    assert f"drop {named} " in result.error_line and "own model, context" in result.error_line
    assert "--temp" in result.error_line  # it says which flags may change


@pytest.mark.slow
def test_resume_takes_new_sampling_flags(cli, store_with_smollm2: Path) -> None:
    record = _record(
        [{"role": "user", "content": "My cat is Pixel."}, {"role": "assistant", "content": "Nice."}]
    )
    record["model"] = {"ref": "smollm2-135m", "path": str(store_with_smollm2 / "x.gguf")}
    record["settings"]["sampling"] = {"temperature": 0.9, "top_k": 7, "max_tokens": 64}
    save_session("s1", record)
    result = cli(
        "chat", "--resume", "s1", "-p", "What is my cat called?", "--json",
        "--temp", "0", "--max-tokens", "6",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    reply = json.loads(result.stdout)
    sampling = reply["settings"]["sampling"]
    assert sampling["temperature"] == 0 and sampling["max_tokens"] == 6
    assert sampling["top_k"] == 7  # what was not given stays the session's
    assert reply["settings"]["runtime"]["n_ctx"] == 512
    assert reply["stats"]["generated_tokens"] <= 6


def test_resume_of_a_corrupt_session_keeps_the_file(cli, isolated_paths: Path) -> None:
    sessions_dir().mkdir(parents=True)
    (sessions_dir() / "bad1.json").write_text('{"format": "localllm-session/1"}')
    result = cli("chat", "--resume", "bad1")
    assert result.exit_code == 1 and "cannot be read" in result.error_line
    assert (sessions_dir() / "bad1.json").exists()


# ---------------------------------------------------------------- the REPL, for real


def _spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "COLUMNS": "200", "LINES": "50", "TERM": "xterm", "NO_COLOR": "1"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "localllm", "chat", *args],
        env=env,
        cwd=str(REPO),
        encoding="utf-8",
        timeout=90,
        dimensions=(50, 200),
    )
    child.expect_exact(PROMPT)
    return child


def _turn(child: pexpect.spawn, text: str) -> tuple[int, int]:
    """Send a message; (prompt tokens, newly evaluated) from its status line."""
    child.sendline(text)
    child.expect(r"(\d+) in(?: \((\d+) new\))? · \d+ out")
    total = int(child.match[1])
    fresh = int(child.match[2]) if child.match[2] else total
    child.expect_exact(PROMPT)
    return total, fresh


@pytest.mark.slow
def test_kill_9_after_a_turn_loses_nothing_and_resume_continues(
    store_with_smollm2: Path, tmp_path: Path
) -> None:
    child = _spawn("--temp", "0", "--seed", "3", "--max-tokens", "24", "--system", "Be brief.")
    _turn(child, "My cat is called Pixel.")
    os.kill(child.pid, signal.SIGKILL)  # no exit path runs: only what was written survives
    child.expect(pexpect.EOF)
    child.close()
    files = list(sessions_dir().glob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    roles = [m["role"] for m in record["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert record["messages"][1]["content"] == "My cat is called Pixel."
    assert record["settings"]["sampling"]["temperature"] == 0

    resumed = _spawn("--resume")
    total, fresh = _turn(resumed, "What is my cat called?")
    assert fresh == total  # the restored history is evaluated once, on the first new turn
    total2, fresh2 = _turn(resumed, "Thanks.")
    assert fresh2 < total2  # then the KV cache holds it
    out = tmp_path / "after.json"
    resumed.sendline(f"/save {out}")
    resumed.expect_exact(PROMPT)
    resumed.sendline("/exit")
    resumed.expect(pexpect.EOF)
    saved = json.loads(out.read_text())
    contents = [m["content"] for m in saved["messages"]]
    assert contents[:3] == record_contents(record)
    assert contents[3] == "What is my cat called?" and contents[5] == "Thanks."
    assert saved["settings"]["system"] == "Be brief."


def record_contents(record: dict) -> list[str]:
    return [m["content"] for m in record["messages"]]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flag", "env"])
def test_no_history_writes_nothing(
    store_with_smollm2: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "env":
        monkeypatch.setenv("LOCALLLM_NO_HISTORY", "1")
    child = _spawn("--temp", "0", "--max-tokens", "4", *(["--no-history"] if how == "flag" else []))
    _turn(child, "Hello.")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert not sessions_dir().exists() or not list(sessions_dir().glob("*.json"))


@pytest.mark.slow
def test_sessions_command_lists_this_session(store_with_smollm2: Path) -> None:
    child = _spawn("--temp", "0", "--max-tokens", "4")
    _turn(child, "Remember the word tangerine.")
    child.sendline("/sessions")
    child.expect_exact(PROMPT)
    listing = child.before
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    (session,) = sessions_dir().glob("*.json")
    assert session.stem in listing and "Remember the word tangerine." in listing
