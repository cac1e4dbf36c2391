"""Chat's model: the batch engine with one slot, behind the interface chat drives.

Chat and serve generate through the same engine (:mod:`~localllm.runtime.batch_engine`),
so speculative decoding, sampling and prompt-prefix reuse are written once. A chat turn
sends the whole formatted history; the slot keeps the KV cells of the previous turn, so
only the new suffix is evaluated.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from localllm.generation import GenerationStats, TextChunk
from localllm.runtime.batch_engine import BatchEngine
from localllm.runtime.batch_records import (
    GenerationDone,
    GenerationFailed,
    GenerationFailedError,
    GenerationParams,
    TextDelta,
)
from localllm.runtime.params import LoadOptions, SamplingOptions

__all__ = ["EngineModel", "load_engine_model"]

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a random draw


class EngineModel:
    """A model with its one-slot engine, kept loaded for a whole chat session."""

    seq_id = 0  # the engine sequence (slot) that holds the conversation's KV cells

    def __init__(self, engine: BatchEngine, options: LoadOptions) -> None:
        self.engine = engine
        self.options = options
        self.path: Path = engine.path
        self.load_log = engine.load_log
        self.buffers = engine.buffers
        self.repack = engine.repack

    # -- facts
    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def context_handle(self) -> Any:
        """The ``llama_context*`` holding the conversation (sequence ``seq_id``)."""
        return self.engine.context_handle

    @property
    def kv_used(self) -> int:
        """Cells of the KV cache that hold tokens of the current conversation."""
        return len(self.engine.held(self.seq_id))

    @property
    def spec_note(self) -> str | None:
        return self.engine.spec_note

    def window_moved_past(self, prompt: Sequence[int]) -> bool:
        """Whether the cached prefix of ``prompt`` is out of a sliding window's reach (then
        the engine evaluates the whole prompt again, as llama-server checks it)."""
        return self.engine.prefix_lost(self.seq_id, prompt)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.engine.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.engine.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        return self.engine.token_text(token)

    @property
    def bos_text(self) -> str:
        return self.engine.bos_text

    @property
    def eos_text(self) -> str:
        return self.engine.eos_text

    def prompt_tokens(self, prompt: str, *, add_bos: bool) -> list[int]:
        """A formatted prompt as tokens: special tokens parsed, BOS as the vocabulary asks."""
        return self.tokenize(prompt, add_bos=add_bos, special=True)

    # -- generation
    def stream_completion(
        self,
        prompt: Sequence[int],
        sampling: SamplingOptions,
        *,
        stop_strings: Sequence[str] = (),
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[TextChunk | GenerationStats]:
        """Continue ``prompt`` (tokens); streams text, the last item is the stats.

        ``stop`` is polled after each chunk: when it returns true the reply ends there
        (finish reason "interrupted") and the slot keeps its cells for the next turn.
        """
        sampling.validate()
        seed = sampling.seed if sampling.seed is not None else self.options.seed
        params = GenerationParams(
            max_tokens=sampling.max_tokens or 512,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            repeat_penalty=sampling.repeat_penalty,
            seed=None if seed == RANDOM_SEED else seed,
            stop=tuple(stop_strings),
        )
        events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        start = time.perf_counter()
        ticket = self.engine.submit(prompt, params, events.put)
        pieces: list[str] = []
        first: float | None = None
        done: GenerationDone | None = None
        stopped = False
        try:
            while done is None:
                event = events.get()
                if isinstance(event, GenerationFailed):
                    raise GenerationFailedError(event.message)
                if isinstance(event, GenerationDone):
                    done = event
                elif isinstance(event, TextDelta) and event.text and not stopped:
                    first = first or time.perf_counter()
                    pieces.append(event.text)
                    yield TextChunk(event.text)
                    if stop is not None and stop():
                        ticket.stop()
                        stopped = True
        finally:
            if done is None:  # the consumer left (an exception, a closed generator)
                ticket.cancel()
                while not isinstance(events.get(), GenerationDone | GenerationFailed):
                    pass
        yield GenerationStats(
            text="".join(pieces),
            finish_reason="interrupted" if stopped else done.finish_reason,
            prompt_tokens=done.prompt_tokens,
            prompt_evaluated=done.prompt_tokens - done.cached_tokens,
            generated_tokens=done.completion_tokens,
            prompt_seconds=done.prompt_seconds,
            generation_seconds=done.generation_seconds,
            ttft_seconds=(first or time.perf_counter()) - start,
            kv_used=self.kv_used,
            kv_cells=self.n_ctx,
            window_reevaluated=done.window_reevaluated,
            draft_n=done.draft_n,
            draft_n_accepted=done.draft_n_accepted,
        )

    def reset(self) -> None:
        """Forget the conversation held in the KV cache."""
        self.engine.forget(self.seq_id)

    def close(self) -> None:
        self.engine.close()


def load_engine_model(
    path: str | Path,
    options: LoadOptions,
    *,
    spec: str = "auto",
    draft: str | Path | None = None,
) -> EngineModel:
    """Load ``path`` on a one-slot engine; ``spec``/``draft`` as ``--spec``/``--draft``."""
    return EngineModel(BatchEngine.load(path, options, 1, spec=spec, draft=draft), options)
