"""``bench --synthetic``: a model's speed on this machine from its tensor table alone.

llama.cpp's speed depends on the tensor table (shapes and types) and the settings, not on
the weight values. So a GGUF with the model's tensor table and random weights, written
into the store's disk and deleted afterwards, benchmarks at the model's speed before a
byte of it is downloaded. The table comes from a local GGUF (or header-only file), a hub
file's header preview (a catalog alias with a quant, org/repo:QUANT, hf://...), or a
preset with llama.cpp's own quantizer choosing each tensor's type (``--quant``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from localllm.bench.record import BenchResult
from localllm.bench.request import BenchRequest
from localllm.bench.run import BenchEvent, BenchPlan, BenchRun
from localllm.gguf.spec import ModelSpec, read_model_spec_from_prefix
from localllm.plan.preload import check_load_fits, plan_load
from localllm.plan.rope import plan_rope
from localllm.plan.synthetic_gguf import synthetic_gguf
from localllm.plan.tensor_table import tensor_table_of
from localllm.store.model_store import ModelStore

__all__ = ["SyntheticModel", "run_synthetic"]


@dataclass(frozen=True)
class SyntheticModel:
    """The written stand-in: where it is, its facts, and where its tensor table came from."""

    path: Path
    spec: ModelSpec
    label: str
    source: str


def _check_memory(request: BenchRequest, spec: ModelSpec, label: str) -> None:
    """Refuse before writing gigabytes: every test's context must fit (kv-calc's plan)."""
    for test in request.tests():
        rope = plan_rope(spec, test.n_ctx, request.rope)
        memory = plan_load(
            label, spec, n_ctx=test.n_ctx, type_k=test.type_k, type_v=test.type_v,
            flash_attn=test.flash_attn != "off", ubatch=min(test.n_ubatch, test.n_batch),
            rope=rope.method,
        )  # fmt: skip
        check_load_fits(memory)


@contextmanager
def synthetic_model(request: BenchRequest) -> Iterator[SyntheticModel]:
    """Write the stand-in into the store's disk (memory and disk checked first); it is
    deleted whatever ends the block, kept only at ``request.keep_synthetic`` on success."""
    store = ModelStore()
    workdir = store.temp_dir()
    table, label = tensor_table_of(request.model, request.quant, workdir)
    # The facts of a file not yet written: no path (nothing may be read from disk for them).
    spec = replace(read_model_spec_from_prefix(table.header, table.file_bytes, label), path=None)
    if request.memory_check:
        _check_memory(request, spec, label)
    with synthetic_gguf(table, workdir, keep=request.keep_synthetic) as made:
        yield SyntheticModel(made.path, spec, label, table.source)


def run_synthetic(
    request: BenchRequest, run: Callable[[BenchRequest], Iterator[BenchEvent]]
) -> Iterator[BenchEvent]:
    """Benchmark the stand-in exactly as ``bench`` does; results say the weights were random."""
    with synthetic_model(request) as model:
        inner = replace(request, model=str(model.path), synthetic=False, hash_model=False)
        for event in run(inner):
            if isinstance(event, BenchPlan):
                note = f"synthetic weights: the tensor table of {model.source}, random values"
                event = replace(event, notes=(*event.notes, note))
            elif isinstance(event, BenchResult):
                event = _mark(event, model)
            elif isinstance(event, BenchRun):
                event = replace(event, results=tuple(_mark(r, model) for r in event.results))
            yield event


def _mark(result: BenchResult, model: SyntheticModel) -> BenchResult:
    if result.synthetic is not None:
        return result
    return replace(result, synthetic=model.source, model_filename=model.label)
