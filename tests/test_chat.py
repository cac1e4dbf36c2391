"""`localllm chat` without a terminal: input parsing, one-shot, pipe, --json, bad flags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support.gguf_files import DROP, write_gguf
from support.reference_chat import reference_prompt_tokens

from localllm.chat.opening import ChatRequest, open_session
from localllm.chat.repl import SLASH_COMMANDS, MultilineInput, parse_slash_command
from localllm.chat.session import ChatSession
from localllm.errors import ContextOverflow
from localllm.generation import ChatMessage, GenerationStats, TextChunk
from localllm.runtime import LoadOptions, SamplingOptions, load_model

GREEDY_FLAGS = ("--temp", "0", "--seed", "11", "--max-tokens", "24", "--ctx", "2048")
QUESTION = "Name three colours."


# ---------------------------------------------------------------------- input parsing


def test_slash_commands_parse_with_arguments_and_aliases() -> None:
    assert parse_slash_command("/save  chat log.json ") == ("/save", "chat log.json")
    assert parse_slash_command("/SYSTEM You are terse.") == ("/system", "You are terse.")
    assert parse_slash_command("/quit") == ("/exit", "")
    assert parse_slash_command("  /reset") == ("/reset", "")
    assert parse_slash_command("hello /reset") is None
    # A doubled slash sends the line as a message.
    assert parse_slash_command("//etc/hosts is a file") is None
    for name in ("/help", "/reset", "/system", "/stats", "/save", "/exit"):
        assert name in SLASH_COMMANDS


def test_backslash_continues_a_line() -> None:
    buf = MultilineInput()
    assert buf.feed("first \\") is None
    assert buf.pending
    assert buf.feed("second\\") is None
    assert buf.feed("third") == "first \nsecond\nthird"
    assert not buf.pending


def test_triple_quotes_open_and_close_a_block() -> None:
    buf = MultilineInput()
    assert buf.feed('"""') is None
    assert buf.feed("line one") is None
    assert buf.feed("") is None
    assert buf.feed('line three"""') == "line one\n\nline three"
    assert buf.feed('"""inline"""') == "inline"
    assert buf.feed('"""starts here') is None
    assert buf.feed('"""') == "starts here\n"
    assert buf.feed("plain") == "plain"


def test_cancel_discards_a_pending_message() -> None:
    buf = MultilineInput()
    buf.feed('"""')
    buf.feed("draft")
    buf.cancel()
    assert not buf.pending
    assert buf.feed("fresh") == "fresh"


# ---------------------------------------------------------------------- bad flags


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--temp", "-0.5"), "temperature -0.5"),
        (("--ctx", "0"), "context size 0"),
        (("--top-p", "1.5"), "top-p 1.5"),
        (("--max-tokens", "0"), "max tokens 0"),
        (("--ctx", "256", "--max-tokens", "300"), "reply budget of 300"),
        (("--kv-type", "q3_x"), "'q3_x'"),
        (("--flash-attn", "maybe"), "--flash-attn 'maybe'"),
        (("--rope", "cubic"), "'cubic'"),
        (("--threads", "0"), "threads 0"),
    ],
)
def test_bad_flag_is_one_line_and_exit_2(cli, args: tuple[str, ...], needle: str) -> None:
    result = cli("chat", "-p", "hi", *args)
    assert result.exit_code == 2, result.stderr
    assert needle in result.error_line
    assert result.stdout == ""


def test_unknown_model_is_one_line(store_with_smollm2: Path, cli) -> None:
    result = cli("chat", "no-such-model-xyz", "-p", "hi")
    assert result.exit_code == 1
    assert "unknown model 'no-such-model-xyz'" in result.error_line


def test_flags_are_checked_before_the_model_is_resolved(cli) -> None:
    # No store here: the flag error must win over "model not downloaded".
    result = cli("chat", "--temp", "-1", "-p", "hi")
    assert result.exit_code == 2
    assert "temperature" in result.error_line


def test_model_without_chat_template_is_one_line(tmp_path: Path, cli) -> None:
    path = write_gguf(tmp_path / "base.gguf", overrides={"tokenizer.chat_template": DROP})
    result = cli("chat", str(path), "-p", "hi")
    assert result.exit_code == 2
    assert "base.gguf has no chat template" in result.error_line
    assert "--template NAME" in result.error_line and "--raw" in result.error_line


