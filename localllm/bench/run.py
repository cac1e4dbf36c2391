"""Running ``localllm bench``: one model load, a context per test, llama-bench's loops.

The method is llama-bench's (tools/llama-bench/llama-bench.cpp), so a row here compares
with a row there: random tokens, one warm-up, ``r`` repetitions from a cleared KV cache;
``pp`` times a batched decode of the prompt in ``n_batch`` chunks, ``tg`` times ``n``
single-token decodes with no sampling. The loops live in
:mod:`localllm.runtime.llama_bench`; the roofline of ``tg`` is computed here.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from localllm.bench.record import BenchResult, Environment, MemoryFigures, RpcSplit
from localllm.bench.request import BenchRequest, BenchTest
from localllm.errors import InvalidArgument
from localllm.fileio import cached_sha256
from localllm.flags import threads_warning
from localllm.gguf.ggml_types import tensor_bytes
from localllm.gguf.header import read_header
from localllm.gguf.spec import ModelSpec, read_model_spec
from localllm.machine import (
    Bandwidth,
    cpu_model,
    memory_bandwidth,
    online_cpus,
    peak_rss_bytes,
    physical_cores,
    raise_bandwidth,
    ram_bytes,
)
from localllm.plan.memory import kv_bytes_per_token
from localllm.plan.preload import LoadPlan, check_load_fits, plan_load
from localllm.plan.rope import RopePlan, plan_rope
from localllm.plan.split import check_split_load
from localllm.runtime.devices import split_applies
from localllm.runtime.library import LlamaBuild, choose_repack, llama_build
from localllm.runtime.llama_bench import BenchModel, ContextConfig
from localllm.runtime.params import LoadOptions
from localllm.store.resolver import require_local_file, resolve_model

__all__ = [
    "BenchEvent",
    "BenchPlan",
    "BenchProgress",
    "BenchRun",
    "run_bench",
    "weights_read_per_token",
]


def weights_read_per_token(path: Path, model_size: int) -> int:
    """Weight bytes one generated token reads: all of them, except the token embedding
    table when a separate output matrix exists (then only one embedding row is read)."""
    names = {t.name: t for t in read_header(path).tensors}
    embd = names.get("token_embd.weight")
    if embd is None or "output.weight" not in names:
        return model_size  # tied embeddings: the output matmul reads the whole table
    return max(model_size - tensor_bytes(embd.type_id, embd.n_elements), 0)


def _tg_bytes_per_token(test: BenchTest, weights_read: int, spec: ModelSpec | None) -> int | None:
    """Bytes a tg step reads on average: weights plus the K and V of the cells attended."""
    if test.n_prompt > 0 or test.n_gen == 0:
        return None  # only tg rows time generation alone
    kv = 0
    if spec is not None:
        try:
            per_token = kv_bytes_per_token(spec, type_k=test.type_k, type_v=test.type_v)
        except InvalidArgument:
            per_token = 0
        # Step i attends to n_depth + i + 1 cells; the mean over n_gen steps:
        kv = round(per_token * (test.n_depth + (test.n_gen + 1) / 2))
    return weights_read + kv


@dataclass(frozen=True)
class BenchPlan:
    """The first event of a run: what will be measured, and what to tell the user first."""

    model_path: Path
    tests: tuple[BenchTest, ...]
    repetitions: int
    warmup: bool
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class BenchProgress:
    """Where a run is: ``stage`` is bandwidth, hashing, loading, warmup, depth or rep."""

    stage: str
    index: int = 0  # 1-based test number, 0 before the tests
    total: int = 0
    test: str = ""
    rep: int = 0
    reps: int = 0


@dataclass(frozen=True)
class BenchRun:
    """The last event: every result, and the machine they were measured on."""

    results: tuple[BenchResult, ...]
    environment: Environment
    bandwidth: Bandwidth | None


BenchEvent = BenchPlan | BenchProgress | BenchResult | BenchRun


def run_bench(request: BenchRequest, *, swa_full: bool = False) -> Iterator[BenchEvent]:
    """Run a benchmark: yields the plan, progress, one result per test, then the run.

    Everything is checked before anything heavy happens; the model is loaded once and
    each test gets its own context, as in llama-bench. ``swa_full`` keeps full-size
    sliding-window caches (llama-bench sizes them to the window).
    """
    tests = request.tests()
    resolved = resolve_model(request.model)
    path = require_local_file(resolved)
    spec = read_model_spec(path)
    plan, ropes = _plan(request, tests, path, spec)
    memory = _memory_plans(resolved.alias or path.name, spec, tests, request, swa_full)
    if request.memory_check and split_applies(_split_options(request, max(memory))):
        for shape in sorted(memory, reverse=True):  # each host's share, on its own memory
            check_split_load(resolved.alias or path.name, path, _split_options(request, shape))
    elif request.memory_check:
        for shape in sorted(memory, reverse=True):
            check_load_fits(memory[shape])
    repack = choose_repack(request.repack)
    if repack.note:
        plan = replace(plan, notes=(*plan.notes, repack.note))
    yield plan
    yield BenchProgress("bandwidth")
    bandwidth = memory_bandwidth(refresh=request.refresh_bandwidth)
    yield BenchProgress("loading")
    results: list[BenchResult] = []
    with BenchModel(
        path, repack.repack, rpc=request.rpc, n_gpu_layers=request.n_gpu_layers,
        tensor_split=request.tensor_split,
    ) as model:  # fmt: skip
        split = _split(request, model)
        yield BenchProgress("hashing")
        environment = _environment(llama_build(), path, hash_model=request.hash_model)
        measured = _Measured(bandwidth, environment, weights_read_per_token(path, model.size_bytes))
        for index, test in enumerate(tests, start=1):
            where = (index, len(tests))
            result = yield from _run_test(
                model, request, test, where, ropes[test.n_ctx], spec, measured, swa_full
            )
            result = replace(
                result, swa_full=swa_full, plan=_figures(memory[_shape(test)]), split=split
            )
            if (result.roofline_fraction or 0) > 1:
                # llama.cpp read faster than the probe: its rate is the new upper bound.
                bandwidth = _raised_bandwidth(result)
                measured = replace(measured, bandwidth=bandwidth)
                result = replace(result, bandwidth=bandwidth)
            results.append(result)
            yield result
    yield BenchRun(tuple(results), environment, bandwidth)


def _raised_bandwidth(result: BenchResult) -> Bandwidth:
    assert result.tg_bytes_per_token is not None
    rate = result.avg_ts * result.tg_bytes_per_token
    return raise_bandwidth(
        rate, f"llama.cpp's own tg read rate ({result.test.n_gen} tokens, faster than the probe)"
    )


def _plan(
    request: BenchRequest, tests: list[BenchTest], path: Path, spec: ModelSpec
) -> tuple[BenchPlan, dict[int, RopePlan]]:
    """The first event (with its warnings) and the RoPE plan of every context size."""
    warnings: list[str] = []
    notes: list[str] = []
    for n in sorted({t.n_threads for t in tests}):
        if message := threads_warning(n, "-t"):
            warnings.append(message)
    ropes = {}
    for n_ctx in sorted({t.n_ctx for t in tests}):
        plan = plan_rope(spec, n_ctx, request.rope)
        ropes[n_ctx] = plan
        if plan.extended:
            notes.append(plan.description)
        if plan.warning:
            warnings.append(plan.warning)
    first = BenchPlan(
        path, tuple(tests), request.repetitions, request.warmup, tuple(warnings), tuple(notes)
    )
    return first, ropes


_Shape = tuple[int, str, str, bool, int, int]


def _shape(test: BenchTest) -> _Shape:
    """What decides a test's memory: context, KV types, flash attention, batch sizes."""
    ubatch = min(test.n_ubatch, test.n_batch)
    return (test.n_ctx, test.type_k, test.type_v, test.flash_attn != "off", ubatch, test.n_batch)


