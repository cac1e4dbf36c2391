"""The records of the batch engine: what a request asks for, what it streams back, stats.

Plain Python (no llama_cpp), so the server can build and read them without the library;
:class:`EventStream` reads one request's records from asyncio code, :func:`run_request`
waits for one from a plain thread (benchmarks, tests).
:class:`TextState` turns a reply's bytes into text deltas the way llama-cpp-python's
stream does: an unfinished UTF-8 character and any tail that could start a stop string
are held back until the next token decides.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localllm.errors import InvalidArgument, LocalLLMError
from localllm.generation import ChatMessage
from localllm.runtime.params import SamplingOptions

# Chat's sampling defaults, the one source serve's requests default to.
_CHAT = SamplingOptions()

__all__ = [
    "COUNTERS",
    "EngineStats",
    "EventStream",
    "GenerationDone",
    "GenerationFailed",
    "GenerationFailedError",
    "GenerationParams",
    "PromptFormat",
    "TextDelta",
    "TextState",
    "TokenLogprob",
    "TopLogprob",
    "run_request",
]


@dataclass(frozen=True)
class GenerationParams:
    """What one request asks for; defaults are chat's (``localllm chat``'s flags)."""

    max_tokens: int
    temperature: float = _CHAT.temperature
    top_p: float = _CHAT.top_p
    top_k: int = _CHAT.top_k
    min_p: float = _CHAT.min_p
    repeat_penalty: float = _CHAT.repeat_penalty
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a random draw
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; N: the token's and N alternatives
    grammar: str | None = None  # GBNF the reply must match
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)
    # Lazy grammar: regexes over the reply so far; the grammar applies once one matches.
    grammar_triggers: tuple[str, ...] = ()
    grammar_for: str = "response_format"  # what the grammar enforces, for its error message

    def validate(self) -> None:
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (0 <= self.temperature < float("inf"), "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 disables it)"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (0 < self.repeat_penalty < float("inf"), "repeat_penalty", "must be > 0"),
            (self.seed is None or 0 <= self.seed < 0xFFFFFFFF, "seed", "must be in [0, 2^32-2]"),
            (self.top_logprobs is None or 0 <= self.top_logprobs <= 20, "top_logprobs", "0..20"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise InvalidArgument(f"{name} {getattr(self, name)} {rule}")


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    piece: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before sampling filters)."""

    token_id: int
    piece: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New reply text (and the logprobs of the tokens that completed it)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class GenerationDone:
    """The last event of a request: why it ended, its token counts and timings."""

    text: str
    finish_reason: str  # stop | length | cancelled | interrupted (stopped, cells kept)
    prompt_tokens: int
    cached_tokens: int  # of the prompt, reused from the slot's KV cells
    completion_tokens: int
    queued_seconds: float
    prompt_seconds: float  # admission to the first sampled token
    generation_seconds: float  # first to last sampled token
    slot: int
    draft_n: int = 0  # tokens drafted for speculative decoding (llama-server's name)
    draft_n_accepted: int = 0  # of those, accepted (equal to the target's own sample)
    window_reevaluated: bool = False  # the cached prefix fell out of a sliding window

    @property
    def generation_tps(self) -> float:
        """Tokens after the first one per second of generation (the first ends the prompt)."""
        n = self.completion_tokens - 1
        return n / self.generation_seconds if n > 0 and self.generation_seconds > 0 else 0.0


@dataclass(frozen=True)
class GenerationFailed:
    message: str


COUNTERS = (
    "requests_started",
    "requests_finished",
    "requests_cancelled",
    "requests_failed",
    "prompt_tokens_evaluated",
    "prompt_tokens_cached",
    "completion_tokens",
    "decode_calls",
    "decode_seconds",
    "batch_tokens",
    "draft_tokens",
    "draft_tokens_accepted",
)


@dataclass(frozen=True)
class EngineStats:
    """Gauges now and counters since start (names in ``COUNTERS``)."""

    n_parallel: int
    n_ctx: int
    n_ctx_slot: int
    slots_busy: int
    queued: int
    kv_cells_used: int
    recent_tokens_per_second: float  # generated tokens over the last 10 s
    counters: dict[str, float]


