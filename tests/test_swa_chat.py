"""Chat with a sliding-window cache sized to the window, as llama.cpp's tools size it.

The model: test-llama-archs' gemma3 file (random weights, 2 layers: one attends to a
32-token window, one to everything), made in the session. With a micro-batch of 32 the
window's cache holds 256 cells, half the 512-token context: the conversation outgrows it,
the oldest turns are dropped to fit, and the prompt's cached prefix (the system prompt)
then starts where the sliding-window cache no longer reaches. llama-cpp-python would
reuse it anyway; localllm checks llama_memory_seq_pos_min first, as llama-server does,
and evaluates the prompt again. Replies at temperature 0 must equal those of a full-size
cache (--swa-full), where every cell is kept.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.llama_archs import arch_models

from localllm.chat.opening import ChatRequest, open_session
from localllm.chat.session import ChatSession
from localllm.generation import ChatMessage, GenerationStats, TextChunk
from localllm.runtime.params import LoadOptions, SamplingOptions
from localllm.views.chat import format_turn_status

SYSTEM = "You are a careful assistant who answers questions about numbered catalogue items."
TURNS = 6


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return arch_models(tmp_path_factory) / "gemma3-dense.gguf"


def _open(path: Path, swa_full: bool) -> ChatSession:
    return open_session(
        ChatRequest(
            model=str(path),
            sampling=SamplingOptions(temperature=0, max_tokens=60, seed=1),
            options=LoadOptions(n_batch=32, n_ubatch=32, n_threads=1, swa_full=swa_full),
            n_ctx=512,
            template="chatml",
            system=SYSTEM,
        )
    )


def _conversation(path: Path, swa_full: bool) -> list[tuple[str, GenerationStats]]:
    session = _open(path, swa_full)
    turns = []
    try:
        for i in range(TURNS):
            question = (
                f"turn {i}: describe item {i * 7}, compare it with items {i * 11} and "
                f"{i * 13}, and list every difference between the three of them, one by one, "
                "with the reasons for each difference and what it means for a buyer. " * 2
            )
            text, stats = [], None
            for item in session.send(question):
                if isinstance(item, TextChunk):
                    text.append(item.text)
                elif isinstance(item, GenerationStats):
                    stats = item
            assert stats is not None
            turns.append(("".join(text), stats))
    finally:
        session.close()
    return turns


@pytest.mark.slow
def test_replies_equal_a_full_size_cache_when_the_window_moved_past_the_prefix(
    gemma3: Path,
) -> None:
    full = _conversation(gemma3, swa_full=True)
    window = _conversation(gemma3, swa_full=False)
    assert [text for text, _ in window] == [text for text, _ in full]
    assert all(text for text, _ in full)
    # The scenario happened: turns were dropped, and with the window-sized cache the
    # reused prefix was out of its reach, so the prompt was evaluated again (and said so).
    assert any(stats.window_reevaluated for _, stats in window)
    assert not any(stats.window_reevaluated for _, stats in full)
    redone = next(stats for _, stats in window if stats.window_reevaluated)
    assert redone.prompt_evaluated == redone.prompt_tokens
    assert "sliding window had moved past" in format_turn_status(redone, None)


@pytest.mark.slow
def test_the_window_cache_really_loses_the_prefix(gemma3: Path) -> None:
    """The check is needed: once the conversation outgrows the window's cache, a prompt that
    shares only the system prompt with it cannot reuse that prefix (the first new token
    would attend to positions the cache dropped); with a full-size cache it can."""
    import llama_cpp

    for swa_full, lost in ((False, True), (True, False)):
        session = _open(gemma3, swa_full)
        try:
            for i in range(TURNS):
                for _ in session.send(f"turn {i}: " + "tell me more about the items. " * 6):
                    pass
            assert session.loaded.kv_used > 256  # more than the window's 256 cells
            prompt = session.prompt_tokens([*session.messages()[:1], ChatMessage("user", "hi")])
            memory = llama_cpp.llama_get_memory(session.context_handle)
            pos_min = llama_cpp.llama_memory_seq_pos_min(memory, session.seq_id)
            # The reused prefix: the system prompt's tokens, shorter than the conversation.
            assert 32 < len(prompt) < session.loaded.kv_used - 256
            assert (pos_min > len(prompt)) is lost
            assert session.loaded.window_moved_past(prompt) is lost
        finally:
            session.close()
