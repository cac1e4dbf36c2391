"""The core of ``localllm kv-calc``: what a model costs at a context, batch and KV type.

Architecture facts come from :mod:`localllm.plan.facts`; each row's memory from
:mod:`localllm.plan.context_plan`: llama.cpp's dry run of the GGUF when there is one (nothing
is allocated, no weight is read), :mod:`localllm.plan.memory`'s estimate otherwise. The
per-token and MHA/MQA columns are the arithmetic that explains the figures.
:mod:`localllm.plan.verify` loads the model for real and compares.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from localllm.errors import InvalidArgument
from localllm.gguf.ggml_types import KV_CACHE_TYPES
from localllm.gguf.kv_layout import MemoryLayout
from localllm.gguf.spec import ModelSpec
from localllm.machine import available_memory_bytes
from localllm.plan.context_plan import ESTIMATE_SOURCE, ContextMemory, MemoryPlanner, PlanSettings
from localllm.plan.facts import ArchFlags, ModelFacts, resolve_architecture
from localllm.plan.memory import CachePlan, check_kv_types, layout_bytes_per_token
from localllm.plan.rope import plan_rope
from localllm.runtime.params import LoadOptions
from localllm.text import escape_untrusted, format_bytes

__all__ = [
    "FIT_SHARE",
    "BudgetRow",
    "KVCalcRequest",
    "KVCalcResult",
    "KVRow",
    "fit_verdict",
    "kv_calc",
]

# A plan "fits" below this share of available RAM; up to all of it is "tight".
FIT_SHARE = 0.85
# Budget search ceiling: 2^16 x 256 cells, 16.7M tokens per sequence.
_MAX_BUDGET_STEPS = 1 << 16
_CELL_STEP = 256


@dataclass(frozen=True)
class KVCalcRequest:
    """Everything ``kv-calc`` was asked, parsed."""

    model: str | None = None
    ctx: tuple[int, ...] = ()  # empty: 512, 2048, 4096 and the trained length
    batch: tuple[int, ...] = (1,)
    kv_types: tuple[str, ...] = ()  # empty: f16 (all types with a budget)
    type_k: str | None = None
    type_v: str | None = None
    flash_attn: bool = True
    ubatch: int = 512
    arch: ArchFlags = field(default_factory=ArchFlags)
    budget_bytes: int | None = None
    rope: str | None = None
    swa_full: bool = False  # the commands' default: the SWA cache sized to the window
    estimate: bool = False  # the analytic estimate only, even with a GGUF at hand
    repack: bool | None = None  # the weight repacking the dry run loads with
    n_batch: int | None = None  # None: the micro-batch (a command's own batch otherwise)

    def plan_settings(self) -> PlanSettings:
        return PlanSettings(
            n_ubatch=self.ubatch, n_batch=self.n_batch, flash_attn=self.flash_attn,
            swa_full=self.swa_full, repack=self.repack,
        )  # fmt: skip


@dataclass(frozen=True)
class KVRow:
    """One point of the sweep: a context, a batch and a KV type pair."""

    ctx: int
    batch: int
    type_k: str
    type_v: str
    cells: int
    k_bytes: int
    v_bytes: int
    kv_bytes: int
    bytes_per_token: int
    mha_kv_bytes: int
    mqa_kv_bytes: int
    compute_bytes: int | None
    output_bytes: int | None
    weights_bytes: int | None
    total_bytes: int
    verdict: str  # fits | tight | too big | unknown
    swa_cells: int | None = None  # the sliding-window cache's cells (as the setting sizes it)
    other_swa_kv_bytes: int | None = None  # KV with the SWA cache sized the other way
    source: str = ESTIMATE_SOURCE  # where KV, compute and output come from
    caches: tuple[CachePlan, ...] = ()
    estimate_kv_bytes: int | None = None  # the analytic figures, beside the dry run's
    estimate_compute_bytes: int | None = None

    def as_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "ctx": self.ctx,
            "batch": self.batch,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "cells": self.cells,
            "k_bytes": self.k_bytes,
            "v_bytes": self.v_bytes,
            "kv_bytes": self.kv_bytes,
            "mha_kv_bytes": self.mha_kv_bytes,
            "mqa_kv_bytes": self.mqa_kv_bytes,
            "compute_bytes": self.compute_bytes,
            "total_bytes": self.total_bytes,
            "bytes_per_token": self.bytes_per_token,
            "output_bytes": self.output_bytes,
            "weights_bytes": self.weights_bytes,
            "verdict": self.verdict,
            "source": self.source,
            "caches": [_cache_json(c) for c in self.caches],
            "estimate": {
                "kv_bytes": self.estimate_kv_bytes,
                "compute_bytes": self.estimate_compute_bytes,
            },
        }
        if self.swa_cells is not None:
            data["swa_cells"] = self.swa_cells
            data["swa_kv_bytes"] = sum(c.bytes for c in self.caches if c.kind == "swa")
            data["other_swa_kv_bytes"] = self.other_swa_kv_bytes
        return data


def _cache_json(c: CachePlan) -> dict[str, object]:
    return {"kind": c.kind, "cells": c.cells, "streams": c.streams, "layers": c.layers,
            "k_bytes": c.k_bytes, "v_bytes": c.v_bytes, "state_bytes": c.r_bytes + c.s_bytes,
            "bytes": c.bytes}  # fmt: skip


@dataclass(frozen=True)
class BudgetRow:
    """The largest context per sequence that fits the budget, for one KV type and batch."""

    type_k: str
    type_v: str
    batch: int
    max_ctx: int  # 0: not even 256 tokens fit
    kv_bytes: int
    total_bytes: int
    capped: bool = False  # the search ceiling fits too

    def as_json(self) -> dict[str, object]:
        return {
            "type_k": self.type_k,
            "type_v": self.type_v,
            "batch": self.batch,
            "max_ctx": self.max_ctx,
            "kv_bytes": self.kv_bytes,
            "total_bytes": self.total_bytes,
        }


@dataclass(frozen=True)
class KVCalcResult:
    facts: ModelFacts
    request: KVCalcRequest
    per_token_bytes: int  # of the first KV type pair
    gqa_saving_factor: float  # MHA bytes / this model's bytes
    rows: tuple[KVRow, ...]
    budget: tuple[BudgetRow, ...] = ()
    available_bytes: int | None = None
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    weights_bytes: int | None = None  # llama_model_size with a dry run, else the facts'
    plan_source: str = ESTIMATE_SOURCE  # where the rows' KV, compute and output come from
    per_token_beyond_window: int | None = None  # SWA models: what each token adds past it

    @property
    def layout(self) -> MemoryLayout:
        return self.facts.memory_layout

    def as_json(self) -> dict[str, object]:
        spec, layout = self.facts.spec, self.layout
        data: dict[str, object] = {
            "model": self.facts.label,
            "per_token_bytes": self.per_token_bytes,
            "gqa_saving_factor": self.gqa_saving_factor,
            "weights_bytes": self.weights_bytes,
            "rows": [r.as_json() for r in self.rows],
            "source": self.facts.source,
            "plan_source": self.plan_source,
            "architecture": {
                "n_layers": spec.n_layers,
                "n_heads": spec.n_heads,
                "n_kv_heads": spec.n_kv_heads,
                "head_dim": spec.head_dim,
                "attention": spec.attention_kind,
                "n_ctx_train": spec.n_ctx_train or None,
                "sliding_window": spec.sliding_window or None,
            },
            "flash_attn": self.request.flash_attn,
            "ubatch": self.request.ubatch,
            "available_bytes": self.available_bytes,
            "warnings": list(self.warnings),
        }
        if layout.has_swa:
            data["swa"] = {
                "window": layout.n_swa,
                "type": layout.swa_type,
                "sliding_layers": sum(a.swa for a in layout.attention),
                "full_layers": sum(not a.swa for a in layout.attention),
                "commands_use": "full" if self.request.swa_full else "window",
                "per_token_beyond_window": self.per_token_beyond_window,
            }
        if self.request.budget_bytes is not None:
            data["budget_bytes"] = self.request.budget_bytes
            data["budget"] = [b.as_json() for b in self.budget]
        return data


def fit_verdict(total: int, available: int | None) -> str:
    """fits (within 85% of what is there), tight (within all of it), too big, or unknown."""
    if available is None:
        return "unknown"
    if total <= available * FIT_SHARE:
        return "fits"
    return "tight" if total <= available else "too big"


def _type_pairs(request: KVCalcRequest) -> list[tuple[str, str]]:
    if request.kv_types:
        bases: tuple[str, ...] = request.kv_types
    elif request.budget_bytes is not None and request.type_k is None and request.type_v is None:
        bases = KV_CACHE_TYPES
    else:
        bases = ("f16",)
    pairs = [(request.type_k or t, request.type_v or t) for t in bases]
    return list(dict.fromkeys(pairs))


def _check_traps(facts: ModelFacts, pair: tuple[str, str], request: KVCalcRequest) -> None:
    """The settings llama.cpp would refuse, as the one-line error a load would end in."""
    spec, layout = facts.spec, facts.memory_layout
    type_k, type_v = pair
    if type_k != type_v and layout.attention and all(a.v == 0 for a in layout.attention):
        raise InvalidArgument(
            f"{escape_untrusted(facts.label, 60)} caches attention as an MLA latent that holds "
            f"K and V together: llama.cpp refuses K {type_k} with V {type_v}; give one type"
        )
    # The same check (and message) chat and every other load runs first.
    LoadOptions(
        n_ctx=max(request.ctx or (1,)),
        n_ubatch=request.ubatch,
        type_k=type_k,
        type_v=type_v,
        flash_attn=request.flash_attn,
    ).validate()
    check_kv_types(spec, type_k, type_v)


def _heads_factor(layout: MemoryLayout, spec: ModelSpec) -> bool:
    """Whether this model's KV scales with its KV heads (plain attention, one head count)."""
    return (
        bool(layout.attention)
        and not layout.indexer
        and not layout.recurrent_layers
        and all(a.v for a in layout.attention)
        and spec.n_kv_heads_per_layer is None
    )


