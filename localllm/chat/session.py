"""A chat session: one loaded model, a growing history, streamed replies.

The session keeps ONE engine (serve's, with one slot) for its whole life and sends the
full formatted history each turn, so the slot reuses the KV prefix of earlier turns and
only the new suffix is evaluated. Earlier turns are never re-formatted: replies are kept
exactly as streamed. When the history plus the reply budget would pass the context,
the oldest turns are dropped (never the system prompt).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localllm.errors import ContextOverflow, InvalidArgument, LocalLLMError
from localllm.fileio import write_json_atomic
from localllm.generation import ChatMessage, GenerationStats, TextChunk
from localllm.gguf.spec import ModelSpec
from localllm.plan.need import LoadNeed
from localllm.runtime.engine_model import EngineModel
from localllm.runtime.params import SamplingOptions
from localllm.store.resolver import ResolvedModel
from localllm.templates.selection import ChatFormat

if TYPE_CHECKING:  # a RoPE plan is made only past the trained context
    from localllm.plan.rope import RopePlan

__all__ = [
    "DEFAULT_CONTEXT",
    "DEFAULT_MAX_TOKENS",
    "TRANSCRIPT_FORMAT",
    "ChatSession",
    "HistoryTrimmed",
    "SessionSummary",
    "stats_as_json",
]

# A chat default that stays cheap on a laptop; --ctx asks for more.
DEFAULT_CONTEXT = 4096
# The reply budget when --max-tokens is not given (capped at half the context).
DEFAULT_MAX_TOKENS = 512
TRANSCRIPT_FORMAT = "localllm-chat/1"


@dataclass(frozen=True)
class HistoryTrimmed:
    """The oldest turns were dropped so the prompt and its reply budget fit the context."""

    dropped_messages: int  # this turn
    total_dropped_messages: int  # since the last /reset
    prompt_tokens: int  # the prompt once trimmed
    n_ctx: int
    first: bool  # the user is told once per session; later trims are silent


@dataclass(frozen=True)
class SessionSummary:
    """What /stats shows: totals over the session and the state of the context."""

    turns: int
    prompt_tokens_evaluated: int
    generated_tokens: int
    prompt_seconds: float
    generation_seconds: float
    history_messages: int
    dropped_messages: int
    kv_used: int
    kv_cells: int
    kv_bytes: int | None
    last: GenerationStats | None

    @property
    def prompt_tps(self) -> float:
        s = self.prompt_seconds
        return self.prompt_tokens_evaluated / s if s > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        s = self.generation_seconds
        return self.generated_tokens / s if s > 0 else 0.0


def stats_as_json(stats: GenerationStats) -> dict[str, Any]:
    """One turn's numbers for --json and /save, derived rates included."""
    data = asdict(stats)
    data.pop("text")
    data["prompt_tps"] = round(stats.prompt_tps, 3)
    data["generation_tps"] = round(stats.generation_tps, 3)
    data["kv_percent"] = round(100.0 * stats.kv_used / stats.kv_cells, 2) if stats.kv_cells else 0
    return data


