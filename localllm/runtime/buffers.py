"""Ask llama.cpp what it allocates: load a model once, create contexts, read the buffer sizes.

``kv-calc --verify`` and the tests hold the estimates of :mod:`localllm.plan.memory` against
these figures. Contexts are created with llama.cpp's own C API (not ``llama_cpp.Llama``)
so that ``n_seq_max`` (parallel sequences) can be set, and so one model load serves
many contexts. Nothing is evaluated; creating a context is what allocates its buffers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from localllm.errors import ModelLoadError
from localllm.runtime.library import import_llama_cpp
from localllm.runtime.log import (
    BufferReport,
    load_model_file,
    log_mark,
    log_since,
    parse_buffer_report,
)
from localllm.runtime.params import LoadOptions, context_fields

__all__ = ["BufferMeasurements", "ContextBuffers", "ContextSettings", "measure_buffers"]


@dataclass(frozen=True)
class ContextSettings:
    """The llama.cpp context settings that decide its buffer sizes."""

    n_ctx: int  # tokens per sequence
    n_seq: int = 1  # parallel sequences (llama.cpp's n_seq_max); the context holds n_ctx * n_seq
    n_batch: int = 512
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True
    swa_full: bool = False  # llama.cpp's tools: the sliding-window cache sized to the window


@dataclass(frozen=True)
class ContextBuffers:
    """What llama.cpp reported for one context (``error`` set when it refused to create it)."""

    settings: ContextSettings
    buffers: BufferReport | None
    n_ctx: int | None  # llama_n_ctx: the cells it allocated across all sequences
    error: str | None = None


@dataclass(frozen=True)
class BufferMeasurements:
    """The weights buffer of the one model load, and each context's buffers."""

    weights_bytes: int | None
    contexts: tuple[ContextBuffers, ...]


def measure_buffers(
    path: str | os.PathLike[str], settings: Sequence[ContextSettings], *, repack: bool = True
) -> BufferMeasurements:
    """Load ``path`` once (mmap, CPU) and create one context per settings entry."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no such model file: {path}")
    for s in settings:
        # Chat's own checks, except the quantized-V one: a refusal of that must come from
        # llama.cpp here, so tests can hold kv-calc's trap against it.
        LoadOptions(
            n_ctx=s.n_ctx, n_batch=s.n_batch, n_ubatch=s.n_ubatch, type_k=s.type_k, type_v="f16"
        ).validate()
    llama_cpp = import_llama_cpp()
    model_params = llama_cpp.llama_model_default_params()
    model_params.use_extra_bufts = repack
    model, load_log = load_model_file(llama_cpp, path, model_params)
    try:
        weights = parse_buffer_report(load_log).weights_bytes
        results = [_measure_one(llama_cpp, model, s) for s in settings]
    finally:
        llama_cpp.llama_model_free(model)
    return BufferMeasurements(weights, tuple(results))


def _measure_one(llama_cpp: object, model: object, s: ContextSettings) -> ContextBuffers:
    lc = llama_cpp  # the module, typed loosely: its ctypes API has no stubs
    params = lc.llama_context_default_params()  # type: ignore[attr-defined]
    # What llama-cpp-python's Llama does with n_batch / n_ubatch before creating a context.
    n_total = s.n_ctx * s.n_seq
    n_batch = min(n_total, s.n_batch)
    params.n_ctx = n_total
    params.n_batch = n_batch
    params.n_ubatch = min(n_batch, s.n_ubatch)
    params.n_seq_max = s.n_seq
    params.n_threads = 1
    params.n_threads_batch = 1
    params.swa_full = s.swa_full
    for name, value in context_fields(s.type_k, s.type_v).items():
        setattr(params, name, value)
    params.flash_attn_type = (
        lc.LLAMA_FLASH_ATTN_TYPE_ENABLED  # type: ignore[attr-defined]
        if s.flash_attn
        else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED  # type: ignore[attr-defined]
    )
    mark = log_mark()
    ctx = lc.llama_init_from_model(model, params)  # type: ignore[attr-defined]
    log = log_since(mark)
    if not ctx:
        # llama_init_from_model logs why it returns NULL as its last line.
        reason = log[-1].strip() if log else "context creation failed"
        return ContextBuffers(s, None, None, reason.removeprefix("llama_init_from_model: "))
    try:
        n_ctx = int(lc.llama_n_ctx(ctx))  # type: ignore[attr-defined]
    finally:
        lc.llama_free(ctx)  # type: ignore[attr-defined]
    return ContextBuffers(s, parse_buffer_report(log), n_ctx)
