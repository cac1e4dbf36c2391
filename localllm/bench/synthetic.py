"""``bench --synthetic``: a model's speed on this machine from its tensor table alone.

llama.cpp's speed depends on the tensor table (shapes and types) and the settings, not on
the weight values. So a GGUF with the model's tensor table and random weights, written
into the store's disk and deleted afterwards, benchmarks at the model's speed before a
byte of it is downloaded. The table comes from a local GGUF (or header-only file), a hub
file's header preview (a catalog alias with a quant, org/repo:QUANT, hf://...), or a
preset with llama.cpp's own quantizer choosing each tensor's type (``--quant``).
``--quant Q4_K_M,Q5_K_M`` with a preset or a hub repo named without a quant measures each
in turn (one stand-in at a time on disk), so speed can join kv-calc's choice of a file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from localllm.bench.record import BenchResult
from localllm.bench.request import BenchRequest
from localllm.bench.run import BenchEvent, BenchPlan, BenchRun
from localllm.errors import InvalidArgument
from localllm.gguf.spec import ModelSpec, read_model_spec_from_prefix
from localllm.plan.preload import check_load_fits, plan_load
from localllm.plan.rope import plan_rope
from localllm.plan.synthetic_gguf import synthetic_gguf
from localllm.plan.tensor_table import tensor_table_of
from localllm.store.hub import repo_to_choose_in
from localllm.store.model_store import ModelStore
from localllm.store.presets import lookup_preset

__all__ = ["SyntheticModel", "quant_requests", "run_synthetic"]


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


def quant_requests(request: BenchRequest) -> list[BenchRequest]:
    """One request per ``--quant`` (comma-separated): a preset keeps its quant, a hub repo
    named without one becomes ``org/repo:QUANT``."""
    if request.quant is None:
        return [request]
    quants = [q.strip() for q in request.quant.split(",") if q.strip()]
    if not quants:
        raise InvalidArgument(f"--quant {request.quant!r} names no quant; e.g. Q4_K_M,Q5_K_M")
    if len(quants) > 1 and request.keep_synthetic is not None:
        raise InvalidArgument("--keep-synthetic keeps one file; give one --quant with it")
    if lookup_preset(request.model) is not None:
        return [replace(request, quant=q) for q in quants]
    repo = repo_to_choose_in(request.model) if request.model else None
    if repo is None:
        raise InvalidArgument(
            "--quant picks a preset's quantization, or the files of a hub repo named without "
            f"one (org/repo --quant Q4_K_M,Q5_K_M); {request.model or 'the default model'} "
            "names one file already"
        )
    return [replace(request, model=f"{repo}:{q.upper()}", quant=None) for q in quants]


def run_synthetic(
    request: BenchRequest, run: Callable[[BenchRequest], Iterator[BenchEvent]]
) -> Iterator[BenchEvent]:
    """Benchmark the stand-in exactly as ``bench`` does; results say the weights were random.

    With several quants, each stand-in is written, measured and deleted in turn.
    """
    for one in quant_requests(request):
        yield from _run_one(one, run)


def _run_one(
    request: BenchRequest, run: Callable[[BenchRequest], Iterator[BenchEvent]]
) -> Iterator[BenchEvent]:
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