def _memory_plans(
    label: str, spec: ModelSpec, tests: list[BenchTest], request: BenchRequest, swa_full: bool
) -> dict[_Shape, LoadPlan]:
    """kv-calc's plan (llama.cpp's dry run) of every test's context, before loading."""
    plans = {}
    for shape in {_shape(t) for t in tests}:
        n_ctx, type_k, type_v, flash_attn, ubatch, n_batch = shape
        plans[shape] = plan_load(
            label, spec, n_ctx=n_ctx, type_k=type_k, type_v=type_v, flash_attn=flash_attn,
            ubatch=ubatch, n_batch=n_batch, swa_full=swa_full,
            repack=request.repack,
        )  # fmt: skip
    return plans


def _split_options(request: BenchRequest, shape: _Shape) -> LoadOptions:
    n_ctx, type_k, type_v, flash_attn, ubatch, n_batch = shape
    return LoadOptions(
        n_ctx=n_ctx, n_batch=n_batch, n_ubatch=ubatch, type_k=type_k, type_v=type_v,
        flash_attn=flash_attn, repack=request.repack, rpc=request.rpc,
        n_gpu_layers=request.n_gpu_layers, tensor_split=request.tensor_split,
    )  # fmt: skip


def _split(request: BenchRequest, model: BenchModel) -> RpcSplit | None:
    """Who held which layers, from llama.cpp's load log (None: all on this machine)."""
    if not request.rpc:
        return None
    layers = tuple(
        (f"{s.device}[{s.endpoint}]" if s.endpoint else s.device, s.layers) for s in model.placement
    )
    return RpcSplit(request.rpc, request.n_gpu_layers, request.tensor_split, layers)


