"""The core of ``localllm kv-calc``: what a model costs at a context, batch and KV type.

Architecture facts come from a GGUF header, the catalog, a preset or flags; the
arithmetic is :mod:`localllm.memory`'s, which follows llama.cpp's allocation. Nothing
here loads a model or imports llama_cpp, except :func:`verify_kv_calc`, which asks
llama.cpp itself (through :mod:`localllm.runtime.buffers`) and compares.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from localllm.errors import InvalidArgument
from localllm.gguf_meta import ModelSpec, escape_untrusted
from localllm.memory import (
    KV_TYPE_BLOCKS,
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
from localllm.presets import PRESETS, lookup_preset
from localllm.units import format_bytes

__all__ = [
    "ArchFlags",
    "BudgetRow",
    "KVCalcRequest",
    "KVCalcResult",
    "KVRow",
    "ModelFacts",
    "VerifyLine",
    "VerifyReport",
    "available_memory_bytes",
    "kv_calc",
    "parse_int_list",
    "parse_kv_types",
    "parse_size",
    "resolve_architecture",
    "verify_kv_calc",
]

KV_TYPES = tuple(KV_TYPE_BLOCKS)
MIB = 1024 * 1024
# A plan "fits" below this share of available RAM; up to all of it is "tight".
FIT_SHARE = 0.85
# Budget search ceiling: 2^16 x 256 cells, 16.7M tokens per sequence.
_MAX_BUDGET_STEPS = 1 << 16
_CELL_STEP = 256


# ---------------------------------------------------------------------------- parsing


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """``"512,2048,4k"`` -> (512, 2048, 4096); a k suffix means x1024."""
    values = []
    for part in text.split(","):
        item = part.strip().lower()
        m = re.fullmatch(r"(\d+)(k?)", item)
        if not m:
            raise InvalidArgument(
                f"{flag} {text!r}: {part.strip()!r} is not a count; "
                f"give whole numbers separated by commas, e.g. {flag} 512,2048,4096"
            )
        value = int(m[1]) * (1024 if m[2] else 1)
        if value <= 0:
            raise InvalidArgument(f"{flag} {text!r}: {value} must be at least 1")
        values.append(value)
    return tuple(dict.fromkeys(values))


def parse_kv_types(text: str, flag: str = "--kv-type") -> tuple[str, ...]:
    """``"f16,q8_0"`` -> ("f16", "q8_0"), each a KV cache type llama.cpp accepts."""
    types = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
    for t in types or (text,):
        if t not in KV_TYPE_BLOCKS:
            raise InvalidArgument(
                f"{flag} {t!r} is not a KV cache type; use one of {', '.join(KV_TYPES)}"
            )
    return types


_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}  # fmt: skip


def parse_size(text: str) -> int:
    """``"8GiB"`` -> 8589934592; GiB/MiB are binary, GB/MB decimal, a bare G means GiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m[2].lower() if m else ""
    if not m or unit not in _UNITS:
        raise InvalidArgument(f"--budget {text!r} is not a size; write e.g. 8GiB, 512MiB or 16GB")
    value = int(float(m[1]) * _UNITS[unit])
    if value <= 0:
        raise InvalidArgument(f"--budget {text!r} must be more than zero bytes")
    return value


# ------------------------------------------------------------------------ the request


@dataclass(frozen=True)
class ArchFlags:
    """Architecture given on the command line (each overrides the model's own fact)."""

    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None

    def given(self) -> bool:
        return any(v is not None for v in (self.layers, self.heads, self.kv_heads, self.head_dim))


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


# ---------------------------------------------------------------- where facts come from


@dataclass(frozen=True)
class ModelFacts:
    """A model's architecture and weights, and where each came from."""

    label: str  # what the user called it
    spec: ModelSpec
    source: str  # gguf | catalog | preset | flags, "+flags" when flags changed it
    weights_bytes: int | None
    weights_note: str
    path: str | None = None  # the local GGUF, when there is one (for --verify)


def _flags_spec(flags: ArchFlags) -> ModelSpec:
    missing = [
        f"--{n.replace('_', '-')}"
        for n in ("layers", "heads", "head_dim")
        if getattr(flags, n) is None
    ]
    if missing:
        raise InvalidArgument(
            f"without a model, kv-calc needs --layers, --heads and --head-dim "
            f"(--kv-heads defaults to --heads); missing {', '.join(missing)}"
        )
    assert flags.layers and flags.heads and flags.head_dim
    kv_heads = flags.kv_heads if flags.kv_heads is not None else flags.heads
    name = f"custom {flags.layers}L/{flags.heads}H/{kv_heads}KV/d{flags.head_dim}"
    return ModelSpec(
        name=name,
        architecture="llama",
        n_layers=flags.layers,
        n_heads=flags.heads,
        n_kv_heads=kv_heads,
        head_dim=flags.head_dim,
        n_embd=flags.heads * flags.head_dim,
        n_ctx_train=0,  # unknown: no trained-length check
        source="flags",
    )


