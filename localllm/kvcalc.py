"""The core of ``localllm kv-calc``: what a model costs at a context, batch and KV type.

Architecture facts come from :mod:`localllm.model_facts`; the arithmetic is
:mod:`localllm.memory`'s, which follows llama.cpp's allocation. Nothing here loads a model
or imports llama_cpp; :mod:`localllm.kvverify` asks llama.cpp itself and compares.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from localllm.errors import InvalidArgument
from localllm.ggml_types import KV_CACHE_TYPES
from localllm.gguf_meta import ModelSpec
from localllm.machine import available_memory_bytes
from localllm.memory import (
    KVCacheEstimate,
    check_kv_types,
    compute_buffer_bytes,
    context_shape,
    kv_bytes_per_token,
    kv_cache_bytes,
    output_buffer_bytes,
    swa_kv_cells,
    with_kv_heads,
)
from localllm.model_facts import ArchFlags, ModelFacts, resolve_architecture
from localllm.rope import plan_rope
from localllm.runtime.params import LoadOptions
from localllm.text import escape_untrusted, format_bytes

__all__ = [
    "FIT_SHARE",
    "BudgetRow",
    "KVCalcRequest",
    "KVCalcResult",
    "KVRow",
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
    swa_cells: int | None = None  # the sliding-window bound, for models that declare one
    swa_kv_bytes: int | None = None

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
            "verdict": self.verdict,
        }
        if self.swa_cells is not None:
            data["swa_cells"] = self.swa_cells
            data["swa_kv_bytes"] = self.swa_kv_bytes
        return data


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

    def as_json(self) -> dict[str, object]:
        spec = self.facts.spec
        data: dict[str, object] = {
            "model": self.facts.label,
            "per_token_bytes": self.per_token_bytes,
            "gqa_saving_factor": self.gqa_saving_factor,
            "weights_bytes": self.facts.weights_bytes,
            "rows": [r.as_json() for r in self.rows],
            "source": self.facts.source,
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
        if self.request.budget_bytes is not None:
            data["budget_bytes"] = self.request.budget_bytes
            data["budget"] = [b.as_json() for b in self.budget]
        return data


def _verdict(total: int, available: int | None) -> str:
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


def _check_traps(spec: ModelSpec, pair: tuple[str, str], request: KVCalcRequest) -> None:
    """The settings llama.cpp would refuse, as the one-line error a load would end in."""
    type_k, type_v = pair
    # The same check (and message) chat and every other load runs first.
    LoadOptions(
        n_ctx=max(request.ctx or (1,)),
        n_ubatch=request.ubatch,
        type_k=type_k,
        type_v=type_v,
        flash_attn=request.flash_attn,
    ).validate()
    check_kv_types(spec, type_k, type_v)


def _row(
    facts: ModelFacts, ctx: int, batch: int, pair: tuple[str, str], request: KVCalcRequest,
    available: int | None,
) -> KVRow:  # fmt: skip
    spec = facts.spec
    type_k, type_v = pair
    kv = kv_cache_bytes(spec, ctx, type_k=type_k, type_v=type_v, n_seq=batch)
    mha = _kv_with_heads(spec, spec.n_heads, ctx, batch, pair)
    mqa = _kv_with_heads(spec, 1, ctx, batch, pair)
    shape = context_shape(ctx, batch, n_ubatch=request.ubatch, n_batch=request.ubatch)
    compute = compute_buffer_bytes(spec, shape, flash_attn=request.flash_attn)
    output = output_buffer_bytes(spec, batch)
    total = kv.total_bytes + sum(
        x for x in (facts.weights_bytes, compute.bytes if compute else None, output) if x
    )
    swa_cells = swa_bytes = None
    if spec.sliding_window:
        swa_cells = swa_kv_cells(ctx, batch, spec.sliding_window, shape.n_ubatch)
        swa_bytes = kv.total_bytes // kv.cells * swa_cells
    return KVRow(
        ctx=ctx,
        batch=batch,
        type_k=type_k,
        type_v=type_v,
        cells=kv.cells,
        k_bytes=kv.k_bytes,
        v_bytes=kv.v_bytes,
        kv_bytes=kv.total_bytes,
        bytes_per_token=kv_bytes_per_token(spec, type_k=type_k, type_v=type_v),
        mha_kv_bytes=mha,
        mqa_kv_bytes=mqa,
        compute_bytes=compute.bytes if compute else None,
        output_bytes=output,
        weights_bytes=facts.weights_bytes,
        total_bytes=total,
        verdict=_verdict(total, available),
        swa_cells=swa_cells,
        swa_kv_bytes=swa_bytes,
    )


def _kv_with_heads(spec: ModelSpec, heads: int, ctx: int, batch: int, pair: tuple[str, str]) -> int:
    estimate: KVCacheEstimate = kv_cache_bytes(
        with_kv_heads(spec, heads), ctx, type_k=pair[0], type_v=pair[1], n_seq=batch
    )
    return estimate.total_bytes


def _solve_budget(
    facts: ModelFacts, pair: tuple[str, str], batch: int, request: KVCalcRequest
) -> BudgetRow:
    """The largest multiple of 256 tokens per sequence whose whole plan fits the budget.

    The search stops at the trained context unless a RoPE method is given: a longer
    context "fits" but the model cannot use it.
    """
    assert request.budget_bytes is not None
    budget = request.budget_bytes
    spec = facts.spec
    ceiling = _MAX_BUDGET_STEPS * _CELL_STEP
    if spec.n_ctx_train and request.rope is None:
        ceiling = spec.n_ctx_train

    def row(ctx: int) -> KVRow:
        return _row(facts, ctx, batch, pair, request, None)

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
    """Rows of KV, compute and total memory for every point of the sweep (nothing loaded)."""
    if request.ubatch <= 0:
        raise InvalidArgument(f"--ubatch {request.ubatch} must be at least 1")
    facts = facts or resolve_architecture(request.model, request.arch)
    spec = facts.spec
    notes: list[str] = []
    pairs = _checked_pairs(spec, request, notes)
    available = available_memory_bytes()
    rows: list[KVRow] = []
    budget: list[BudgetRow] = []
    if request.budget_bytes is not None:
        for pair in pairs:
            for batch in request.batch:
                solved = _solve_budget(facts, pair, batch, request)
                budget.append(solved)
                if solved.max_ctx:
                    rows.append(_row(facts, solved.max_ctx, batch, pair, request, available))
        if budget and not any(b.max_ctx for b in budget) and facts.weights_bytes:
            notes.append(f"the weights alone take {format_bytes(facts.weights_bytes)}")
        ctx_values = tuple(sorted({r.ctx for r in rows}))
    else:
        ctx_values = request.ctx or _default_ctx(spec)
        for pair in pairs:
            for batch in request.batch:
                rows.extend(_row(facts, c, batch, pair, request, available) for c in ctx_values)
    warnings = _context_warnings(facts, ctx_values, request.rope, notes)
    notes.extend(_fact_notes(facts, budget_mode=request.budget_bytes is not None))
    first = pairs[0] if pairs else ("f16", "f16")
    per_token = kv_bytes_per_token(spec, type_k=first[0], type_v=first[1])
    mha_per_token = kv_bytes_per_token(
        with_kv_heads(spec, spec.n_heads), type_k=first[0], type_v=first[1]
    )
    return KVCalcResult(
        facts=facts,
        request=replace(request, ctx=ctx_values),
        per_token_bytes=per_token,
        gqa_saving_factor=round(mha_per_token / per_token, 4),
        rows=tuple(rows),
        budget=tuple(budget),
        available_bytes=available,
        warnings=tuple(warnings),
        notes=tuple(notes),
    )


def _checked_pairs(
    spec: ModelSpec, request: KVCalcRequest, notes: list[str]
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
            _check_traps(spec, pair, request)
        return pairs
    usable = []
    for pair in pairs:
        try:
            _check_traps(spec, pair, request)
        except InvalidArgument as exc:
            notes.append(f"skipped {pair[0]}/{pair[1]}: {exc}")
            continue
        usable.append(pair)
    return usable


def _fact_notes(facts: ModelFacts, *, budget_mode: bool) -> list[str]:
    """What the user should know about where the figures come from."""
    spec = facts.spec
    notes = []
    if spec.sliding_window and spec.architecture == "llama" and not budget_mode:
        notes.append(
            f"{escape_untrusted(facts.label, 60)} declares a {spec.sliding_window}-token "
            "sliding window, but llama.cpp's llama architecture does not apply it: it "
            "allocates every cell of the context; "
            "the SWA columns show what a sliding-window cache would hold"
        )
    if facts.weights_bytes is None:
        notes.append("weights unknown: totals count the KV cache and buffers only")
    if spec.vocab_size is None:
        notes.append("vocabulary size unknown: no compute-buffer estimate")
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