def test_model_llama_cpp_cannot_load_is_one_line(tmp_path: Path, cli) -> None:
    # A header-only GGUF: the facts read fine, but llama.cpp finds no weights.
    path = write_gguf(tmp_path / "hollow.gguf")
    result = cli("chat", str(path), "-p", "hi")
    assert result.exit_code == 1
    assert "llama.cpp could not load hollow.gguf" in result.error_line


def test_empty_stdin_is_one_line(cli) -> None:
    result = cli("chat", input="  \n")
    assert result.exit_code == 2
    assert "stdin is empty" in result.error_line


def test_missing_default_model_is_one_line(cli) -> None:
    result = cli("chat", "-p", "hi")
    assert result.exit_code == 1
    assert "localllm pull smollm2-135m" in result.error_line


# ------------------------------------------------------------- one-shot on the real model


@pytest.fixture(scope="module")
def reference_reply(smollm2_path: Path) -> str:
    """QUESTION straight through the runtime on a fresh context, as the CLI flags ask."""
    text = QUESTION
    model = load_model(smollm2_path, LoadOptions(n_ctx=2048, seed=11))
    try:
        sampling = SamplingOptions(temperature=0.0, seed=11, max_tokens=24)
        pieces = [
            item.text
            for item in model.stream_completion(
                reference_prompt_tokens(model, [ChatMessage("user", text)]),
                sampling,
                stop_strings=[model.eos_text],
            )
            if isinstance(item, TextChunk)
        ]
    finally:
        model.close()
    return "".join(pieces)


@pytest.mark.slow
def test_one_shot_is_deterministic_and_matches_the_runtime(
    store_with_smollm2: Path, reference_reply: str, cli
) -> None:
    first = cli("chat", "-p", QUESTION, *GREEDY_FLAGS)
    second = cli("chat", "-p", QUESTION, *GREEDY_FLAGS)
    assert first.exit_code == 0, first.stderr
    expected = reference_reply
    assert expected.strip()
    # Only the reply on stdout (plus its newline); the status line went to stderr.
    assert first.stdout == expected + "\n"
    assert second.stdout == first.stdout
    status = first.stderr.strip().splitlines()[-1]
    assert re.search(r"\d+ in · \d+ out · prompt [\d.]+ tok/s · gen [\d.]+ tok/s", status)
    assert re.search(r"first token \d+ ms · KV \d+/2048 cells \([\d.]+% of [\d.]+ MiB\)", status)


@pytest.mark.slow
def test_piped_stdin_is_the_prompt_and_json_has_reply_and_stats(
    store_with_smollm2: Path, reference_reply: str, cli
) -> None:
    expected = reference_reply
    piped = cli("chat", *GREEDY_FLAGS, input=QUESTION + "\n")
    assert piped.exit_code == 0, piped.stderr
    assert piped.stdout == expected + "\n"

    as_json = cli("chat", *GREEDY_FLAGS, "--json", input=QUESTION + "\n")
    assert as_json.exit_code == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["reply"] == expected
    stats = data["stats"]
    assert stats["finish_reason"] in ("stop", "length")
    # The README's top-level finish_reason: "length" exactly when the 24-token budget ran out.
    assert data["finish_reason"] == ("length" if stats["generated_tokens"] == 24 else "stop")
    assert stats["generated_tokens"] > 0 and stats["prompt_tokens"] > 0
    assert stats["kv_cells"] == 2048 and 0 < stats["kv_used"] <= 2048
    assert stats["ttft_seconds"] > 0 and stats["generation_tps"] > 0
    assert data["settings"]["sampling"]["temperature"] == 0.0
    assert data["settings"]["runtime"]["n_ctx"] == 2048


@pytest.mark.slow
def test_single_message_larger_than_the_context_is_one_line(store_with_smollm2: Path, cli) -> None:
    result = cli("chat", "--ctx", "256", "--max-tokens", "32", input="word " * 400)
    assert result.exit_code == 1
    line = result.error_line
    assert "context holds 256" in line and "--ctx" in line


# ----------------------------------------------------------------- README defaults

LONG_REPLY = "Write a very long story about a dragon and a knight."  # runs past 300 tokens


