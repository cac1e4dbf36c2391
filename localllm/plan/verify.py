"""``kv-calc --verify``: each row's context created in llama.cpp (weights loaded, every
buffer allocated), its buffers beside the plan's (llama.cpp's dry run, or the estimate)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from localllm.errors import InvalidArgument
from localllm.plan.kvcalc import KVCalcResult
from localllm.text import escape_untrusted

__all__ = ["VerifyLine", "VerifyReport", "mib_text", "verify_kv_calc"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class VerifyLine:
    """One quantity of one row: our estimate beside llama.cpp's own report."""

    ctx: int
    batch: int
    type_k: str
    type_v: str
    quantity: str  # cells | K | V | KV | compute | output | weights
    estimate: int | None  # the plan's figure (the dry run's when there is a GGUF)
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
    notes: tuple[str, ...] = ()

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


def verify_kv_calc(result: KVCalcResult, repack: bool | None = None) -> VerifyReport:
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
    from localllm.runtime.library import choose_repack

    request = result.request
    settings = [
        ContextSettings(
            n_ctx=r.ctx,
            n_seq=r.batch,
            n_batch=request.n_batch or request.ubatch,
            n_ubatch=request.ubatch,
            type_k=r.type_k,
            type_v=r.type_v,
            flash_attn=request.flash_attn,
            swa_full=request.swa_full,
        )
        for r in result.rows
    ]
    choice = choose_repack(repack if repack is not None else request.repack)
    measured = measure_buffers(Path(facts.path), settings, repack=choice.repack)
    lines: list[VerifyLine] = []
    first = result.rows[0] if result.rows else None
    if first is not None:
        est, act = result.weights_bytes, measured.weights_bytes
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
    return VerifyReport(facts.path, tuple(lines), (choice.note,) if choice.note else ())