class _Rows:
    """Rows of one kv-calc run: each context planned once (dry run or estimate)."""

    def __init__(self, facts: ModelFacts, request: KVCalcRequest, planner: MemoryPlanner):
        self.facts, self.request, self.planner = facts, request, planner
        self.cache: dict[tuple[int, int, str, str], KVRow] = {}
        self.weights: int | None = None

    def row(self, ctx: int, batch: int, pair: tuple[str, str], available: int | None) -> KVRow:
        key = (ctx, batch, *pair)
        if key not in self.cache:
            self.cache[key] = self._row(self.planner.plan(ctx, batch, *pair))
        return replace(self.cache[key], verdict=fit_verdict(self.cache[key].total_bytes, available))

    def _row(self, mem: ContextMemory) -> KVRow:
        spec, layout = self.facts.spec, self.facts.memory_layout
        if self.weights is None:
            self.weights = self.planner.weights_bytes
        types = (mem.type_k, mem.type_v)
        mha = mqa = mem.kv_bytes
        if _heads_factor(layout, spec):  # the same model with MHA (all heads) or MQA (one)
            mha = mem.kv_bytes * spec.n_heads // spec.n_kv_heads
            mqa = mem.kv_bytes // spec.n_kv_heads
        total = mem.buffers_bytes + (self.weights or 0)
        return KVRow(
            ctx=mem.ctx, batch=mem.batch, type_k=types[0], type_v=types[1], cells=mem.cells,
            k_bytes=mem.k_bytes, v_bytes=mem.v_bytes, kv_bytes=mem.kv_bytes,
            bytes_per_token=layout_bytes_per_token(layout, type_k=types[0], type_v=types[1]),
            mha_kv_bytes=mha, mqa_kv_bytes=mqa, compute_bytes=mem.compute_bytes,
            output_bytes=mem.output_bytes, weights_bytes=self.weights, total_bytes=total,
            verdict="unknown", swa_cells=mem.swa_cells,
            other_swa_kv_bytes=mem.other_swa_kv_bytes, source=mem.source, caches=mem.caches,
            estimate_kv_bytes=mem.estimate.total_bytes,
            estimate_compute_bytes=mem.estimate_compute_bytes,
        )  # fmt: skip


