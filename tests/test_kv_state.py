"""Saved KV states (#25): a resumed chat loads its cells instead of re-reading the history;
a state that does not fit, or is damaged, is said in one line and the history is re-read."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pexpect
import pytest
from conftest import REPO

from localllm.chat.history import kv_dir, list_sessions, prune_sessions, save_session
from localllm.chat.opening import ChatRequest, open_session
from localllm.chat.saved_state import (
    DEFAULT_STATE_MAX,
    ENV_STATE_MAX,
    StateWriter,
    restore_state,
    state_max,
)
from localllm.chat.session import ChatSession
from localllm.errors import InvalidArgument
from localllm.generation import GenerationStats
from localllm.runtime import LoadOptions, load_model
from localllm.runtime.kv_state import (
    KvStateError,
    StateHeader,
    load_seq_state,
    mismatch,
    prune_states,
    read_header,
    save_seq_state,
    state_files,
)
from localllm.runtime.params import SamplingOptions

SYSTEM = "You are a terse assistant. " + " ".join(f"Rule {i}: be brief." for i in range(40))
TEXT = "The lighthouse keeper climbed the stairs every evening to light the lamp. " * 12


def _header(**changes: object) -> StateHeader:
    fields = dict(
        model_sha256="ab" * 32, n_ctx=512, type_k="f16", type_v="f16", flash_attn=True,
        swa_full=False, rope=None, template={"name": "chatml", "source": "gguf"},
        library="0.3.36",
    )  # fmt: skip
    return StateHeader(**{**fields, **changes})  # type: ignore[arg-type]


# ---------------------------------------------------------------- no model


def test_mismatch_names_the_first_field_that_differs() -> None:
    assert mismatch(_header(), _header()) is None
    assert "another model" in (mismatch(_header(model_sha256="cd" * 32), _header()) or "")
    said = mismatch(_header(n_ctx=1024), _header())
    assert said == "it was saved with n_ctx 1024, this session has 512"
    assert "type_v 'q8_0'" in (mismatch(_header(type_v="q8_0"), _header()) or "")


def test_a_missing_or_garbage_header_is_refused(tmp_path: Path) -> None:
    files = state_files(tmp_path, "s1")
    with pytest.raises(KvStateError, match="none on disk"):
        read_header(files)
    files.header.write_bytes(os.urandom(300))
    with pytest.raises(KvStateError, match="header"):
        read_header(files)
    files.header.write_text(json.dumps({"format": "localllm-kv-state/1", "n_ctx": "x"}))
    with pytest.raises(KvStateError, match="header"):
        read_header(files)


def _fake_state(directory: Path, key: str, size: int, age: float) -> None:
    files = state_files(directory, key)
    directory.mkdir(parents=True, exist_ok=True)
    files.state.write_bytes(b"\0" * size)
    files.header.write_text("{}")
    stamp = time.time() - age
    for path in (files.state, files.header):
        os.utime(path, (stamp, stamp))


def test_the_size_cap_drops_the_oldest_states(tmp_path: Path) -> None:
    for i, key in enumerate(["new", "mid", "old"]):
        _fake_state(tmp_path, key, 1000, age=10.0 * i)
    # Each pair is 1002 bytes: two fit in 2500, the oldest goes.
    assert prune_states(tmp_path, max_bytes=2500) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mid.json",
        "mid.kv",
        "new.json",
        "new.kv",
    ]
    assert prune_states(tmp_path, max_bytes=1500) == ["mid"]
    assert prune_states(tmp_path, max_bytes=10) == ["new"]
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writes_temp_file_goes_once_stale(tmp_path: Path) -> None:
    _fake_state(tmp_path, "s1", 10, age=0)
    stale, fresh = tmp_path / ".s1.kv.abc.tmp", tmp_path / ".s1.kv.def.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert prune_states(tmp_path) == []
    assert not stale.exists() and fresh.exists()  # a write in flight elsewhere stays


def test_states_go_with_their_sessions(isolated_paths: Path) -> None:
    record = {
        "saved_at": "2026-12-07T12:00:00+00:00",
        "model": {"ref": "smollm2-135m"},
        "settings": {"system": None, "sampling": {}, "runtime": {}},
        "messages": [{"role": "user", "content": "hi"}],
    }
    for i in range(4):
        save_session(f"s{i}", record)
        _fake_state(kv_dir(), f"s{i}", 100 + i, age=0)
        os.utime(
            Path(os.environ["XDG_STATE_HOME"]) / "localllm" / "sessions" / f"s{i}.json",
            (time.time() - 100 + i, time.time() - 100 + i),
        )
    _fake_state(kv_dir(), "orphan", 5, age=0)  # its session is gone
    sizes = {row.id: row.state_bytes for row in list_sessions()}
    assert sizes == {"s3": 105, "s2": 104, "s1": 103, "s0": 102}
    assert prune_sessions(keep=2) == 2
    assert sorted(p.stem for p in kv_dir().glob("*.kv")) == ["s2", "s3"]


def test_the_cap_comes_from_the_flag_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_STATE_MAX, raising=False)
    assert state_max() == DEFAULT_STATE_MAX
    monkeypatch.setenv(ENV_STATE_MAX, "512MiB")
    assert state_max() == 512 << 20
    assert state_max("1GiB") == 1 << 30
    assert state_max("0") == 0 and state_max("off") == 0
    with pytest.raises(InvalidArgument, match="--kv-state-max 'lots'"):
        state_max("lots")
    monkeypatch.setenv(ENV_STATE_MAX, "-3")
    with pytest.raises(InvalidArgument, match=ENV_STATE_MAX):
        state_max()


# ---------------------------------------------------------------- llama.cpp, SmolLM2
# The round trip on llama-cpp-python's Llama (an independent holder of a context): where
# its context and its token bookkeeping live.


def context_tokens(llama: Any) -> tuple[Any, list[int]]:
    """The raw context pointer and the tokens its sequence 0 holds."""
    return llama._ctx.ctx, [int(t) for t in llama.input_ids[: llama.n_tokens]]


def adopt_tokens(llama: Any, tokens: Sequence[int]) -> None:
    """Tell ``Llama`` that sequence 0 now holds ``tokens`` (loaded behind its back)."""
    n = len(tokens)
    llama.input_ids[:n] = tokens
    llama.n_tokens = n
    llama._requires_eval = True  # the logits are not the last token's: re-decode one


def _last_logits(model: object) -> np.ndarray:
    import llama_cpp

    llama = model.llama  # type: ignore[attr-defined]
    ptr = llama_cpp.llama_get_logits_ith(llama._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llama.n_vocab(),)).copy()


@pytest.mark.slow
def test_a_loaded_state_gives_the_logits_of_a_re_read(smollm2_path: Path, tmp_path: Path) -> None:
    """The next-token logits after a loaded state equal those of the history read again
    (then the new tokens, as a live chat evaluates them). Reading history and new tokens
    in ONE batch differs by up to ~0.7 here, loaded state or not (llama.cpp's kernels
    for other batch shapes): there the choice of token must agree."""
    model = load_model(smollm2_path, LoadOptions(n_ctx=1024, seed=1))
    try:
        llama = model.llama
        prompt = model.tokenize(TEXT)
        follow = model.tokenize(" Then one night the lamp", add_bos=False)
        llama.eval(prompt)
        ctx, held = context_tokens(llama)
        assert held == prompt
        files = state_files(tmp_path, "s1")
        saved = save_seq_state(ctx, 0, held, files, _header(n_ctx=1024))
        assert saved.bytes == files.state.stat().st_size and saved.n_tokens == len(prompt)

        model.reset()
        llama.eval(prompt)  # the history read again, then the new tokens
        llama.eval(follow)
        reread = _last_logits(model)
        model.reset()
        llama.eval(prompt + follow)
        one_pass = _last_logits(model)

        model.reset()
        assert model.kv_used == 0
        loaded = load_seq_state(ctx, 0, files, read_header(files))
        assert list(loaded.tokens) == prompt
        adopt_tokens(llama, loaded.tokens)
        assert model.kv_used == len(prompt)
        llama.eval(follow)  # only the new tokens
        resumed = _last_logits(model)
    finally:
        model.close()
    np.testing.assert_allclose(resumed, reread, rtol=0, atol=1e-4)
    assert int(resumed.argmax()) == int(one_pass.argmax())


def _session(**request: object) -> ChatSession:
    sampling = SamplingOptions(temperature=0.0, seed=3, max_tokens=8)
    return open_session(
        ChatRequest(**{"sampling": sampling, "n_ctx": 1024, "system": SYSTEM, **request})  # type: ignore[arg-type]
    )


def _turn(session: ChatSession, text: str) -> GenerationStats:
    stats = list(session.send(text))[-1]
    assert isinstance(stats, GenerationStats)
    return stats


@pytest.fixture
def saved_session(store_with_smollm2: Path) -> tuple[str, list]:
    """A session of one turn whose KV state is on disk (key "s1"), and its history."""
    session = _session()
    try:
        session.session_id = "s1"
        _turn(session, "Name a colour.")
        writer = StateWriter(session, 1 << 30)
        writer.start()
        writer.wait()
        assert writer.failure is None and writer.last is not None
        assert writer.last.n_tokens == session.loaded.kv_used
        return "s1", list(session.history)
    finally:
        session.close()


@pytest.mark.slow
def test_a_state_over_the_cap_is_not_kept(store_with_smollm2: Path) -> None:
    session = _session()
    try:
        session.session_id = "s1"
        _turn(session, "Name a colour.")
        writer = StateWriter(session, 100_000)  # SmolLM2: 22.5 KiB a token
        writer.start()
        writer.wait()
    finally:
        session.close()
    assert writer.last is None and "over --kv-state-max" in (writer.failure or "")
    assert not list(kv_dir().iterdir())


def _resume(session_id: str, history: list, **request: object) -> tuple[object, GenerationStats]:
    session = _session(**request)
    try:
        session.restore(history)
        session.session_id = session_id
        restored = restore_state(session)
        return restored, _turn(session, "And another?")
    finally:
        session.close()


@pytest.mark.slow
def test_resume_loads_the_state_and_evaluates_only_the_new_turn(saved_session) -> None:
    restored, stats = _resume(*saved_session)
    assert restored.note is None and restored.tokens > 60  # type: ignore[attr-defined]
    assert stats.prompt_from_state == restored.tokens  # type: ignore[attr-defined]
    assert stats.prompt_evaluated == stats.prompt_tokens - stats.prompt_from_state
    assert stats.prompt_evaluated < 20
    assert 0 < stats.state_load_seconds <= stats.ttft_seconds
    # The same reply as a resume that reads the whole history again (greedy).
    (kv_dir() / "s1.json").unlink()
    restored2, reread = _resume(*saved_session)
    assert "none on disk" in restored2.note  # type: ignore[attr-defined]
    assert reread.prompt_evaluated == reread.prompt_tokens and reread.prompt_from_state == 0
    assert reread.text == stats.text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("request_change", "said"),
    [
        ({"n_ctx": 2048}, "n_ctx 1024, this session has 2048"),
        ({"options": LoadOptions(type_k="q8_0", type_v="q8_0")}, "type_k 'f16'"),
        ({"options": LoadOptions(flash_attn=False)}, "flash_attn True"),
    ],
)
def test_a_state_made_with_other_settings_is_re_read_with_a_note(
    saved_session, request_change: dict, said: str
) -> None:
    restored, stats = _resume(*saved_session, **request_change)
    assert restored.tokens == 0 and said in restored.note  # type: ignore[attr-defined]
    assert restored.note.startswith("saved KV state not used (")  # type: ignore[attr-defined]
    assert stats.prompt_evaluated == stats.prompt_tokens and stats.prompt_from_state == 0


@pytest.mark.slow
def test_a_state_of_another_model_file_is_re_read_with_a_note(saved_session) -> None:
    header = kv_dir() / "s1.json"
    data = json.loads(header.read_text())
    data["model_sha256"] = "0" * 64  # as a state written by another model file
    header.write_text(json.dumps(data))
    restored, stats = _resume(*saved_session)
    assert "another model file" in restored.note  # type: ignore[attr-defined]
    assert stats.prompt_evaluated == stats.prompt_tokens


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "random", "random-header"])
def test_a_damaged_state_never_reaches_llama_cpp(saved_session, damage: str) -> None:
    files = state_files(kv_dir(), "s1")
    size = files.state.stat().st_size
    history = saved_session[1]
    if damage == "truncated":
        with files.state.open("r+b") as fh:
            fh.truncate(size // 2)
        said = f"{size // 2} bytes, {size} were written"
    elif damage == "random":
        files.state.write_bytes(os.urandom(size))
        said = "does not start as llama.cpp's sequence state"
    elif damage == "random-header":
        files.header.write_bytes(os.urandom(400))
        said = "header cannot be read"
    restored, stats = _resume(saved_session[0], history)
    assert restored.tokens == 0 and said in restored.note  # type: ignore[attr-defined]
    assert stats.prompt_from_state == 0 and stats.finish_reason in ("stop", "length")


@pytest.mark.slow
def test_a_state_of_another_conversation_is_not_loaded(saved_session) -> None:
    restored, stats = _resume(*saved_session, system="Answer in French.")
    assert "another conversation" in restored.note  # type: ignore[attr-defined]
    assert stats.prompt_evaluated == stats.prompt_tokens and stats.prompt_from_state == 0


@pytest.mark.slow
def test_a_state_sharing_the_system_prompt_gives_that_prefix(saved_session) -> None:
    """After /reset the history is the system prompt alone: its cells still come back."""
    restored, stats = _resume(saved_session[0], [])
    assert restored.note is None  # type: ignore[attr-defined]
    assert 32 < stats.prompt_from_state < restored.tokens  # type: ignore[attr-defined]
    assert stats.prompt_evaluated == stats.prompt_tokens - stats.prompt_from_state


@pytest.mark.slow
def test_damage_past_the_first_bytes_is_caught_by_the_hash(saved_session) -> None:
    files = state_files(kv_dir(), "s1")
    with files.state.open("r+b") as fh:
        fh.seek(files.state.stat().st_size // 2)
        fh.write(os.urandom(64))
    restored, stats = _resume(*saved_session)
    assert "sha256 differs" in restored.note  # type: ignore[attr-defined]
    assert stats.prompt_evaluated == stats.prompt_tokens


_WRITER = """
import sys, time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from localllm.runtime import LoadOptions, load_model
from localllm.runtime import kv_state as ks

