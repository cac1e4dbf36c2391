"""A batched generation engine on llama.cpp's C API: one model, one context, N slots.

llama-cpp-python's ``Llama`` decodes one sequence at a time. Here each of N requests
gets its own sequence id in ONE context (``n_seq_max = N`` with a non-unified KV cache,
so each slot owns ``n_ctx / N`` cells) and all of them advance with one ``llama_decode``
per step: every generating slot adds its last sampled token, prompts fill the rest of
the batch. One worker thread owns the context; requests arrive on a queue and their
text goes back through a callback (``stream`` adapts it to asyncio).

Each request samples with its own chain (:mod:`~localllm.runtime.batch_llama`,
llama-cpp-python's), so a request running alone returns what ``localllm chat`` prints.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localllm.errors import ContextOverflow, InvalidArgument
from localllm.runtime.batch_llama import load_model_and_context, sampler_chain, token_logprob
from localllm.runtime.batch_records import (
    COUNTERS,
    EngineStats,
    EventStream,
    GenerationDone,
    GenerationFailed,
    GenerationFailedError,
    GenerationParams,
    TextDelta,
    TextState,
)
from localllm.runtime.library import RepackChoice
from localllm.runtime.log import BufferReport, parse_buffer_report
from localllm.runtime.params import LoadOptions

__all__ = ["MAX_PARALLEL", "BatchEngine", "Ticket"]

RECENT_SECONDS = 10.0  # the window of the generation tokens/s gauge
MAX_PARALLEL = 64  # llama.cpp allows 256 sequences; more slots than this only thin the context


class Ticket:
    """A submitted request: ``cancel()`` stops it and frees its slot's cells."""

    def __init__(self, engine: BatchEngine, job: _Job) -> None:
        self._engine, self._job = engine, job

    def cancel(self) -> None:
        if not self._job.cancelled:
            self._job.cancelled = True
            self._engine._wake()


@dataclass(eq=False)
class _Job:
    prompt: list[int]
    params: GenerationParams
    sink: Callable[[Any], None]
    chain: Any  # llama_sampler*, owned by the job until it ends
    text: TextState
    cancelled: bool = False
    prompt_pos: int = 0  # next prompt token to evaluate
    cached: int = 0  # prompt tokens whose cells were reused
    generated: int = 0
    last_token: int | None = None  # sampled, not yet decoded
    t_submit: float = field(default_factory=time.perf_counter)
    t_admit: float = 0.0
    t_first: float | None = None


