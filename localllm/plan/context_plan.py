"""One context's memory, planned the same way for every command.

When a GGUF (or a hub file's header) describes the model, llama.cpp itself says what it
would allocate: its dry run (:mod:`localllm.runtime.dry_run`) loads the metadata only and
creates the context with the exact settings the command will use, without reading or
allocating a byte of weights. Without a file (presets, ``--layers/--heads`` flags, a
catalog entry) the plan is :mod:`localllm.plan.memory`'s estimate, and says so. kv-calc's rows,
``info``, the memory check of chat/bench/ppl and bench records all come from here.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

from localllm.errors import InvalidArgument, ModelLoadError
from localllm.plan.facts import ModelFacts, dry_run_file
from localllm.plan.memory import (
    CachePlan,
    KVPlan,
    compute_buffer_bytes,
    context_shape,
    output_buffer_bytes,
    plan_kv,
)

__all__ = [
    "DRY_RUN_SOURCE",
    "ESTIMATE_SOURCE",
    "MAX_DRY_RUN_CELLS",
    "ContextMemory",
    "MemoryPlanner",
    "PlanSettings",
]

DRY_RUN_SOURCE = "llama.cpp dry run"
ESTIMATE_SOURCE = "estimate"
# The dry run allocates no buffer, but llama.cpp keeps ~50 bytes of bookkeeping per KV
# cell in RAM (positions, sequence sets): 4M cells cost ~200 MB. Larger plans are estimated.
MAX_DRY_RUN_CELLS = 1 << 22


@dataclass(frozen=True)
class PlanSettings:
    """The context settings a command loads with, besides its size and KV types."""

    n_ubatch: int = 512
    n_batch: int | None = None  # None: the micro-batch (kv-calc's rows)
    flash_attn: bool = True
    swa_full: bool = False  # llama.cpp's tools size the sliding-window cache to the window
    repack: bool | None = None  # llama.cpp's weight repacking (use_extra_bufts); None: default

    @property
    def batch(self) -> int:
        return self.n_batch if self.n_batch is not None else self.n_ubatch


@dataclass(frozen=True)
class ContextMemory:
    """What one context costs besides the weights: each cache, compute and output."""

    ctx: int
    batch: int
    type_k: str
    type_v: str
    cells: int  # the main cache's cells across all sequences (llama_n_ctx)
    caches: tuple[CachePlan, ...]
    compute_bytes: int | None
    output_bytes: int | None
    source: str  # DRY_RUN_SOURCE or ESTIMATE_SOURCE
    estimate: KVPlan  # the analytic plan, beside the dry run's
    estimate_compute_bytes: int | None
    swa_cells: int | None = None  # the sliding-window cache's cells, all streams
    other_swa_kv_bytes: int | None = None  # the KV with the SWA cache sized the other way

    @property
    def kv_bytes(self) -> int:
        return sum(c.bytes for c in self.caches)

    @property
    def k_bytes(self) -> int:
        return sum(c.k_bytes for c in self.caches)

    @property
    def v_bytes(self) -> int:
        return sum(c.v_bytes for c in self.caches)

    @property
    def buffers_bytes(self) -> int:
        """KV, compute and output: everything the context allocates."""
        return self.kv_bytes + (self.compute_bytes or 0) + (self.output_bytes or 0)


def _cache_plan(report: Any) -> CachePlan:
    return CachePlan(report.kind, report.cells, report.streams, report.layers,
                     report.k_bytes, report.v_bytes, report.r_bytes, report.s_bytes)  # fmt: skip


class MemoryPlanner:
    """Plans contexts of one model: through one dry-run load when there is a GGUF.

    A context manager: the dry-run model (and a hub header's temporary file) are opened at
    the first plan that needs them and released on exit.
    """

    def __init__(self, facts: ModelFacts, settings: PlanSettings, *, dry_run: bool = True):
        self.facts, self.settings = facts, settings
        self.use_dry_run = dry_run and facts.has_gguf
        self._stack = ExitStack()
        self._model: Any = None
        self.repack_note: str | None = None
        self.dry_run_error: str | None = None  # llama.cpp could not load the file

    def __enter__(self) -> MemoryPlanner:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stack.close()

    @property
    def source(self) -> str:
        return DRY_RUN_SOURCE if self.use_dry_run else ESTIMATE_SOURCE

    def _dry_model(self) -> Any:
        """The dry-run model, opened once; None (and estimates) if llama.cpp cannot load it."""
        if self._model is None and self.use_dry_run:
            from localllm.plan.dry_run_cache import CachedDryRun
            from localllm.runtime.dry_run import DryRunModel
            from localllm.runtime.library import choose_repack

            choice = choose_repack(self.settings.repack)
            self.repack_note = choice.note
            path = self._stack.enter_context(dry_run_file(self.facts))
            assert path is not None
            try:
                # A local file's figures are kept between runs; a hub header's temporary
                # file is dry-run each time.
                model: Any = (
                    CachedDryRun(path, use_extra_bufts=choice.repack)
                    if self.facts.path is not None
                    else DryRunModel(path, use_extra_bufts=choice.repack)
                )
            except ModelLoadError as exc:
                # The command's own load will fail the same way; a plan can still be given.
                self.use_dry_run, self.dry_run_error = False, str(exc)
                return None
            self._model = self._stack.enter_context(model)
        return self._model

    @property
    def weights_bytes(self) -> int | None:
        """llama_model_size when dry-running (every tensor), else the facts' figure."""
        model = self._dry_model()
        return int(model.weights_bytes) if model is not None else self.facts.weights_bytes

    def plan(self, ctx: int, batch: int, type_k: str, type_v: str) -> ContextMemory:
        """The memory of a context of ``batch`` sequences of ``ctx`` tokens."""
        s = self.settings
        spec, layout = self.facts.spec, self.facts.memory_layout
        shape = context_shape(ctx, batch, n_ubatch=s.n_ubatch, n_batch=s.batch)
        estimate = plan_kv(layout, ctx, batch, type_k=type_k, type_v=type_v,
                           flash_attn=s.flash_attn, n_ubatch=shape.n_ubatch,
                           swa_full=s.swa_full)  # fmt: skip
        compute = compute_buffer_bytes(spec, shape, flash_attn=s.flash_attn, layout=layout,
                                       swa_full=s.swa_full)  # fmt: skip
        est_compute = compute.bytes if compute else None
        other = None
        if layout.has_swa:
            other = plan_kv(layout, ctx, batch, type_k=type_k, type_v=type_v,
                            flash_attn=s.flash_attn, n_ubatch=shape.n_ubatch,
                            swa_full=not s.swa_full).total_bytes  # fmt: skip
        if shape.cells > MAX_DRY_RUN_CELLS or self._dry_model() is None:
            return ContextMemory(
                ctx, batch, type_k, type_v, estimate.cells, estimate.caches, est_compute,
                output_buffer_bytes(spec, batch), ESTIMATE_SOURCE, estimate, est_compute,
                _swa_cells(estimate.caches), other,
            )  # fmt: skip
        return self._dry_plan(ctx, batch, (type_k, type_v), estimate, est_compute)

    def _dry_plan(
        self, ctx: int, batch: int, types: tuple[str, str], estimate: KVPlan,
        est_compute: int | None,
    ) -> ContextMemory:  # fmt: skip
        from localllm.runtime.dry_run import DryRunSettings

        s = self.settings
        settings = DryRunSettings(
            n_ctx=ctx, n_seq=batch, n_batch=s.batch, n_ubatch=s.n_ubatch, type_k=types[0],
            type_v=types[1], flash_attn="on" if s.flash_attn else "off", swa_full=s.swa_full,
        )  # fmt: skip
        model = self._dry_model()
        got = model.plan(settings)
        if got.error is not None:
            raise InvalidArgument(f"llama.cpp would not create this context: {got.error}")
        caches = tuple(_cache_plan(c) for c in got.caches)
        other = None
        if any(c.kind == "swa" for c in caches):
            flipped = model.plan(replace(settings, swa_full=not s.swa_full))
            other = flipped.kv_bytes if flipped.error is None else None
        return ContextMemory(
            ctx, batch, types[0], types[1], got.n_ctx or estimate.cells, caches,
            got.compute_bytes, got.output_bytes, DRY_RUN_SOURCE, estimate, est_compute,
            _swa_cells(caches), other,
        )  # fmt: skip


def _swa_cells(caches: tuple[CachePlan, ...]) -> int | None:
    sliding = [c for c in caches if c.kind == "swa"]
    return sum(c.cells * c.streams for c in sliding) if sliding else None