@pytest.fixture(scope="module")
def smol_trained_512(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of SmolLM2 whose GGUF says it was trained on 512 tokens (gguf-py, in place)."""
    import shutil

    import gguf

    path = tmp_path_factory.mktemp("trained-512") / "smollm2-trained-512.gguf"
    shutil.copyfile(smollm2_path, path)
    reader = gguf.GGUFReader(path, "r+")
    field = reader.get_field("llama.context_length")
    field.parts[field.data[0]][0] = 512
    reader.data.flush()
    del reader
    return path


@pytest.mark.slow
def test_default_context_and_reply_budget(
    store_with_smollm2: Path, smol_trained_512: Path, cli
) -> None:
    """Context min(trained, 4096); reply budget min(512, context / 2)."""
    # SmolLM2 is trained on 8192 tokens: 4096, and 512 for the reply.
    data = json.loads(cli("chat", "-p", QUESTION, "--temp", "0", "--json").stdout)
    assert data["settings"]["runtime"]["n_ctx"] == 4096
    assert data["stats"]["kv_cells"] == 4096  # llama.cpp's own n_ctx
    assert data["settings"]["sampling"]["max_tokens"] == 512
    # Trained on 512: all of it, and half of it for a reply that would run longer.
    result = cli("chat", str(smol_trained_512), "-p", LONG_REPLY, "--temp", "0", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["settings"]["runtime"]["n_ctx"] == data["stats"]["kv_cells"] == 512
    assert data["settings"]["sampling"]["max_tokens"] == 256
    assert (data["finish_reason"], data["stats"]["generated_tokens"]) == ("length", 256)
    assert data["settings"]["runtime"]["rope"] is None  # within the trained context


@pytest.mark.slow
@pytest.mark.parametrize(("rope", "method", "said"), [
    (None, "yarn", "rope: YaRN x2"),
    ("linear", "linear", "rope: Linear position interpolation: positions compressed 2x"),
])  # fmt: skip
def test_ctx_past_the_trained_length_stretches_rope_and_says_so(
    smol_trained_512: Path, cli, rope: str | None, method: str, said: str
) -> None:
    flags = ["--rope", rope] if rope else []
    result = cli("chat", str(smol_trained_512), "-p", QUESTION, "--temp", "0",
                 "--max-tokens", "8", "--ctx", "1024", *flags, "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    runtime = json.loads(result.stdout)["settings"]["runtime"]
    assert runtime["n_ctx"] == 1024
    assert (runtime["rope"]["method"], runtime["rope"]["factor"]) == (method, 2.0)
    notes = [ln for ln in result.stderr.splitlines() if ln.startswith("rope: ")]
    assert len(notes) == 1 and notes[0].startswith(said), result.stderr


# ---------------------------------------------------------------- the session core


@pytest.fixture
def small_session(store_with_smollm2: Path):
    session = open_session(
        ChatRequest(
            sampling=SamplingOptions(temperature=0.0, seed=3, max_tokens=24),
            n_ctx=256,
            system="Answer briefly.",
        )
    )
    yield session
    session.close()


def _turn(session: ChatSession, text: str) -> tuple[list[object], GenerationStats]:
    events = list(session.send(text))
    stats = events[-1]
    assert isinstance(stats, GenerationStats)
    return events, stats


@pytest.mark.slow
def test_overflow_drops_oldest_turns_keeps_system_and_tells_once(small_session) -> None:
    from localllm.chat.session import HistoryTrimmed

    trims: list[HistoryTrimmed] = []
    filler = "The quick brown fox jumps over the lazy dog near the river on a sunny day. " * 2
    for i in range(5):
        events, stats = _turn(small_session, f"{filler}One fact about the number {i + 3}?")
        trims += [e for e in events if isinstance(e, HistoryTrimmed)]
        # The prompt plus the reply budget always fits the context.
        assert stats.prompt_tokens + 24 <= small_session.n_ctx
        assert small_session.messages()[0] == ChatMessage("system", "Answer briefly.")
    assert len(trims) >= 2, "five turns of ~70 tokens each cannot fit 256 tokens"
    assert [t.first for t in trims] == [True] + [False] * (len(trims) - 1)
    assert small_session.dropped_messages == sum(t.dropped_messages for t in trims)
    # What the model saw is the transcript minus the dropped head.
    assert small_session.history == small_session.transcript[small_session.dropped_messages :]


@pytest.mark.slow
def test_a_message_too_big_for_the_context_leaves_the_session_intact(small_session) -> None:
    _turn(small_session, "Hello!")
    before = list(small_session.history)
    with pytest.raises(ContextOverflow, match="context holds 256"):
        list(small_session.send("word " * 400))
    assert small_session.history == before
    _, stats = _turn(small_session, "Still there?")
    assert stats.generated_tokens > 0


@pytest.mark.slow
def test_stop_ends_the_reply_and_keeps_the_partial_text(small_session, smollm2_loaded) -> None:
    seen: list[str] = []
    stats = None
    for event in small_session.send("Count from one to fifty.", stop=lambda: len(seen) >= 3):
        if isinstance(event, TextChunk):
            seen.append(event.text)
        else:
            stats = event
    assert len(seen) == 3
    assert isinstance(stats, GenerationStats)
    assert stats.finish_reason == "interrupted"
    assert small_session.history[-1] == ChatMessage("assistant", "".join(seen))
    # The KV cache is consistent: the next turn reuses the prefix and answers.
    _, after = _turn(small_session, "Thanks.")
    assert after.prompt_evaluated < after.prompt_tokens
    assert after.prompt_tokens == len(
        reference_prompt_tokens(smollm2_loaded, small_session.messages()[:-1])
    )


@pytest.mark.slow
def test_save_writes_transcript_and_settings_atomically(small_session, tmp_path: Path) -> None:
    _turn(small_session, "Say hi.")
    target = tmp_path / "out" / "chat.json"
    assert small_session.save(target) == target
    data = json.loads(target.read_text())
    assert data["messages"] == [
        {"role": m.role, "content": m.content} for m in small_session.messages()
    ]
    assert data["settings"]["system"] == "Answer briefly."
    assert data["settings"]["sampling"]["max_tokens"] == 24
    assert data["settings"]["runtime"]["n_ctx"] == 256
    assert len(data["turns"]) == 1
    assert [p.name for p in target.parent.iterdir()] == ["chat.json"]  # no temp file left


@pytest.mark.slow
def test_an_abort_mid_reply_keeps_the_partial_reply_and_recovers(small_session) -> None:
    import contextlib

    seen: list[str] = []
    events = small_session.send("Count from one to fifty.")
    # The abort comes from the consumer, as a second Ctrl-C does in the REPL.
    with pytest.raises(KeyboardInterrupt), contextlib.closing(events):
        for event in events:
            if isinstance(event, TextChunk):
                seen.append(event.text)
                if len(seen) == 2:
                    raise KeyboardInterrupt
    assert small_session.history[-1] == ChatMessage("assistant", "".join(seen))
    small_session.recover_after_abort()
    _, stats = _turn(small_session, "Thanks.")
    # A clean KV cache: the whole prompt is evaluated again, and the reply comes.
    assert stats.prompt_evaluated == stats.prompt_tokens
    assert stats.generated_tokens > 0


@pytest.mark.slow
@pytest.mark.parametrize(("n_ctx", "kv_type"), [(1000, "f16"), (4096, "q8_0")])
def test_status_kv_bytes_are_what_llama_cpp_allocated(
    store_with_smollm2: Path, n_ctx: int, kv_type: str
) -> None:
    """The status line's KV figure (memory.kv_cache_bytes) against llama.cpp's own report."""
    session = open_session(
        ChatRequest(
            sampling=SamplingOptions(temperature=0.0, max_tokens=16),
            options=LoadOptions(type_k=kv_type, type_v=kv_type),
            n_ctx=n_ctx,
        )
    )
    try:
        reported = session.loaded.buffers.kv_bytes  # llama.cpp logs MiB with 2 decimals
        assert reported is not None
        assert f"{session.kv_bytes() / 2**20:.2f}" == f"{reported / 2**20:.2f}"
        assert session.loaded.n_ctx == session.loaded.buffers.kv_cells
    finally:
        session.close()


def test_quantized_v_cache_without_flash_attention_is_one_line(cli) -> None:
    result = cli("chat", "--kv-type", "q4_0", "--flash-attn", "off", "-p", "hi")
    assert result.exit_code == 2
    assert "quantized V cache (q4_0) needs flash attention" in result.error_line