@dataclass(eq=False)
class _Slot:
    seq: int
    held: list[int] = field(default_factory=list)  # tokens whose cells this sequence holds
    job: _Job | None = None
    last_used: float = 0.0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class BatchEngine:
    """One model and one context serving up to ``n_parallel`` requests at once."""

    def __init__(
        self,
        lc: Any,
        model: Any,
        ctx: Any,
        path: Path,
        n_batch: int,
        log: list[str],
        *,
        swa_full: bool = False,
    ):
        self._lc, self._model, self._ctx = lc, model, ctx
        self.path = path
        self.load_log = log
        self.buffers: BufferReport = parse_buffer_report(log)
        self.repack = RepackChoice(True)  # set by load(): whether weights were repacked
        self._vocab = lc.llama_model_get_vocab(model)
        self._mem = lc.llama_get_memory(ctx)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self.n_ctx = int(lc.llama_n_ctx(ctx))
        self.n_ctx_slot = int(lc.llama_n_ctx_seq(ctx))
        self.n_parallel = int(lc.llama_n_seq_max(ctx))
        self.n_ctx_train = int(lc.llama_model_n_ctx_train(model))
        self._n_swa = int(lc.llama_model_n_swa(model))
        self._swa_full = swa_full
        self._n_batch = n_batch
        self._batch = lc.llama_batch_init(n_batch, 0, 1)
        self._slots = [_Slot(seq) for seq in range(self.n_parallel)]
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._pieces: dict[int, bytes] = {}
        self._counters = dict.fromkeys(COUNTERS, 0.0)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) for the tokens/s gauge
        self._thread = threading.Thread(target=self._loop, name="localllm-batch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, options: LoadOptions, parallel: int = 1) -> BatchEngine:
        """Load ``path`` with one context of ``options.n_ctx`` cells split over ``parallel``."""
        options.validate()
        if not 1 <= parallel <= MAX_PARALLEL:
            raise InvalidArgument(f"parallel {parallel} must be between 1 and {MAX_PARALLEL}")
        if options.n_ctx < parallel:
            raise InvalidArgument(
                f"a context of {options.n_ctx} tokens cannot be split over {parallel} slots"
            )
        if options.n_batch < parallel:
            # Each step carries one token per generating slot.
            raise InvalidArgument(
                f"batch size {options.n_batch} must be at least --parallel {parallel}"
            )
        lc, model, ctx, log, repack = load_model_and_context(Path(path), options, parallel)
        engine = cls(lc, model, ctx, Path(path), options.n_batch, log, swa_full=options.swa_full)
        engine.repack = repack
        return engine

    # ------------------------------------------------------------------ vocabulary
    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special`` parses control tokens such as <|im_start|>."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            buf = (self._lc.llama_token * cap)()
            n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (control tokens are empty, as chat prints them)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = self._lc.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._lc.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def token_text(self, token: int) -> str:
        """A special token's text (``<s>``, ``<|im_end|>``), "" for none (-1)."""
        if token == -1:
            return ""
        return self._lc.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    @property
    def bos_text(self) -> str:
        return self.token_text(self._lc.llama_vocab_bos(self._vocab))

    @property
    def eos_text(self) -> str:
        return self.token_text(self._lc.llama_vocab_eos(self._vocab))

    # ------------------------------------------------------------------ requests
    def submit(
        self, prompt: Sequence[int], params: GenerationParams, sink: Callable[[Any], None]
    ) -> Ticket:
        """Queue a generation; ``sink`` gets TextDelta events, then GenerationDone or
        GenerationFailed, called from the worker thread."""
        params.validate()
        if not prompt:
            raise InvalidArgument("the prompt is empty: nothing to continue from")
        if len(prompt) >= self.n_ctx_slot:
            raise ContextOverflow(
                f"the prompt is {len(prompt)} tokens but a slot holds {self.n_ctx_slot}"
            )
        bad = [t for t in prompt if not 0 <= t < self.n_vocab]
        if bad:
            raise InvalidArgument(
                f"token id {bad[0]} is not in the vocabulary (0..{self.n_vocab - 1})"
            )
        chain = sampler_chain(self._lc, self._vocab, self.n_vocab, params)
        job = _Job(list(prompt), params, sink, chain, TextState(params.stop))
        with self._cond:
            if self._closing:
                self._lc.llama_sampler_free(job.chain)
                raise GenerationFailedError("the engine is shutting down")
            self._pending.append(job)
            self._cond.notify()
        return Ticket(self, job)

    def stream(self, prompt: Sequence[int], params: GenerationParams) -> EventStream:
        """``submit`` for asyncio (from a running loop): errors raise now, events later."""
        return EventStream(self, prompt, params)

    def stats(self) -> EngineStats:
        """A snapshot for /metrics and /health (read without stopping the worker)."""
        now = time.perf_counter()
        with self._cond:
            while self._recent and now - self._recent[0][0] > RECENT_SECONDS:
                self._recent.popleft()
            recent = sum(n for _, n in self._recent)
            span = now - self._recent[0][0] if self._recent else 0.0
            return EngineStats(
                n_parallel=self.n_parallel,
                n_ctx=self.n_ctx,
                n_ctx_slot=self.n_ctx_slot,
                slots_busy=sum(1 for s in self._slots if s.job is not None),
                queued=len(self._pending),
                kv_cells_used=sum(len(s.held) for s in self._slots),
                recent_tokens_per_second=recent / span if span > 0.5 else 0.0,
                counters=dict(self._counters),
            )

    def close(self) -> None:
        """Stop the worker (pending and running requests end as cancelled), free llama.cpp."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        lc = self._lc
        lc.llama_batch_free(self._batch)
        lc.llama_free(self._ctx)
        lc.llama_model_free(self._model)

    # ------------------------------------------------------------------ worker thread
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._admit()
                while not self._closing and not self._busy():
                    self._cond.wait()
                    self._admit()
                if self._closing:
                    break
            self._drop_cancelled()
            if self._busy():
                try:
                    self._step()
                except Exception as exc:  # a dead worker would take the whole server with it
                    self._fail_active(f"internal error in the batch engine: {exc!r}")
        self._shut_down()

    def _busy(self) -> bool:
        return any(s.job is not None for s in self._slots)

    def _admit(self) -> None:
        """Move queued jobs into free slots (called with the lock held)."""
        while self._pending:
            job = self._pending[0]
            if job.cancelled:
                self._pending.popleft()
                self._finish(job, None, "cancelled")
                continue
            free = [s for s in self._slots if s.job is None]
            if not free:
                return
            self._pending.popleft()
            slot = max(free, key=lambda s: (_common_prefix(s.held, job.prompt), -s.last_used))
            reuse = self._reusable(slot, job.prompt)
            if reuse < len(slot.held) and not self._lc.llama_memory_seq_rm(
                self._mem, slot.seq, reuse, -1
            ):
                self._lc.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
                reuse = 0
            del slot.held[reuse:]
            job.prompt_pos = job.cached = reuse
            job.t_admit = time.perf_counter()
            slot.job = job
            self._counters["requests_started"] += 1
            self._counters["prompt_tokens_cached"] += reuse

    def _reusable(self, slot: _Slot, prompt: list[int]) -> int:
        """How many of the slot's cells the prompt can keep (its last token is evaluated
        again for its logits). A sliding-window cache may have dropped cells the first new
        token attends to: then none, as llama-server checks with seq_pos_min."""
        reuse = min(_common_prefix(slot.held, prompt), len(prompt) - 1)
        if reuse > 0 and self._n_swa > 0 and not self._swa_full:
            pos_min = int(self._lc.llama_memory_seq_pos_min(self._mem, slot.seq))
            if pos_min > max(0, reuse - self._n_swa):
                return 0
        return reuse

    def _drop_cancelled(self) -> None:
        for slot in self._slots:
            if slot.job is not None and slot.job.cancelled:
                self._finish(slot.job, slot, "cancelled")

    def _step(self) -> None:
        """One llama_decode for every active slot: generated tokens first, then prompts."""
        lc, batch = self._lc, self._batch
        plan: list[tuple[_Slot, list[int]]] = []
        outputs: list[tuple[int, _Slot]] = []
        n = 0
        for slot in self._slots:
            job = slot.job
            if job is not None and job.last_token is not None:
                self._put(n, job.last_token, len(slot.held), slot.seq, True)
                plan.append((slot, [job.last_token]))
                outputs.append((n, slot))
                n += 1
        for slot in self._slots:
            job = slot.job
            if job is None or job.prompt_pos >= len(job.prompt) or n >= self._n_batch:
                continue
            chunk = job.prompt[job.prompt_pos : job.prompt_pos + self._n_batch - n]
            last = job.prompt_pos + len(chunk) == len(job.prompt)
            for i, token in enumerate(chunk):
                self._put(n, token, len(slot.held) + i, slot.seq, last and i == len(chunk) - 1)
                n += 1
            plan.append((slot, chunk))
            if last:
                outputs.append((n - 1, slot))
        batch.n_tokens = n
        started = time.perf_counter()
        rc = lc.llama_decode(self._ctx, batch)
        elapsed = time.perf_counter() - started
        self._counters["decode_calls"] += 1
        self._counters["decode_seconds"] += elapsed
        self._counters["batch_tokens"] += n
        if rc != 0:
            for slot, _ in plan:
                if slot.job is not None:
                    self._fail(slot, f"llama_decode returned {rc} for a batch of {n} tokens")
            return
        for slot, tokens in plan:
            slot.held.extend(tokens)
            job = slot.job
            if job is not None and job.last_token is None:
                job.prompt_pos += len(tokens)
                self._counters["prompt_tokens_evaluated"] += len(tokens)
        for index, slot in outputs:
            self._sample(slot, index)

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits

    def _sample(self, slot: _Slot, index: int) -> None:
        job = slot.job
        assert job is not None
        lc, p = self._lc, job.params
        token = int(lc.llama_sampler_sample(job.chain, self._ctx, index))
        now = time.perf_counter()
        if job.t_first is None:
            job.t_first = now
        logprob = None
        if p.top_logprobs is not None:
            logits = self._lc.llama_get_logits_ith(self._ctx, index)
            logprob = token_logprob(logits, self.n_vocab, token, p.top_logprobs, self.piece)
        job.last_token = None
        if lc.llama_vocab_is_eog(self._vocab, token) and not p.ignore_eos:
            self._finish(job, slot, "stop")
            return
        job.generated += 1
        self._counters["completion_tokens"] += 1
        with self._cond:
            self._recent.append((now, 1))
            while now - self._recent[0][0] > RECENT_SECONDS:  # bounded without readers too
                self._recent.popleft()
        text, logprobs, stopped = job.text.push(self.piece(token), logprob)
        if text or logprobs:
            self._emit(job, TextDelta(text, logprobs))
        if stopped:
            self._finish(job, slot, "stop")
        elif job.generated >= p.max_tokens or len(slot.held) >= self.n_ctx_slot:
            self._finish(job, slot, "length")
        else:
            job.last_token = token

    def _emit(self, job: _Job, event: Any) -> None:
        try:
            job.sink(event)
        except RuntimeError:
            # The consumer's event loop is gone (server shutting down): nobody is listening.
            job.cancelled = True

    def _finish(self, job: _Job, slot: _Slot | None, reason: str) -> None:
        text, logprobs = job.text.finish()
        if reason != "cancelled" and (text or logprobs):
            self._emit(job, TextDelta(text, logprobs))
        end = time.perf_counter()
        first = job.t_first if job.t_first is not None else end
        self._emit(
            job,
            GenerationDone(
                text=job.text.final,
                finish_reason=reason,
                prompt_tokens=len(job.prompt),
                cached_tokens=job.cached,
                completion_tokens=job.generated,
                queued_seconds=(job.t_admit or end) - job.t_submit,
                prompt_seconds=(first - job.t_admit) if job.t_admit else 0.0,
                generation_seconds=end - first,
                slot=slot.seq if slot is not None else -1,
            ),
        )
        key = "requests_cancelled" if reason == "cancelled" else "requests_finished"
        self._counters[key] += 1
        self._release(job, slot, keep_cells=reason != "cancelled")

    def _fail(self, slot: _Slot, message: str) -> None:
        job = slot.job
        assert job is not None
        self._emit(job, GenerationFailed(message))
        self._counters["requests_failed"] += 1
        self._release(job, slot, keep_cells=False)

    def _fail_active(self, message: str) -> None:
        for slot in self._slots:
            if slot.job is not None:
                self._fail(slot, message)

    def _shut_down(self) -> None:
        """End every job as cancelled: the running ones and those still queued."""
        for slot in self._slots:
            if slot.job is not None:
                self._finish(slot.job, slot, "cancelled")
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for job in pending:
            self._finish(job, None, "cancelled")

    def _release(self, job: _Job, slot: _Slot | None, keep_cells: bool) -> None:
        self._lc.llama_sampler_free(job.chain)
        job.chain = None
        if slot is None:
            return
        if not keep_cells:
            # A cancelled reply is not a prefix worth keeping: give the cells back now.
            self._lc.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
            slot.held.clear()
        slot.job = None
        slot.last_used = time.perf_counter()