@dataclass
class ChatSession:
    """A conversation with one loaded model (kept loaded so the KV prefix is reused)."""

    resolved: ResolvedModel
    spec: ModelSpec
    loaded: EngineModel
    sampling: SamplingOptions
    chat_format: ChatFormat
    system: str | None = None
    rope_plan: RopePlan | None = None
    load_seconds: float = 0.0
    history: list[ChatMessage] = field(default_factory=list)  # what the model sees
    transcript: list[ChatMessage] = field(default_factory=list)  # all since /reset
    turns: list[GenerationStats] = field(default_factory=list)
    dropped_messages: int = 0
    told_about_trimming: bool = False
    model_sha256: str | None = None
    session_id: str | None = None  # set when the conversation is kept on disk
    notes: tuple[str, ...] = ()  # what the user is told once the model is loaded
    memory: LoadNeed | None = None  # what the memory check found the load takes
    state_tokens: int = 0  # tokens a saved KV state put in the cache, until the next turn
    state_seconds: float = 0.0  # and how long it took to load them
    spec_mode: str = "auto"  # --spec: speculative decoding
    draft: str | None = None  # --draft: the draft model's reference

    @property
    def context_handle(self) -> Any:
        """The ``llama_context*`` holding the conversation, in sequence :attr:`seq_id`."""
        return self.loaded.context_handle

    @property
    def seq_id(self) -> int:
        return self.loaded.seq_id

    @property
    def n_ctx(self) -> int:
        return self.loaded.n_ctx

    @property
    def display_name(self) -> str:
        """The model as the user knows it: its alias, else its file name."""
        if self.resolved.alias:
            return (
                f"{self.resolved.alias}:{self.resolved.quant}"
                if self.resolved.quant
                else self.resolved.alias
            )
        return self.loaded.path.name

    def messages(self, extra: ChatMessage | None = None) -> list[ChatMessage]:
        head = [ChatMessage("system", self.system)] if self.system else []
        return head + self.history + ([extra] if extra else [])

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The tokens the chat format makes of ``messages``, ready to evaluate."""
        text = self.chat_format.render(
            [{"role": m.role, "content": m.content} for m in messages],
            bos_token=self.loaded.bos_text,
            eos_token=self.loaded.eos_text,
        )
        return self.loaded.prompt_tokens(text, add_bos=self.chat_format.add_bos)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return len(self.prompt_tokens(messages))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """What ends a reply besides end-of-generation tokens: the template's end marks."""
        if self.chat_format.kind == "raw":
            return ()
        eos = self.loaded.eos_text
        return (*self.chat_format.stop_strings, *([eos] if eos else []))

    def kv_bytes(self) -> int | None:
        """Bytes of the KV cache: the dry-run plan `kv-calc` shows, else the load's own log."""
        if self.memory is not None:
            return self.memory.kv_bytes
        return self.loaded.buffers.kv_bytes

    def _make_room(self, user: ChatMessage) -> Iterator[HistoryTrimmed]:
        """Drop the oldest turns until the prompt plus the reply budget fits."""
        budget = self.sampling.max_tokens or DEFAULT_MAX_TOKENS
        n_ctx = self.n_ctx
        alone = self.count_tokens(
            [*([ChatMessage("system", self.system)] if self.system else []), user]
        )
        if alone + budget > n_ctx:
            sys_note = " with the system prompt" if self.system else ""
            raise ContextOverflow(
                f"this message is {alone} tokens{sys_note}; with the reply budget of {budget} "
                f"it needs {alone + budget} but the context holds {n_ctx}. Shorten it, "
                f"lower --max-tokens, or restart with a larger --ctx"
            )
        dropped = 0
        needed = self.count_tokens(self.messages(user))
        while needed + budget > n_ctx and self.history:
            # Turns go in pairs (user, assistant) so the template sees a well-formed chat.
            n = 2 if len(self.history) >= 2 else 1
            del self.history[:n]
            dropped += n
            needed = self.count_tokens(self.messages(user))
        if dropped:
            self.dropped_messages += dropped
            first = not self.told_about_trimming
            self.told_about_trimming = True
            yield HistoryTrimmed(dropped, self.dropped_messages, needed, n_ctx, first)

    def send(
        self, text: str, stop: Callable[[], bool] | None = None
    ) -> Iterator[HistoryTrimmed | TextChunk | GenerationStats]:
        """Stream the reply to ``text``; the history keeps both once the reply ends.

        ``stop`` is polled between tokens; when it turns true the reply ends early and
        what was streamed so far stays in the history (finish reason "interrupted").
        """
        start = time.perf_counter()
        user = ChatMessage("user", text)
        yield from self._make_room(user)
        self.history.append(user)
        self.transcript.append(user)
        reply: list[str] = []
        first: float | None = None
        stats: GenerationStats | None = None
        try:
            prompt = self.prompt_tokens(self.messages())
            stream = self.loaded.stream_completion(
                prompt, self.sampling, stop_strings=self.stop_strings, stop=stop
            )
            for item in stream:
                if isinstance(item, TextChunk):
                    if first is None:
                        first = time.perf_counter()
                    reply.append(item.text)
                    yield item
                else:
                    # Time to first token counts from the message, our overflow check included.
                    stats = replace(item, ttft_seconds=(first or time.perf_counter()) - start)
        except BaseException:
            # An aborted reply still happened: keep what the user saw.
            self._end_turn(reply, completed=False)
            raise
        self._end_turn(reply, completed=stats is not None and stats.finish_reason != "interrupted")
        if stats is not None:
            stats = self._count_state_tokens(stats)
            self.turns.append(stats)
            yield stats

    def _count_state_tokens(self, stats: GenerationStats) -> GenerationStats:
        """The first turn after a saved state was loaded: how much of its prompt it gave, and
        its first token counted from before the load (the user waited for both)."""
        if not self.state_tokens:
            return stats
        reused = min(self.state_tokens, stats.prompt_tokens - stats.prompt_evaluated)
        seconds, self.state_tokens, self.state_seconds = self.state_seconds, 0, 0.0
        return replace(
            stats,
            prompt_from_state=max(reused, 0),
            state_load_seconds=seconds,
            ttft_seconds=stats.ttft_seconds + seconds,
        )

    def _end_turn(self, reply: list[str], completed: bool) -> None:
        if reply or completed:
            message = ChatMessage("assistant", "".join(reply))
            self.history.append(message)
            self.transcript.append(message)
        else:
            # Stopped before the first token: forget the question, nothing was said.
            self.history.pop()
            self.transcript.pop()

    def recover_after_abort(self) -> None:
        """After an exception mid-reply, start the next turn from a clean KV cache."""
        self.loaded.reset()
        self.state_tokens = 0

    def reset(self) -> None:
        """Forget the conversation; the system prompt and the settings stay."""
        self.history.clear()
        self.transcript.clear()
        self.dropped_messages = 0

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def summary(self) -> SessionSummary:
        return SessionSummary(
            turns=len(self.turns),
            prompt_tokens_evaluated=sum(t.prompt_evaluated for t in self.turns),
            generated_tokens=sum(t.generated_tokens for t in self.turns),
            prompt_seconds=sum(t.prompt_seconds for t in self.turns),
            generation_seconds=sum(t.generation_seconds for t in self.turns),
            history_messages=len(self.history),
            dropped_messages=self.dropped_messages,
            kv_used=self.loaded.kv_used,
            kv_cells=self.n_ctx,
            kv_bytes=self.kv_bytes(),
            last=self.turns[-1] if self.turns else None,
        )

    def settings(self) -> dict[str, Any]:
        """The settings a transcript records, enough to reproduce the session."""
        opts = self.loaded.options
        return {
            "system": self.system,
            "template": self.chat_format.as_json(),
            "sampling": asdict(self.sampling),
            "runtime": {
                "n_ctx": self.n_ctx,
                "n_threads": opts.n_threads,
                "kv_type": opts.type_k if opts.type_k == opts.type_v else None,
                "type_k": opts.type_k,
                "type_v": opts.type_v,
                "flash_attn": opts.flash_attn,
                "swa_full": opts.swa_full,
                "repack": self.loaded.repack.repack,
                "rope": self.rope_plan.as_json() if self.rope_plan is not None else None,
                "spec": self.spec_mode,
                "draft": self.draft,
            },
        }

    def transcript_json(self) -> dict[str, Any]:
        head = [ChatMessage("system", self.system)] if self.system else []
        return {
            "format": TRANSCRIPT_FORMAT,
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": {
                "ref": self.resolved.ref,
                "name": self.spec.name,
                "path": str(self.loaded.path),
                "sha256": self.model_sha256,
            },
            "settings": self.settings(),
            "messages": [asdict(m) for m in head + self.transcript],
            # Leading messages of the transcript no longer in the model's context.
            "dropped_messages": self.dropped_messages,
            "turns": [stats_as_json(t) for t in self.turns],
        }

    def restore(self, messages: Sequence[ChatMessage], dropped_messages: int = 0) -> None:
        """Continue a saved conversation: its transcript, of which the model sees all but
        the ``dropped_messages`` leading ones (the next turn evaluates them once)."""
        self.transcript = list(messages)
        self.history = list(messages[dropped_messages:])
        self.dropped_messages = dropped_messages

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the transcript and settings as JSON (atomically: temp file, then rename)."""
        target = Path(path).expanduser()
        if not str(path).strip():
            raise InvalidArgument("/save needs a file name, e.g. /save chat.json")
        if target.is_dir():
            raise InvalidArgument(f"{target} is a directory; give a file name")
        try:
            write_json_atomic(target, self.transcript_json(), mode=0o600)  # a private record
        except OSError as exc:
            raise LocalLLMError(f"cannot write {target}: {exc.strerror or exc}") from None
        return target

    def close(self) -> None:
        self.loaded.close()
