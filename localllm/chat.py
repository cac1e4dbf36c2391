"""Chat sessions: one loaded model, a growing history, streamed replies."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from localllm.resolver import ResolvedModel, require_local_file, resolve_model
from localllm.runtime import (
    ChatMessage,
    GenerationStats,
    LoadedModel,
    RuntimeOptions,
    SamplingOptions,
    TextChunk,
    load_model,
)

__all__ = ["DEFAULT_CONTEXT", "ChatSession", "open_session"]

# A chat default that stays cheap on a laptop; --ctx asks for more.
DEFAULT_CONTEXT = 4096


@dataclass
class ChatSession:
    """A conversation with one loaded model (kept loaded so the KV prefix is reused)."""

    model: ResolvedModel
    runtime: LoadedModel
    sampling: SamplingOptions
    system: str | None = None
    history: list[ChatMessage] = field(default_factory=list)

    def messages(self) -> list[ChatMessage]:
        head = [ChatMessage("system", self.system)] if self.system else []
        return head + self.history

    def send(self, text: str) -> Iterator[TextChunk | GenerationStats]:
        """Stream the reply to ``text``; the history keeps both once the reply ends."""
        self.history.append(ChatMessage("user", text))
        reply: list[str] = []
        try:
            for item in self.runtime.chat_stream(self.messages(), self.sampling):
                if isinstance(item, TextChunk):
                    reply.append(item.text)
                yield item
        except BaseException:
            # An interrupted reply still happened: keep what the user saw.
            if reply:
                self.history.append(ChatMessage("assistant", "".join(reply)))
            else:
                self.history.pop()
            raise
        self.history.append(ChatMessage("assistant", "".join(reply)))

    def reset(self) -> None:
        self.history.clear()

    def close(self) -> None:
        self.runtime.close()


def open_session(
    ref: str | None,
    runtime: RuntimeOptions,
    sampling: SamplingOptions,
    system: str | None = None,
) -> ChatSession:
    """Resolve ``ref``, load it once, and return a session ready for ``send``."""
    sampling.validate()
    runtime.validate()
    model = resolve_model(ref)
    path = require_local_file(model)
    loaded = load_model(path, replace(runtime, seed=sampling.seed or runtime.seed))
    return ChatSession(model=model, runtime=loaded, sampling=sampling, system=system)