class TextState:
    """Reply bytes to text deltas, holding back an unfinished UTF-8 character and any
    tail that could start a stop string, as llama-cpp-python's stream does."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self.stops), default=0)
        self.raw = bytearray()
        self.final = ""
        self.stopped = False
        self._sent = 0  # characters handed out
        self._searched = 0  # characters already searched for a stop string
        self._pending: list[tuple[int, TokenLogprob]] = []  # (end byte, logprob)

    def push(
        self, piece: bytes, logprob: TokenLogprob | None
    ) -> tuple[str, tuple[TokenLogprob, ...], bool]:
        """Add a token's bytes; return the text now safe to show, its logprobs, stopped."""
        self.raw += piece
        if logprob is not None:
            self._pending.append((len(self.raw), logprob))
        text = _complete_text(self.raw)
        start = max(0, self._searched - self._longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        self._searched = len(text)
        if hits:
            self.stopped = True
            self.final = text[: min(hits)]
            return (*self._release(self.final, len(self.final)), True)
        return (*self._release(text, len(text) - self._held_back(text)), False)

    def finish(self) -> tuple[str, tuple[TokenLogprob, ...]]:
        """The rest of the reply once generation ends (an unfinished character dropped)."""
        if not self.stopped:
            self.final = bytes(self.raw).decode("utf-8", errors="ignore")
            self._pending = [(0, lp) for _, lp in self._pending]
        return self._release(self.final, len(self.final))

    def _held_back(self, text: str) -> int:
        for k in range(min(self._longest - 1, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):
                return k
        return 0

    def _release(self, text: str, end: int) -> tuple[str, tuple[TokenLogprob, ...]]:
        out, self._sent = text[self._sent : end], max(self._sent, end)
        n_bytes = len(text[:end].encode("utf-8"))
        ready = tuple(lp for b, lp in self._pending if b <= n_bytes)
        self._pending = [(b, lp) for b, lp in self._pending if b > n_bytes]
        return out, ready


def _complete_text(raw: bytearray) -> str:
    """The text of ``raw`` without a trailing, still unfinished UTF-8 sequence."""
    end = len(raw)
    for back in range(1, min(4, end) + 1):
        byte = raw[end - back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): how long should its sequence be?
            need = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if back < need:
                end -= back
            break
    return bytes(raw[:end]).decode("utf-8", errors="ignore")


class GenerationFailedError(LocalLLMError):
    """llama.cpp failed while decoding a request (the engine itself keeps running)."""


@dataclass(frozen=True)
class PromptFormat:
    """How chat messages become prompt text: a renderer and the stop strings it implies."""

    render: Callable[[Sequence[ChatMessage]], str]
    stop: tuple[str, ...] = ()
    add_bos: bool = False  # False: the rendered text carries BOS itself, as Jinja templates do
    # Messages as the template's dicts (tool fields included) plus extra template variables
    # (``tools``); None where the format cannot take them (llama.cpp built-ins, --raw).
    render_messages: Callable[[Sequence[Mapping[str, Any]], Mapping[str, Any]], str] | None = None
    template_text: str | None = None  # the Jinja source: tool calling reads its format from it


class EventStream:
    """One request's events for asyncio code: iterate them; ``cancel()`` when leaving early."""

    def __init__(self, engine: Any, prompt: Sequence[int], params: GenerationParams):
        import asyncio  # serve's path only: chat -p does not pay for importing it

        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._done = False

        def sink(event: Any) -> None:
            loop.call_soon_threadsafe(self._queue.put_nowait, event)

        self.ticket = engine.submit(prompt, params, sink)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> TextDelta | GenerationDone:
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        if isinstance(event, GenerationFailed):
            self._done = True
            raise GenerationFailedError(event.message)
        if isinstance(event, GenerationDone):
            self._done = True
        return event

    def cancel(self) -> None:
        """Stop the generation and free its cells (nothing happens once it has ended)."""
        self.ticket.cancel()


def run_request(
    engine: Any, prompt: Sequence[int], params: GenerationParams, timeout: float | None = None
) -> GenerationDone:
    """Submit one request and wait for its end, from a plain thread: its record, or
    GenerationFailedError (the engine's failure, or no end within ``timeout`` seconds)."""
    ended: list[GenerationDone | GenerationFailed] = []
    finished = threading.Event()

    def sink(event: Any) -> None:
        if isinstance(event, GenerationDone | GenerationFailed):
            ended.append(event)
            finished.set()

    engine.submit(prompt, params, sink)
    if not finished.wait(timeout):
        raise GenerationFailedError(f"no end of the request within {timeout} s")
    if isinstance(ended[0], GenerationFailed):
        raise GenerationFailedError(ended[0].message)
    return ended[0]
