"""The memory check chat, bench and ppl run before loading: kv-calc's plan against free RAM.

The plan is llama.cpp's dry run of the file with the settings the command loads with
(:mod:`localllm.plan.context_plan`). A plan that does not fit is refused in one line, before
llama.cpp is asked to allocate: what it needs (weights + KV + compute), what is
available, and the largest ``--ctx`` that fits, per KV type where a quantized cache would
help. kv-calc's verdict and this refusal come from the same rows, so they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from localllm.errors import InsufficientMemory, InvalidArgument
from localllm.gguf.spec import ModelSpec
from localllm.plan.facts import ModelFacts, file_facts
from localllm.plan.kvcalc import BudgetRow, KVCalcRequest, KVRow, kv_calc
from localllm.plan.need import LoadNeed

__all__ = ["LoadPlan", "check_load_fits", "plan_load"]

_GIB = 1 << 30


@dataclass(frozen=True)
class LoadPlan:
    """What one load will take, by kv-calc's arithmetic, against what is available."""

    label: str
    spec: ModelSpec
    request: KVCalcRequest
    row: KVRow
    available_bytes: int | None
    facts: ModelFacts | None = None

    @property
    def fits(self) -> bool:
        return self.row.verdict != "too big"

    @property
    def source(self) -> str:
        """Where the figures come from: llama.cpp's dry run, or the estimate."""
        return self.row.source

    @property
    def need(self) -> LoadNeed:
        """What the memory check keeps of this plan."""
        return LoadNeed(self.label, self.row.total_bytes, self.row.kv_bytes, self.available_bytes)


def plan_load(
    label: str,
    spec: ModelSpec,
    *,
    n_ctx: int,
    n_seq: int = 1,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: bool = True,
    ubatch: int = 512,
    rope: str | None = None,
    swa_full: bool = False,
    n_batch: int | None = None,
    repack: bool | None = None,
) -> LoadPlan:
    """The kv-calc row for the settings a command will load with (llama.cpp's dry run)."""
    request = KVCalcRequest(
        ctx=(n_ctx,),
        batch=(n_seq,),
        type_k=type_k,
        type_v=type_v,
        flash_attn=flash_attn,
        ubatch=ubatch,
        rope=rope,
        swa_full=swa_full,
        n_batch=n_batch,
        repack=repack,
    )
    facts = file_facts(label, spec)
    result = kv_calc(request, facts)
    return LoadPlan(label, spec, request, result.rows[0], result.available_bytes, facts)


def _largest_contexts(plan: LoadPlan) -> list[BudgetRow]:
    """Per KV type (this one, and the quantized ones flash attention allows), the largest
    context whose whole plan fits in what is available."""
    row, asked = plan.row, plan.request
    pairs = [(row.type_k, row.type_v)]
    if asked.flash_attn and row.type_k == row.type_v:
        pairs += [(t, t) for t in ("q8_0", "q4_0") if t != row.type_k]
    solved = []
    for type_k, type_v in pairs:
        request = replace(
            asked, ctx=(), type_k=type_k, type_v=type_v, budget_bytes=plan.available_bytes
        )
        try:
            solved += kv_calc(request, plan.facts or file_facts(plan.label, plan.spec)).budget
        except InvalidArgument:  # a quantized type this model's head size cannot take
            continue
    return solved


def check_load_fits(plan: LoadPlan) -> None:
    """Refuse a plan that does not fit, in one line that says what would."""
    if plan.fits or plan.available_bytes is None:
        return
    row = plan.row
    parts = [f"weights {(row.weights_bytes or 0) / _GIB:.2f}", f"KV {row.kv_bytes / _GIB:.2f}"]
    if row.compute_bytes:
        parts.append(f"compute {(row.compute_bytes + (row.output_bytes or 0)) / _GIB:.2f}")
    fitting = [b for b in _largest_contexts(plan) if b.max_ctx]
    if fitting:
        best = ", ".join(f"{b.max_ctx} with {b.type_k}" for b in fitting)
        way_out = f"the largest --ctx that fits: {best}"
    else:
        way_out = "no context fits (the weights alone take too much): try a smaller quant"
    raise InsufficientMemory(
        f"{plan.label} at --ctx {row.ctx} needs {row.total_bytes / _GIB:.2f} GiB "
        f"({' + '.join(parts)} GiB) but {plan.available_bytes / _GIB:.2f} GiB is available; "
        f"{way_out}; --no-memory-check loads anyway"
    )
