"""llama.cpp's dry run: what a model and its contexts would allocate, without its weights.

The model is loaded with ``no_alloc`` (metadata only, no byte of weights read, dummy
buffers) and ``LLAMA_LOAD_MODE_NONE``; each ``llama_init_from_model`` then builds the
real memory modules and reserves the real compute graphs, only sized, not allocated. It
takes milliseconds, needs no RAM for the weights, and works on a sparse file that holds
only the GGUF header at the file's full size. This is the mechanism of llama.cpp's own
``--fit``.

What the dry run reports, and how each figure is rebuilt to the byte:

- weights: ``llama_model_size()`` (the "model buffer size" lines print 0.00 MiB: dummy
  buffers);
- each attention cache (``llama_kv_cache: size = ... (N cells, L layers, S/T seqs), K
  (type): ... MiB, V (type): ... MiB``; the iswa, DSA and MSA wrappers log which cache
  comes next): its bytes are cells x streams x the ggml row size of the K (V) elements
  per cell summed over its layers. The log rounds to 0.01 MiB, too coarse to recover
  that sum, so one probe context per V layout (f32 cache, 2^18 cells, full-size SWA)
  makes llama.cpp print it as a whole number of MiB: 2^18 cells x 4 bytes = 1 MiB per
  element;
- recurrent state (``llama_memory_recurrent: ... R (f32): ..., S (f32): ...``; really
  allocated even here, one row per sequence): the row widths come from the GGUF keys
  (llama-hparams.cpp's n_embd_r / n_embd_s), the layer count from the log's bytes (it
  prints every layer's count), or when a layer's rows are too small to show in 0.01 MiB
  from a probe with more sequences; unconfirmed by the log: ``exact=False``, its figure;
- DeepSeek-V4's compressor states (``llama_dsv4_comp_state: ...``): the line's fields;
- compute: the ``compute buffer size`` lines (to 0.01 MiB; ggml's allocator peak);
- output: ``n_vocab`` f32 logits per sequence (the buffer at context creation).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localllm.errors import InvalidArgument, ModelLoadError
from localllm.gguf.ggml_types import check_kv_type, kv_type_block, kv_type_is_quantized
from localllm.gguf.kv_layout import recurrent_widths
from localllm.runtime.dry_run_log import (
    CacheReport,
    LoggedMemory,
    attention_cache,
    compute_bytes,
    flash_attn_used,
    parse_memory,
    recurrent_cache,
    recurrent_layers,
    state_cache,
)
from localllm.runtime.library import import_llama_cpp
from localllm.runtime.log import load_model_file, log_mark, log_since
from localllm.runtime.params import (
    FLASH_ATTN_TYPES,
    KV_CACHE_TYPE_IDS,
    ROPE_SCALING_TYPES,
    RopeParams,
    rope_fields,
)

__all__ = [
    "CacheReport",
    "ContextPlan",
    "DryRunModel",
    "DryRunReport",
    "DryRunSettings",
    "context_params",
    "plan_contexts",
]

_MIB = 1024 * 1024
_F32 = 4
_PROBE_CELLS = 1 << 18  # x 4 bytes (f32) = 1 MiB per element of a cache row
_LLAMA_MAX_SEQ = 256  # llama-cparams.h


@dataclass(frozen=True)
class DryRunSettings:
    """The context settings that decide its memory (llama-cpp-python's clamps applied)."""

    n_ctx: int  # tokens per sequence; the context holds n_ctx * n_seq (kv_unified: n_ctx)
    n_seq: int = 1  # parallel sequences (n_seq_max)
    n_batch: int = 512
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "on"  # on | off | auto
    swa_full: bool = False  # llama.cpp's tools: SWA cache sized to the window
    kv_unified: bool = False  # True: one stream of n_ctx cells shared by all sequences
    rope: RopeParams | None = None
    # An embeddings context (``embeddings = true``) with this llama_pooling_type; None: a
    # generation context. Its output buffer holds a pooled vector per sequence too.
    embeddings: int | None = None

    def validate(self) -> None:
        for name in ("n_ctx", "n_seq", "n_batch", "n_ubatch"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name} {getattr(self, name)} must be positive")
        if self.n_seq > _LLAMA_MAX_SEQ:
            raise InvalidArgument(f"n_seq {self.n_seq} exceeds llama.cpp's {_LLAMA_MAX_SEQ}")
        check_kv_type(self.type_k)
        check_kv_type(self.type_v)
        if self.flash_attn not in FLASH_ATTN_TYPES:
            raise InvalidArgument(f"flash attention {self.flash_attn!r}: use on, off or auto")
        if self.rope and self.rope.scaling not in (None, *ROPE_SCALING_TYPES):
            raise InvalidArgument(f"unknown RoPE scaling {self.rope.scaling!r}")


@dataclass(frozen=True)
class ContextPlan:
    """What one context would allocate (``error``: llama.cpp refused to create it)."""

    settings: DryRunSettings
    caches: tuple[CacheReport, ...] = ()
    kv_bytes: int = 0  # all caches
    compute_bytes: int | None = None
    output_bytes: int | None = None
    n_ctx: int | None = None  # llama_n_ctx: cells across all sequences
    flash_attn_used: bool | None = None
    error: str | None = None

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + (self.compute_bytes or 0) + (self.output_bytes or 0)


@dataclass(frozen=True)
class DryRunReport:
    """The model's weights and each context's memory, as llama.cpp would allocate them."""

    path: str
    architecture: str
    weights_bytes: int  # llama_model_size: every tensor's bytes
    n_params: int
    n_vocab: int
    contexts: tuple[ContextPlan, ...] = field(default_factory=tuple)


# ------------------------------------------------------------------ llama.cpp calls


def _meta(lc: Any, model: Any, key: str) -> str | None:
    import ctypes

    buf = ctypes.create_string_buffer(256)
    n = lc.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode(errors="replace") if n >= 0 else None


def _meta_int(lc: Any, model: Any, key: str) -> int:
    value = _meta(lc, model, key)
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def _recurrent_widths(lc: Any, model: Any, arch: str) -> tuple[int, int]:
    """Elements of one layer's R and S rows, from the model's keys (llama-hparams.cpp)."""
    n_embd, n_head = int(lc.llama_model_n_embd(model)), int(lc.llama_model_n_head(model))
    return recurrent_widths(
        lambda name: _meta_int(lc, model, f"{arch}.{name}"), arch, n_embd, n_head
    )


def context_params(lc: Any, s: DryRunSettings, *, probe: bool = False) -> Any:
    """``llama_context_params`` for ``s`` (one thread: the caller sets its own)."""
    params = lc.llama_context_default_params()
    # What llama-cpp-python's Llama does with n_batch / n_ubatch before creating a context.
    n_total = _PROBE_CELLS if probe else s.n_ctx * (1 if s.kv_unified else s.n_seq)
    params.n_ctx = n_total
    params.n_batch = min(n_total, s.n_batch)
    params.n_ubatch = min(params.n_batch, s.n_ubatch)
    params.n_seq_max = 1 if probe else s.n_seq
    params.n_threads = params.n_threads_batch = 1
    params.type_k = KV_CACHE_TYPE_IDS["f32" if probe else s.type_k]
    params.type_v = KV_CACHE_TYPE_IDS["f32" if probe else s.type_v]
    params.flash_attn_type = FLASH_ATTN_TYPES[s.flash_attn]
    params.swa_full = True if probe else s.swa_full
    params.kv_unified = s.kv_unified
    for name, value in rope_fields(s.rope or RopeParams()).items():
        setattr(params, name, value)
    if s.embeddings is not None and not probe:  # a probe measures cache rows only
        params.embeddings = True
        params.pooling_type = s.embeddings
    return params


def _create(lc: Any, model: Any, params: Any) -> tuple[list[str], int | None, str | None]:
    """Create and free one context: its log, llama_n_ctx, or llama.cpp's reason for refusing."""
    mark = log_mark()
    ctx = lc.llama_init_from_model(model, params)
    log = log_since(mark)
    if not ctx:
        errors = [ln for ln in log if "error" in ln.lower() or "failed" in ln.lower()]
        reason = (errors or log or ["context creation failed"])[-1].strip()
        return log, None, re.sub(r"^\w+: ", "", reason)
    try:
        return log, int(lc.llama_n_ctx(ctx)), None
    finally:
        lc.llama_free(ctx)


class _Planner:
    """One dry-run model: creates contexts and rebuilds their caches exactly."""

    def __init__(self, lc: Any, model: Any) -> None:
        self.lc, self.model = lc, model
        self.arch = _meta(lc, model, "general.architecture") or "unknown"
        self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model)))
        self.n_embd_out = int(lc.llama_model_n_embd_out(model))
        self.widths = _recurrent_widths(lc, model, self.arch)
        self.probes: dict[bool, list[LoggedMemory]] = {}
        self.recurrent_layers: int | None = None

    def _state_layers(self, logged: LoggedMemory) -> int | None:
        """Layers with a recurrent state: from the log's MiB if they tell, else from a
        probe with enough sequences (one state row each) that a layer shows in 0.01 MiB.
        The probe's states are really allocated, but it runs only when they are tiny."""
        if self.recurrent_layers is None:
            self.recurrent_layers = recurrent_layers(logged, self.widths)
        if self.recurrent_layers is None and max(self.widths) > 0:
            rows = min(-(-(_MIB // 50) // (max(self.widths) * _F32)), _LLAMA_MAX_SEQ)
            probe = DryRunSettings(256, n_seq=rows, n_batch=256, n_ubatch=256)
            log, _, error = _create(self.lc, self.model, context_params(self.lc, probe))
            states = [m for m in parse_memory(log) if m.kind == "recurrent"]
            if not error and states:
                self.recurrent_layers = recurrent_layers(states[0], self.widths)
        return self.recurrent_layers

    def _probe(self, s: DryRunSettings) -> list[LoggedMemory]:
        # V is stored transposed (and padded to the widest layer) only with flash attention
        # off ("auto" lays the cache out as "on"): one probe per layout.
        v_trans = s.flash_attn == "off"
        if v_trans not in self.probes:
            log, _, error = _create(self.lc, self.model, context_params(self.lc, s, probe=True))
            self.probes[v_trans] = [] if error else parse_memory(log)
        return self.probes[v_trans]

    def plan(self, s: DryRunSettings) -> ContextPlan:
        if error := self._check_head_blocks(s):
            return ContextPlan(s, error=error)
        log, n_ctx, error = _create(self.lc, self.model, context_params(self.lc, s))
        if error:
            return ContextPlan(s, error=error)
        logged = parse_memory(log)
        probes = self._probe(s)
        caches = []
        for i, mem in enumerate(logged):
            if mem.kind == "recurrent":
                caches.append(recurrent_cache(mem, self.widths, self._state_layers(mem)))
            elif mem.kind == "state":  # rebuilt from the line's own fields
                caches.append(state_cache(mem))
            else:
                probe = probes[i] if len(probes) == len(logged) else None
                caches.append(attention_cache(mem, probe))
        return ContextPlan(
            settings=s,
            caches=tuple(caches),
            kv_bytes=sum(c.bytes for c in caches),
            compute_bytes=compute_bytes(log),
            output_bytes=self._output_floats(s) * _F32,
            n_ctx=n_ctx,
            flash_attn_used=flash_attn_used(log),
        )

    def _output_floats(self, s: DryRunSettings) -> int:
        """Logits per sequence, and an embeddings context's pooled vector per sequence
        too (llama_context::output_reserve)."""
        per_seq = self.n_vocab + (self.n_embd_out if s.embeddings is not None else 0)
        return per_seq * s.n_seq

    def _check_head_blocks(self, s: DryRunSettings) -> str | None:
        """Refuse a quantized cache whose block does not divide a head, as kv-calc does.

        llama.cpp checks this itself only with flash attention on. Without it the context
        is created anyway (measured: q8_0 K, head dim 80), but the per-head views of a row
        would cut blocks in two (ggml_row_size's assert is compiled out in release builds).
        """
        if s.flash_attn == "on":
            return None
        n_head = int(self.lc.llama_model_n_head(self.model))
        default = int(self.lc.llama_model_n_embd(self.model)) // n_head if n_head else 0
        for which, type_name in (("key", s.type_k), ("value", s.type_v)):
            if not kv_type_is_quantized(type_name):
                continue
            dim = _meta_int(self.lc, self.model, f"{self.arch}.attention.{which}_length")
            block = kv_type_block(type_name)[0]
            if (dim or default) % block:
                return (
                    f"{type_name} cache blocks of {block} do not divide the {which} head "
                    f"dim {dim or default}; use f16 or flash attention on"
                )
        return None


class DryRunModel:
    """A model loaded for dry runs (metadata only): plan contexts one at a time.

    ``with DryRunModel(path) as model: model.plan(settings)``; the model is freed on exit.
    ``use_extra_bufts`` is llama.cpp's weight repacking (llama-bench's ``--repack``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        use_extra_bufts: bool = True,
        configure: Callable[[Any], None] | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"no such model file: {self.path}")
        self.lc = import_llama_cpp()
        params = self.lc.llama_model_default_params()
        params.no_alloc = True
        params.load_mode = self.lc.LLAMA_LOAD_MODE_NONE
        params.use_extra_bufts = use_extra_bufts
        if configure is not None:  # e.g. RPC devices and the layers they take
            configure(params)
        self.model, _ = load_model_file(self.lc, self.path, params)
        self._planner = _Planner(self.lc, self.model)
        self.architecture = self._planner.arch
        self.n_vocab = self._planner.n_vocab
        self.weights_bytes = int(self.lc.llama_model_size(self.model))
        self.n_params = int(self.lc.llama_model_n_params(self.model))

    def plan(self, settings: DryRunSettings) -> ContextPlan:
        """What one context with ``settings`` would allocate (nothing is allocated)."""
        settings.validate()
        return self._planner.plan(settings)

    def close(self) -> None:
        if self.model is not None:
            self.lc.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> DryRunModel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def plan_contexts(
    path: str | os.PathLike[str],
    settings: Sequence[DryRunSettings],
    *,
    use_extra_bufts: bool = True,
) -> DryRunReport:
    """Dry-run ``path`` once (no weights read) and plan one context per settings entry."""
    for s in settings:
        s.validate()
    with DryRunModel(path, use_extra_bufts=use_extra_bufts) as model:
        return DryRunReport(
            path=str(model.path),
            architecture=model.architecture,
            weights_bytes=model.weights_bytes,
            n_params=model.n_params,
            n_vocab=model.n_vocab,
            contexts=tuple(model.plan(s) for s in settings),
        )