def context_tokens(llama: Any) -> tuple[Any, list[int]]:
    return llama._ctx.ctx, [int(t) for t in llama.input_ids[: llama.n_tokens]]

model_path, directory, stage = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
model = load_model(model_path, LoadOptions(n_ctx=512, seed=1))
header = ks.StateHeader("ab" * 32, 512, "f16", "f16", True, False, None, None, "x")
files = ks.state_files(directory, "s1")
model.llama.eval(model.tokenize("First words of the story."))
ks.save_seq_state(*context_tokens(model.llama)[:1], 0, context_tokens(model.llama)[1],
                  files, header)
model.llama.eval(model.tokenize(" More words follow, many more." * 8, add_bos=False))

def hang(*args, **kwargs):
    print("STAGE", flush=True)
    time.sleep(600)

setattr(ks, {"temp": "_sha256_file", "header": "_write_header"}[stage], hang)
ctx, tokens = context_tokens(model.llama)
ks.save_seq_state(ctx, 0, tokens, files, header)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["temp", "header"])
def test_kill_9_mid_write_leaves_no_trusted_partial(
    smollm2_path: Path, tmp_path: Path, stage: str
) -> None:
    """Killed with the new state in its temp file (the old pair stays whole), or renamed
    before its header (the old header no longer matches: refused, not loaded)."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    directory = tmp_path / "kv"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(smollm2_path), str(directory), stage],
        stdout=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "STAGE"
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
    files = state_files(directory, "s1")
    header = read_header(files)  # the first state's header
    model = load_model(smollm2_path, LoadOptions(n_ctx=512, seed=1))
    try:
        ctx = model.llama._ctx.ctx
        if stage == "temp":
            assert list(directory.glob(".s1.kv.*.tmp"))  # the partial write, never renamed
            loaded = load_seq_state(ctx, 0, files, header)
            assert loaded.tokens == header.tokens
            assert len(loaded.tokens) == len(model.tokenize("First words of the story."))
        else:
            with pytest.raises(KvStateError, match=r"were written|sha256 differs"):
                load_seq_state(ctx, 0, files, header)
            assert model.kv_used == 0
    finally:
        model.close()
    prune_states(directory, stale_seconds=0)
    assert not list(directory.glob(".*.tmp"))


# ---------------------------------------------------------------- the CLI


def _spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "COLUMNS": "200", "LINES": "50", "TERM": "xterm", "NO_COLOR": "1"}
    child = pexpect.spawn(
        sys.executable, ["-m", "localllm", "chat", *args], env=env, cwd=str(REPO),
        encoding="utf-8", timeout=120, dimensions=(50, 200),
    )  # fmt: skip
    child.expect_exact(">>> ")
    return child


@pytest.mark.slow
def test_chat_resume_json_counts_the_tokens_from_the_state(store_with_smollm2: Path, cli) -> None:
    child = _spawn("--temp", "0", "--seed", "3", "--max-tokens", "8", "--system", SYSTEM)
    child.sendline("Name a colour.")
    child.expect(r"(\d+) in · \d+ out")
    first_prompt = int(child.match[1])
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"KV state: (\d+) tokens, \S+ \S+ written in [\d.]+ s")
    state_tokens = int(child.match[1])
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert state_tokens > first_prompt

    listing = cli("chat", "--sessions")
    assert listing.exit_code == 0 and "KV state" in listing.stderr
    assert re.search(r"  \d+ +[\d.]+ MiB +Name a colour\.", listing.stderr), listing.stderr

    result = cli("chat", "--resume", "-p", "And another?", "--json")
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["prompt_from_state"] == state_tokens
    assert stats["prompt_evaluated"] == stats["prompt_tokens"] - state_tokens
    assert f"{state_tokens} tokens of KV state loaded" in result.stderr

    resumed = _spawn("--resume")
    resumed.sendline("And one more?")
    resumed.expect(r"(\d+) in \((\d+) new, (\d+) from the saved state\)")
    assert int(resumed.match[3]) == state_tokens
    resumed.expect_exact(">>> ")
    resumed.sendline("/exit")
    resumed.expect(pexpect.EOF)


@pytest.mark.slow
def test_kv_state_max_zero_keeps_no_state(store_with_smollm2: Path) -> None:
    child = _spawn("--temp", "0", "--max-tokens", "4", "--kv-state-max", "0")
    child.sendline("Hello.")
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert not kv_dir().exists() or not list(kv_dir().iterdir())