def _apply_flags(spec: ModelSpec, flags: ArchFlags) -> ModelSpec:
    changes: dict[str, object] = {}
    if flags.layers is not None:
        changes["n_layers"] = flags.layers
    if flags.heads is not None:
        changes["n_heads"] = flags.heads
    if flags.kv_heads is not None:
        changes["n_kv_heads"] = flags.kv_heads
    if flags.head_dim is not None:
        changes["head_dim"] = flags.head_dim
        changes["head_dim_v"] = None
    if changes:
        changes["n_kv_heads_per_layer"] = None
    return replace(spec, **changes)  # type: ignore[arg-type]


def _check_arch(spec: ModelSpec) -> None:
    for label, value in (
        ("--layers", spec.n_layers),
        ("--heads", spec.n_heads),
        ("--kv-heads", spec.n_kv_heads),
        ("--head-dim", spec.head_dim),
    ):
        if value <= 0:
            raise InvalidArgument(f"{label} {value} must be at least 1")
    if spec.n_kv_heads > spec.n_heads or spec.n_heads % spec.n_kv_heads:
        raise InvalidArgument(
            f"--kv-heads {spec.n_kv_heads} must divide --heads {spec.n_heads} "
            f"(each KV head serves a whole group of query heads; 1 is MQA, {spec.n_heads} MHA)"
        )


def _preset_weights(name: str, spec: ModelSpec) -> tuple[int | None, str]:
    from localllm.store import load_catalog

    preset = PRESETS[name]
    catalog = load_catalog()
    if preset.catalog_twin:
        entry = catalog.lookup(preset.catalog_twin)
        quant = entry.quant(None) if entry else None
        if quant and quant.size_bytes:
            exact = "" if quant.size_exact else "about "
            return quant.size_bytes, f"{exact}the {quant.quant} file of {preset.catalog_twin}"
    # No catalog twin: the parameter count at the bits per weight of the nearest twin.
    ref = PRESETS["llama-2-70b"]
    ref_entry = catalog.lookup(ref.catalog_twin or "")
    ref_quant = ref_entry.quant(None) if ref_entry else None
    if ref_quant is None or not ref_quant.size_bytes or not ref.spec.n_params or not spec.n_params:
        return None, "unknown"
    bits = ref_quant.size_bytes * 8 / ref.spec.n_params
    weights = round(spec.n_params * bits / 8)
    return weights, (
        f"estimated: {spec.n_params / 1e9:.2f}B params at {bits:.2f} bits/weight "
        f"({ref.catalog_twin} {ref_quant.quant})"
    )


def resolve_architecture(ref: str | None, flags: ArchFlags | None = None) -> ModelFacts:
    """Facts for ``ref`` (preset, catalog alias, GGUF path, hub ref) and any flag overrides."""
    flags = flags or ArchFlags()
    if ref is None and flags.given():
        spec = _flags_spec(flags)
        _check_arch(spec)
        return ModelFacts(spec.name, spec, "flags", None, "not given (architecture from flags)")
    preset = lookup_preset(ref)
    if preset is not None:
        spec = preset.spec
        weights, note = _preset_weights(spec.name, spec)
        facts = ModelFacts(spec.name, spec, "preset", weights, note)
    else:
        from localllm.resolver import model_spec, resolve_model

        model = resolve_model(ref)
        spec = model_spec(model)
        label = model.alias or (model.path.name if model.path else model.ref)
        if spec.source == "gguf":
            note = "GGUF tensor table"
        else:
            note = f"{model.quant or 'default'} file size from the {spec.source}"
        facts = ModelFacts(
            label,
            spec,
            spec.source,
            spec.weights_bytes,
            note if spec.weights_bytes is not None else "unknown",
            path=str(model.path) if model.present and model.path else None,
        )
    if flags.given():
        spec = _apply_flags(facts.spec, flags)
        facts = replace(facts, spec=spec, source=f"{facts.source}+flags")
    _check_arch(facts.spec)
    return facts


# -------------------------------------------------------------------------- the rows


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
    compute_phase: str | None
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


