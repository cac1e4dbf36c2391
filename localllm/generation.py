"""The records a generation streams: messages in, text chunks and final stats out.

A leaf module: the runtime produces these, chat and serve consume them, views render them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChatMessage", "GenerationStats", "Notice", "TextChunk"]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class Notice:
    """Something the user should be told once on stderr (e.g. a default changed for them)."""

    text: str


@dataclass(frozen=True)
class TextChunk:
    """A piece of streamed reply text."""

    text: str


@dataclass(frozen=True)
class GenerationStats:
    """The last record of a stream: what was generated, why it stopped, how fast."""

    text: str
    finish_reason: str  # stop | length | interrupted
    prompt_tokens: int  # tokens of the whole formatted prompt
    prompt_evaluated: int  # of those, evaluated this turn (the rest reused from the KV cache)
    generated_tokens: int
    prompt_seconds: float
    generation_seconds: float
    ttft_seconds: float
    kv_used: int
    kv_cells: int
    # The cached prefix was dropped and the whole prompt evaluated again: the sliding
    # window had moved past it (the SWA cache no longer held what the next token attends to).
    window_reevaluated: bool = False
    # Prompt tokens whose KV cells came from a saved state (chat --resume), not evaluated,
    # and the seconds that load took (included in ttft_seconds).
    prompt_from_state: int = 0
    state_load_seconds: float = 0.0
    draft_n: int = 0  # tokens drafted by speculative decoding
    draft_n_accepted: int = 0  # of those, accepted (equal to the model's own sample)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        if self.generation_seconds <= 0:
            return 0.0
        return self.generated_tokens / self.generation_seconds