def _figures(plan: LoadPlan) -> MemoryFigures:
    row = plan.row
    return MemoryFigures(
        row.source, row.weights_bytes, row.kv_bytes, row.compute_bytes, row.output_bytes
    )


@dataclass(frozen=True)
class _Measured:
    """What every test of a run shares: the machine and the model's bytes per token."""

    bandwidth: Bandwidth
    environment: Environment
    weights_read: int


# Long: llama-bench's test loop (warm-up, repetitions, the record) inside one context.
def _run_test(
    model: BenchModel,
    request: BenchRequest,
    test: BenchTest,
    where: tuple[int, int],
    rope: RopePlan,
    spec: ModelSpec,
    measured: _Measured,
    swa_full: bool = False,
) -> Generator[BenchEvent, None, BenchResult]:
    """One test in its own context: warm-up, then the timed repetitions (``where``: n of m)."""
    progress = BenchProgress("warmup", *where, test.name, 0, request.repetitions)
    yield progress
    config = ContextConfig(
        n_ctx=test.n_ctx,
        n_batch=test.n_batch,
        n_ubatch=test.n_ubatch,
        type_k=test.type_k,
        type_v=test.type_v,
        flash_attn=test.flash_attn,
        n_threads=test.n_threads,
        rope=rope.params,
        swa_full=swa_full,
    )
    with model.new_context(config) as ctx:
        test_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ctx.clear()
        if request.warmup:
            ctx.warmup(test.n_prompt, test.n_gen)
        samples = []
        for rep in range(1, request.repetitions + 1):
            ctx.clear()
            if test.n_depth > 0:
                yield replace(progress, stage="depth", rep=rep)
                ctx.prefill_depth(test.n_depth)
            yield replace(progress, stage="rep", rep=rep)
            samples.append(ctx.timed_run(test.n_prompt, test.n_gen))
        buffers = ctx.buffers
        return BenchResult(
            test=test,
            samples_ns=tuple(samples),
            test_time=test_time,
            model_filename=str(model.path),
            model_type=model.desc,
            model_size=model.size_bytes,
            model_n_params=model.n_params,
            n_ctx_cells=ctx.n_ctx,
            flash_attn_used=ctx.flash_attn_used,
            rope=rope.method,
            peak_rss_bytes=peak_rss_bytes(),
            weights_bytes=model.weights_bytes,
            kv_bytes=buffers.kv_bytes,
            compute_bytes=buffers.compute_bytes,
            output_bytes=buffers.output_bytes,
            tg_bytes_per_token=_tg_bytes_per_token(test, measured.weights_read, spec),
            bandwidth=measured.bandwidth,
            environment=measured.environment,
            repetitions=request.repetitions,
            warmup=request.warmup,
            repack=model.repack,
        )


def _environment(build: LlamaBuild, path: Path, *, hash_model: bool = True) -> Environment:
    from localllm import __version__

    return Environment(
        cpu_model=cpu_model(),
        cpu_info=build.cpu_info,
        gpu_info=build.gpu_info,
        backends=build.backends,
        cpu_cores=physical_cores(),
        cpu_threads=online_cpus(),
        ram_bytes=ram_bytes(),
        os=platform.platform(),
        python_version=platform.python_version(),
        llama_cpp_python_version=build.llama_cpp_python,
        llama_cpp_build=build.commit,
        ggml_version=build.ggml_version,
        system_info=build.system_info,
        localllm_version=__version__,
        model_path=str(path),
        model_sha256=cached_sha256(path) if hash_model else "",
    )