def _solve_budget(rows: _Rows, pair: tuple[str, str], batch: int) -> BudgetRow:
    """The largest multiple of 256 tokens per sequence whose whole plan fits the budget.

    The search stops at the trained context unless a RoPE method is given: a longer
    context "fits" but the model cannot use it.
    """
    request = rows.request
    assert request.budget_bytes is not None
    budget = request.budget_bytes
    spec = rows.facts.spec
    ceiling = _MAX_BUDGET_STEPS * _CELL_STEP
    if spec.n_ctx_train and request.rope is None:
        ceiling = spec.n_ctx_train

    def row(ctx: int) -> KVRow:
        return rows.row(ctx, batch, pair, None)

    def solved(r: KVRow, capped: bool = False) -> BudgetRow:
        return BudgetRow(pair[0], pair[1], batch, r.ctx, r.kv_bytes, r.total_bytes, capped)

    top = row(ceiling)
    if top.total_bytes <= budget:
        return solved(top, capped=True)
    if row(_CELL_STEP).total_bytes > budget:
        return BudgetRow(pair[0], pair[1], batch, 0, 0, 0)
    lo, hi = 1, -(-ceiling // _CELL_STEP)  # lo x 256 fits, hi x 256 (or the ceiling) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if row(mid * _CELL_STEP).total_bytes <= budget:
            lo = mid
        else:
            hi = mid
    return solved(row(lo * _CELL_STEP))


def _default_ctx(spec: ModelSpec) -> tuple[int, ...]:
    values = {512, 2048, 4096}
    if spec.n_ctx_train:
        values.add(spec.n_ctx_train)
    return tuple(sorted(values))


def kv_calc(request: KVCalcRequest, facts: ModelFacts | None = None) -> KVCalcResult:
    """Rows of KV, compute and total memory for every point of the sweep.

    With a GGUF at hand (and not ``request.estimate``) every row is llama.cpp's dry run
    of that context; nothing is allocated and no weight is read.
    """
    if request.ubatch <= 0:
        raise InvalidArgument(f"--ubatch {request.ubatch} must be at least 1")
    facts = facts or resolve_architecture(request.model, request.arch)
    spec, layout = facts.spec, facts.memory_layout
    notes: list[str] = []
    pairs = _checked_pairs(facts, request, notes)
    available = available_memory_bytes()
    out: list[KVRow] = []
    budget: list[BudgetRow] = []
    with MemoryPlanner(facts, request.plan_settings(), dry_run=not request.estimate) as planner:
        rows = _Rows(facts, request, planner)
        if request.budget_bytes is not None:
            for pair in pairs:
                for batch in request.batch:
                    solved = _solve_budget(rows, pair, batch)
                    budget.append(solved)
                    if solved.max_ctx:
                        out.append(rows.row(solved.max_ctx, batch, pair, available))
            weights = rows.weights if rows.weights is not None else facts.weights_bytes
            if budget and not any(b.max_ctx for b in budget) and weights:
                notes.append(f"the weights alone take {format_bytes(weights)}")
            ctx_values = tuple(sorted({r.ctx for r in out}))
        else:
            ctx_values = request.ctx or _default_ctx(spec)
            for pair in pairs:
                for batch in request.batch:
                    out.extend(rows.row(c, batch, pair, available) for c in ctx_values)
        weights = planner.weights_bytes
        if planner.repack_note:
            notes.append(planner.repack_note)
    warnings = _context_warnings(facts, ctx_values, request.rope, notes)
    if planner.dry_run_error:
        warnings.append(f"{planner.dry_run_error}; the figures are estimates")
    notes.extend(_fact_notes(facts, request, out))
    first = pairs[0] if pairs else ("f16", "f16")
    per_token = layout_bytes_per_token(layout, type_k=first[0], type_v=first[1])
    factor = spec.n_heads / spec.n_kv_heads if _heads_factor(layout, spec) else 1.0
    beyond = None
    if layout.has_swa:
        beyond = layout_bytes_per_token(layout, type_k=first[0], type_v=first[1], sliding=False)
    return KVCalcResult(
        facts=facts,
        request=replace(request, ctx=ctx_values),
        per_token_bytes=per_token,
        gqa_saving_factor=round(factor, 4),
        rows=tuple(out),
        budget=tuple(budget),
        available_bytes=available,
        warnings=tuple(warnings),
        notes=tuple(notes),
        weights_bytes=weights,
        plan_source=out[0].source if out else planner.source,
        per_token_beyond_window=beyond,
    )


def _checked_pairs(
    facts: ModelFacts, request: KVCalcRequest, notes: list[str]
) -> list[tuple[str, str]]:
    """The K/V type pairs to compute, each checked against what llama.cpp would refuse.

    Sweeping every type for --budget skips the refused ones (and says so); a pair the
    user named is an error.
    """
    pairs = _type_pairs(request)
    sweep_all = (
        request.budget_bytes is not None
        and not request.kv_types
        and request.type_k is None
        and request.type_v is None
    )
    if not sweep_all:
        for pair in pairs:
            _check_traps(facts, pair, request)
        return pairs
    usable = []
    for pair in pairs:
        try:
            _check_traps(facts, pair, request)
        except InvalidArgument as exc:
            notes.append(f"skipped {pair[0]}/{pair[1]}: {exc}")
            continue
        usable.append(pair)
    return usable


def _fact_notes(facts: ModelFacts, request: KVCalcRequest, rows: list[KVRow]) -> list[str]:
    """What the user should know about where the figures come from."""
    spec, layout = facts.spec, facts.memory_layout
    label = escape_untrusted(facts.label, 60)
    notes = []
    if spec.sliding_window and not layout.has_swa and request.budget_bytes is None:
        notes.append(
            f"{label} declares a {spec.sliding_window}-token sliding window that llama.cpp's "
            f"{escape_untrusted(spec.architecture, 30)} architecture does not apply: every "
            "layer keeps every cell of the context"
        )
    if layout.has_swa:
        used = "full-size (--swa-full)" if request.swa_full else "sized to the window"
        notes.append(
            f"{sum(a.swa for a in layout.attention)} of {len(layout.attention)} attention "
            f"layers slide over a {layout.n_swa}-token window: chat, bench and ppl keep their "
            f"cache {used}; 'other SWA' is the KV the other way"
        )
    if layout.unmodelled and any(r.source == ESTIMATE_SOURCE for r in rows):
        notes.append(f"the estimate leaves out {layout.unmodelled}")
    if rows and rows[0].source == ESTIMATE_SOURCE and not (facts.has_gguf and not request.estimate):
        why = "--estimate" if request.estimate and facts.has_gguf else "no GGUF at hand"
        notes.append(
            f"figures are estimates ({why}); a GGUF or hub file gives llama.cpp's own plan"
        )
    if rows and rows[0].weights_bytes is None:
        notes.append("weights unknown: totals count the KV cache and buffers only")
    if spec.vocab_size is None and rows and rows[0].compute_bytes is None:
        notes.append("vocabulary size unknown: no compute-buffer estimate")
    if facts.path is None and facts.source.split("+")[0] in ("preset", "catalog", "hub header"):
        notes.append(f"measure its speed here, no download: localllm bench {label} --synthetic")
    return notes


def _context_warnings(
    facts: ModelFacts, ctx_values: tuple[int, ...], rope: str | None, notes: list[str]
) -> list[str]:
    """Past the trained length without RoPE scaling, quality collapses: say so, and how."""
    spec = facts.spec
    if not ctx_values or not spec.n_ctx_train:
        return []
    longest = max(ctx_values)
    if rope is not None:
        plan = plan_rope(spec, longest, rope)
        notes.append(plan.description)
        return [plan.warning] if plan.warning else []
    if longest <= spec.n_ctx_train:
        return []
    return [
        f"context {longest} is past the trained {spec.n_ctx_train} tokens of "
        f"{escape_untrusted(facts.label, 60)} and no RoPE scaling is set: quality collapses "
        "past the trained length; pass --rope yarn (or linear, ntk) here and to chat/ppl "
        "to extend it"
    ]