def available_memory_bytes() -> int | None:
    """RAM available to a new process: MemAvailable on Linux, free pages elsewhere."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


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
        bases = KV_TYPES
    else:
        bases = ("f16",)
    pairs = [(request.type_k or t, request.type_v or t) for t in bases]
    return list(dict.fromkeys(pairs))


def _check_traps(spec: ModelSpec, pair: tuple[str, str], request: KVCalcRequest) -> None:
    """The settings llama.cpp would refuse, as the one-line error a load would end in."""
    from localllm.runtime import RuntimeOptions  # cheap: llama_cpp is not imported

    type_k, type_v = pair
    # The same check (and message) chat and every other load runs first.
    RuntimeOptions(
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
        compute_phase=compute.phase if compute else None,
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
    pairs = _type_pairs(request)
    warnings: list[str] = []
    notes: list[str] = []

    budget_mode = request.budget_bytes is not None
    if budget_mode and not request.kv_types and request.type_k is None and request.type_v is None:
        # Sweeping every type: skip the ones llama.cpp would refuse, and say so.
        usable = []
        for pair in pairs:
            try:
                _check_traps(spec, pair, request)
            except InvalidArgument as exc:
                notes.append(f"skipped {pair[0]}/{pair[1]}: {exc}")
                continue
            usable.append(pair)
        pairs = usable
    else:
        for pair in pairs:
            _check_traps(spec, pair, request)

    available = available_memory_bytes()
    rows: list[KVRow] = []
    budget: list[BudgetRow] = []
    if budget_mode:
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
                for ctx in ctx_values:
                    rows.append(_row(facts, ctx, batch, pair, request, available))

    warnings.extend(_context_warnings(facts, ctx_values, request.rope, notes))
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


def _context_warnings(
    facts: ModelFacts, ctx_values: tuple[int, ...], rope: str | None, notes: list[str]
) -> list[str]:
    """Past the trained length without RoPE scaling, quality collapses: say so, and how."""
    spec = facts.spec
    if not ctx_values or not spec.n_ctx_train:
        return []
    longest = max(ctx_values)
    if rope is not None:
        from localllm.rope import plan_rope

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


# ---------------------------------------------------------------------------- --verify


@dataclass(frozen=True)
class VerifyLine:
    """One quantity of one row: our estimate beside llama.cpp's own report."""

    ctx: int
    batch: int
    type_k: str
    type_v: str
    quantity: str  # cells | K | V | KV | compute | output | weights
    estimate: int | None
    actual: int | None
    exact: bool  # cells: equal; MiB quantities: equal at llama.cpp's 0.01 MiB print
    error: str | None = None

    @property
    def difference(self) -> int | None:
        if self.estimate is None or self.actual is None:
            return None
        return self.estimate - self.actual

    @property
    def relative(self) -> float | None:
        if self.difference is None or not self.actual:
            return None
        return self.difference / self.actual


@dataclass(frozen=True)
class VerifyReport:
    path: str
    lines: tuple[VerifyLine, ...]

    def as_json(self) -> list[dict[str, object]]:
        return [
            {
                "ctx": v.ctx,
                "batch": v.batch,
                "type_k": v.type_k,
                "type_v": v.type_v,
                "quantity": v.quantity,
                "estimate": v.estimate,
                "actual": v.actual,
                "difference": v.difference,
                "exact": v.exact,
                "error": v.error,
            }
            for v in self.lines
        ]


def mib_text(n: int) -> str:
    """Bytes as llama.cpp prints buffer sizes: %.2f MiB."""
    return f"{n / MIB:.2f}"


def verify_kv_calc(result: KVCalcResult) -> VerifyReport:
    """Create each row's context in llama.cpp (one model load) and compare its buffers."""
    facts = result.facts
    if facts.path is None:
        raise InvalidArgument(
            f"--verify loads the model through llama.cpp, but there is no GGUF file of "
            f"{escape_untrusted(facts.label, 60)} here (its facts come from the "
            f"{facts.source.split('+')[0]}); give a downloaded model or a .gguf path"
        )
    if "+flags" in facts.source:
        raise InvalidArgument(
            "--verify compares against the real file: drop --layers/--heads/--kv-heads/--head-dim"
        )
    from localllm.runtime.buffers import ContextSettings, measure_buffers

    request = result.request
    settings = [
        ContextSettings(
            n_ctx=r.ctx,
            n_seq=r.batch,
            n_batch=request.ubatch,
            n_ubatch=request.ubatch,
            type_k=r.type_k,
            type_v=r.type_v,
            flash_attn=request.flash_attn,
        )
        for r in result.rows
    ]
    measured = measure_buffers(Path(facts.path), settings)
    lines: list[VerifyLine] = []
    first = result.rows[0] if result.rows else None
    if first is not None:
        est, act = facts.weights_bytes, measured.weights_bytes
        lines.append(
            VerifyLine(first.ctx, first.batch, first.type_k, first.type_v, "weights", est, act,
                       est is not None and act is not None and mib_text(est) == mib_text(act))
        )  # fmt: skip
    for row, got in zip(result.rows, measured.contexts, strict=True):
        key = (row.ctx, row.batch, row.type_k, row.type_v)
        if got.buffers is None:
            lines.append(VerifyLine(*key, "KV", row.kv_bytes, None, False, got.error))
            continue
        b = got.buffers
        lines.append(VerifyLine(*key, "cells", row.cells, got.n_ctx, row.cells == got.n_ctx))
        for name, est, act in (
            ("K", row.k_bytes, b.k_bytes),
            ("V", row.v_bytes, b.v_bytes),
            ("KV", row.kv_bytes, b.kv_bytes),
            ("compute", row.compute_bytes, b.compute_bytes),
            ("output", row.output_bytes, b.output_bytes),
        ):
            exact = est is not None and act is not None and mib_text(est) == mib_text(act)
            lines.append(VerifyLine(*key, name, est, act, exact))
    return VerifyReport(facts.path, tuple(lines))
