"""The generation engine of chat and serve, on llama.cpp's C API: one context, N slots.

Each request gets its own sequence in ONE context (a non-unified KV cache: ``n_ctx / N``
cells a slot) and all advance with one ``llama_decode`` per step (on the process's
:mod:`~localllm.runtime.compute_thread`): each generating slot's last sampled token, then
prompts. One worker thread owns the context; requests arrive on a queue, text leaves
through a callback (``stream`` adapts it to asyncio). Speculative decoding lives here
too: drafted tokens ride with the last one (:mod:`~localllm.runtime.speculation`), each
position is sampled in turn, drafts kept while they equal the sample, the rest removed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from localllm.errors import ContextOverflow, InvalidArgument
from localllm.runtime import compute_thread
from localllm.runtime.batch_draft import DraftModel
from localllm.runtime.batch_jobs import Job, Slot, Ticket, common_prefix
from localllm.runtime.batch_llama import (
    check_engine_options,
    load_model_and_context,
    put_token,
    request_sampler,
    token_logprob,
)
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
from localllm.runtime.speculation import DecodeCost, NgramIndex, check_spec_mode, verify_draft
from localllm.runtime.vocabulary import Vocabulary

__all__ = ["MAX_PARALLEL", "BatchEngine", "Ticket"]

RECENT_SECONDS = 10.0  # the window of the generation tokens/s gauge
MAX_PARALLEL = 64  # llama.cpp allows 256 sequences; more slots than this only thin the context


class BatchEngine(Vocabulary):
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
        spec: str = "auto",
        draft: DraftModel | None = None,
    ):
        self._model, self._ctx = model, ctx
        self.path = path
        self.load_log = log
        self.buffers: BufferReport = parse_buffer_report(log)
        self.repack = RepackChoice(True)  # set by load(): whether weights were repacked
        super().__init__(lc, model)
        self._mem = lc.llama_get_memory(ctx)
        self.n_ctx = int(lc.llama_n_ctx(ctx))
        self.n_ctx_slot = int(lc.llama_n_ctx_seq(ctx))
        self.n_parallel = int(lc.llama_n_seq_max(ctx))
        self.n_ctx_train = int(lc.llama_model_n_ctx_train(model))
        self._n_swa = int(lc.llama_model_n_swa(model))
        self._swa_full = swa_full
        self._n_batch, self._n_ubatch = n_batch, int(lc.llama_n_ubatch(ctx))
        self._batch = lc.llama_batch_init(n_batch, 0, 1)
        self._slots = [Slot(seq) for seq in range(self.n_parallel)]
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._counters = dict.fromkeys(COUNTERS, 0.0)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) for the tokens/s gauge
        self._cost = DecodeCost()
        self._draft = draft
        self.spec, self.spec_note = spec, None
        rolls_back = not (lc.llama_model_is_recurrent(model) or lc.llama_model_is_hybrid(model))
        if spec != "off" and not rolls_back:
            # Rejected drafts are removed with llama_memory_seq_rm, which a recurrent
            # state cannot do for part of a sequence.
            self.spec = "off"
            self.spec_note = "speculative decoding is off: this model's memory cannot roll back"
        self._thread = threading.Thread(target=self._loop, name="localllm-batch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        path: str | Path,
        options: LoadOptions,
        parallel: int = 1,
        *,
        spec: str = "auto",
        draft: str | Path | None = None,
    ) -> BatchEngine:
        """Load ``path`` with one context of ``options.n_ctx`` cells split over ``parallel``;
        ``spec`` is --spec (auto, off, ngram), ``draft`` a draft model's file."""
        check_engine_options(options, parallel, MAX_PARALLEL)
        check_spec_mode(spec, None if draft is None else str(draft))
        lc, model, ctx, log, repack = load_model_and_context(Path(path), options, parallel)
        drafter = None
        if draft is not None:
            try:
                drafter = DraftModel.load(lc, model, Path(draft), options, parallel)
            except BaseException:
                lc.llama_free(ctx)
                lc.llama_model_free(model)
                raise
        engine = cls(
            lc, model, ctx, Path(path), options.n_batch, log,
            swa_full=options.swa_full, spec=spec, draft=drafter,
        )  # fmt: skip
        engine.repack = repack
        return engine

    @property
    def context_handle(self) -> Any:
        """The ``llama_context*`` (for saving a sequence's state while the engine is idle)."""
        return self._ctx

    @property
    def model_handle(self) -> Any:
        """The ``llama_model*``: another context (serve's embeddings) shares its weights."""
        return self._model

    def forget(self, seq: int = 0, keep: Sequence[int] = ()) -> None:
        """Drop sequence ``seq``'s cells; or, with ``keep``, record that it holds those
        tokens' cells (loaded from a saved KV state: the next request reuses its prefix)."""
        with self._cond:
            slot = self._slots[seq]
            if slot.job is not None:
                raise GenerationFailedError(f"slot {seq} is generating; stop it first")
            if not keep:
                self._lc.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
            slot.held[:] = keep

    def held(self, seq: int = 0) -> tuple[int, ...]:
        """The tokens whose KV cells sequence ``seq`` holds for the next request."""
        return tuple(self._slots[seq].held)

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
        sampler = request_sampler(self._lc, self._vocab, self.n_vocab, params)
        job = Job(list(prompt), params, sink, sampler, TextState(params.stop))
        with self._cond:
            if self._closing:
                job.sampler.free()
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
        if self._draft is not None:
            self._draft.close()
        lc.llama_free(self._ctx)
        lc.llama_model_free(self._model)

    # ------------------------------------------------------------------ worker thread
    def wake(self) -> None:
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
            for slot in self._slots:
                if slot.job is not None and slot.job.cancelled:
                    reason = "interrupted" if slot.job.interrupted else "cancelled"
                    self._finish(slot.job, slot, reason)
            if self._busy():
                try:
                    self._step()
                except Exception as exc:  # a dead worker would take the whole server with it
                    for slot in self._slots:
                        if slot.job is not None:
                            self._fail(slot, f"internal error in the batch engine: {exc!r}")
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
            slot = max(free, key=lambda s: (common_prefix(s.held, job.prompt), -s.last_used))
            reuse = self._reusable(slot, job.prompt)
            job.window_reevaluated = self.prefix_lost(slot.seq, job.prompt)
            if reuse < len(slot.held) and not self._lc.llama_memory_seq_rm(
                self._mem, slot.seq, reuse, -1
            ):
                self._lc.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
                reuse = 0
            del slot.held[reuse:]
            job.prompt_pos = job.cached = reuse
            job.t_admit = time.perf_counter()
            if self.spec != "off":
                job.ngrams = NgramIndex(prompt=job.prompt)
                job.policy.forced = self.spec == "ngram"
            slot.job = job
            self._counters["requests_started"] += 1
            self._counters["prompt_tokens_cached"] += reuse

    def prefix_lost(self, seq: int, prompt: Sequence[int]) -> bool:
        """Whether a sliding window dropped cells that ``prompt``'s cached prefix needs."""
        slot = self._slots[seq]
        shared = min(common_prefix(slot.held, prompt), len(prompt) - 1)
        return shared > 0 and self._reusable(slot, prompt) == 0

    def _reusable(self, slot: Slot, prompt: Sequence[int]) -> int:
        """How many of the slot's cells the prompt can keep (its last token is evaluated
        again for its logits). A sliding-window cache may have dropped cells the first new
        token attends to: then none, as llama-server checks with seq_pos_min."""
        reuse = min(common_prefix(slot.held, prompt), len(prompt) - 1)
        if reuse > 0 and self._n_swa > 0 and not self._swa_full:
            pos_min = int(self._lc.llama_memory_seq_pos_min(self._mem, slot.seq))
            if pos_min > max(0, reuse - self._n_swa):
                return 0
        return reuse

    def _step(self) -> None:
        """One llama_decode for every slot: generated tokens (and drafts), then prompts."""
        lc, batch = self._lc, self._batch
        plan: list[tuple[Slot, list[int]]] = []
        outputs: list[tuple[int, Slot, list[int]]] = []  # (logits index, slot, its draft)
        generating = [s for s in self._slots if s.job is not None and s.job.last_token is not None]
        # A window-sized cache drops cells a later ubatch no longer sees: drafts stay in
        # the first, or a rollback could leave the next token without its window.
        windowed = self._n_swa > 0 and not self._swa_full
        room = (self._n_ubatch if windowed else self._n_batch) - len(generating)
        n = 0
        for slot in generating:
            job = slot.job
            assert job is not None and job.last_token is not None
            draft = self._draft_for(slot, job, room, len(generating))
            room -= len(draft)
            for i, token in enumerate([job.last_token, *draft]):
                put_token(batch, n + i, token, len(slot.held) + i, slot.seq, True)
            plan.append((slot, [job.last_token]))
            outputs.append((n, slot, draft))
            n += 1 + len(draft)
        n_generated = n  # tokens that all want logits: what a draft's cost is fitted on
        for slot in self._slots:
            job = slot.job
            if job is None or job.prompt_pos >= len(job.prompt) or n >= self._n_batch:
                continue
            chunk = job.prompt[job.prompt_pos : job.prompt_pos + self._n_batch - n]
            last = job.prompt_pos + len(chunk) == len(job.prompt)
            for i, token in enumerate(chunk):
                put_token(
                    batch, n, token, len(slot.held) + i, slot.seq, last and i == len(chunk) - 1
                )
                n += 1
            plan.append((slot, chunk))
            if last:
                outputs.append((n - 1, slot, []))
        batch.n_tokens = n
        started = time.perf_counter()
        rc = compute_thread.decode(lc, self._ctx, batch)
        elapsed = time.perf_counter() - started
        self._counters["decode_calls"] += 1
        self._counters["decode_seconds"] += elapsed
        self._counters["batch_tokens"] += n
        if n == n_generated:  # prompt tokens (no logits) are cheaper: not in the fit
            self._cost.observe(n, elapsed)
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
        for index, slot, draft in outputs:
            self._verify(slot, index, draft, len(generating))

    def _draft_for(self, slot: Slot, job: Job, room: int, generating: int) -> list[int]:
        """The tokens to verify after ``job.last_token`` this step (often none)."""
        if job.ngrams is None or room <= 0:
            return []
        echo = self._draft is None and job.ngrams.echoes_reply()  # the reply repeating itself
        want = job.policy.length(self._cost, generating, echo)
        limit = min(
            want,
            room,
            job.params.max_tokens - job.generated - 1,  # past the budget: wasted
            self.n_ctx_slot - len(slot.held) - 1,  # the drafts' cells must fit the slot
        )
        if limit <= 0:
            return []
        if self._draft is not None:
            return self._draft.draft(slot.seq, job.ngrams.tokens, limit)
        return job.ngrams.draft(limit)

    def _verify(self, slot: Slot, index: int, draft: list[int], generating: int) -> None:
        """Sample position after position; keep drafts while they equal the sample, then
        remove the rejected drafts' cells so the sequence is as if never drafted."""
        job = slot.job
        assert job is not None

        def sample(i: int) -> int | None:
            if i > 0:
                slot.held.append(draft[i - 1])  # accepted: its cell is already decoded
            return self._sample(slot, index + i)

        verified = verify_draft(draft, sample)
        if not draft:
            return
        if slot.job is job:  # else _release did it
            self._lc.llama_memory_seq_rm(self._mem, slot.seq, len(slot.held), -1)
        job.policy.record(len(draft), verified.accepted, self._cost, generating)
        self._counters["draft_tokens"] += len(draft)
        self._counters["draft_tokens_accepted"] += verified.accepted

    def _sample(self, slot: Slot, index: int) -> int | None:
        """Sample output ``index`` with the job's sampler; the token, None once it ended."""
        job = slot.job
        assert job is not None
        lc, p = self._lc, job.params
        token = job.sampler.sample(self._ctx, index)
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
            return None
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
            if job.ngrams is not None:
                job.ngrams.append(token)
            return token
        return None

    def _emit(self, job: Job, event: Any) -> None:
        try:
            job.sink(event)
        except RuntimeError:
            # The consumer's event loop is gone (server shutting down): nobody is listening.
            job.cancelled = True

    def _finish(self, job: Job, slot: Slot | None, reason: str) -> None:
        text, logprobs = job.text.finish()
        if reason not in ("cancelled", "interrupted") and (text or logprobs):
            self._emit(job, TextDelta(text, logprobs))
        end = time.perf_counter()
        first = job.t_first if job.t_first is not None else end
        done = GenerationDone(
            text=job.text.final,
            finish_reason=reason,
            prompt_tokens=len(job.prompt),
            cached_tokens=job.cached,
            completion_tokens=job.generated,
            queued_seconds=(job.t_admit or end) - job.t_submit,
            prompt_seconds=(first - job.t_admit) if job.t_admit else 0.0,
            generation_seconds=end - first,
            slot=slot.seq if slot is not None else -1,
            draft_n=job.policy.drafted,
            draft_n_accepted=job.policy.accepted,
            window_reevaluated=job.window_reevaluated,
        )
        key = "requests_finished" if reason in ("stop", "length") else "requests_cancelled"
        self._counters[key] += 1
        # Released first: once the caller has the result, the slot is idle and its cells final.
        self._release(job, slot, keep_cells=reason != "cancelled")
        self._emit(job, done)

    def _fail(self, slot: Slot, message: str) -> None:
        job = slot.job
        assert job is not None
        self._counters["requests_failed"] += 1
        self._release(job, slot, keep_cells=False)
        self._emit(job, GenerationFailed(message))

    def _shut_down(self) -> None:
        """End every job as cancelled: the running ones and those still queued."""
        for slot in self._slots:
            if slot.job is not None:
                self._finish(slot.job, slot, "cancelled")
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for job in pending:
            self._finish(job, None, "cancelled")

    def _release(self, job: Job, slot: Slot | None, keep_cells: bool) -> None:
        job.sampler.free()
        job.sampler = None
        if slot is None:
            return
        if not keep_cells:
            # A cancelled reply is not a prefix worth keeping: give the cells back now.
            self._lc.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
            slot.held.clear()
        else:  # the cells of drafts decoded after the reply ended
            self._lc.llama_memory_seq_rm(self._mem, slot.seq, len(slot.held), -1)
        slot.job = None
        slot.last_used = time.perf_counter()
