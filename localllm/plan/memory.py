"""KV cache, recurrent state, GQA/MQA/MHA, output and compute-buffer arithmetic.

The KV figures follow llama.cpp's own allocation (src/llama-context.cpp,
src/llama-kv-cache.cpp, llama-kv-cache-iswa.cpp, llama-memory-recurrent.cpp): the
context is padded to a multiple of 256 cells, and each layer of an attention cache holds
one K row and one V row per cell, stored in the cache type's blocks (ggml_row_size).
With several parallel sequences llama.cpp (non-unified cache, its default) gives each
sequence its own padded stream. Which layers hold what comes from
:mod:`localllm.gguf.kv_layout`: layers that slide over a window live in a second cache of
``window + ubatch`` cells (unless ``swa_full``), MLA layers keep only the latent K,
recurrent layers keep one f32 state per sequence whatever the context.

The compute buffer is ggml's graph allocator's peak for the worst-case micro-batch
(``sched_reserve``): see :func:`compute_buffer_bytes` for the model of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from localllm.errors import InvalidArgument
from localllm.gguf.ggml_types import KV_CACHE_TYPES, kv_type_block
from localllm.gguf.kv_layout import AttentionLayer, MemoryLayout, layout_from_spec
from localllm.gguf.spec import ModelSpec
from localllm.plan.graph_archs import graph_shape, replay_compute_bytes
from localllm.text import escape_untrusted

__all__ = [
    "COMPUTE_FRAGMENTATION",
    "KV_CELL_PADDING",
    "KV_TYPE_BLOCKS",
    "CachePlan",
    "ComputeEstimate",
    "ContextShape",
    "KVCacheEstimate",
    "KVPlan",
    "check_kv_types",
    "compute_buffer_bytes",
    "context_shape",
    "kv_bytes_per_token",
    "kv_cache_bytes",
    "kv_cells",
    "kv_cells_per_seq",
    "kv_row_bytes",
    "layout_bytes_per_token",
    "output_buffer_bytes",
    "plan_kv",
    "swa_kv_cells",
    "with_kv_heads",
]

# KV cache type -> (elements per block, bytes per block), from ggml's type table.
KV_TYPE_BLOCKS: dict[str, tuple[int, int]] = {name: kv_type_block(name) for name in KV_CACHE_TYPES}
# llama.cpp pads n_ctx to this many cells (GGML_PAD(n_ctx, 256) in llama-context.cpp).
KV_CELL_PADDING = 256
# ggml's allocator leaves holes between tensors. Measured on SmolLM2-135M across ctx
# 512-8192 and ubatch 32-512, the buffer is 0 to 4.3% above the live-tensor peak this
# module models; adding 2% puts the estimate within 2.3% of llama.cpp on that grid.
COMPUTE_FRAGMENTATION = 1.02
_F32 = 4
_F16 = 2


def _pad(n: int, to: int = KV_CELL_PADDING) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class KVCacheEstimate:
    """What the KV cache of one context costs, split into K and V."""

    cells: int  # across all sequences (llama_n_ctx)
    k_bytes: int
    v_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.k_bytes + self.v_bytes


def _check_positive(n_ctx: int, n_seq: int) -> None:
    if n_ctx <= 0:
        raise InvalidArgument(f"context size {n_ctx} must be a positive token count")
    if n_seq <= 0:
        raise InvalidArgument(f"batch {n_seq} must be at least 1 sequence")


def kv_cells_per_seq(n_ctx: int, n_seq: int = 1) -> int:
    """Cells of each sequence's stream (llama.cpp's n_ctx_seq) for ``n_seq`` x ``n_ctx``."""
    _check_positive(n_ctx, n_seq)
    # llama.cpp is asked for n_ctx * n_seq cells, pads that, splits it per sequence and
    # pads each share again (llama_context's constructor, kv_unified = false).
    total = _pad(n_ctx * n_seq)
    return _pad(total // n_seq)


def kv_cells(n_ctx: int, n_seq: int = 1) -> int:
    """Cells llama.cpp allocates for ``n_seq`` sequences of ``n_ctx`` tokens each."""
    return kv_cells_per_seq(n_ctx, n_seq) * n_seq


def swa_kv_cells(n_ctx: int, n_seq: int, window: int, n_ubatch: int = 512) -> int:
    """Cells a sliding-window cache holds across all streams (llama_kv_cache_iswa)."""
    per_seq = kv_cells_per_seq(n_ctx, n_seq)
    return _pad(min(per_seq, window + n_ubatch)) * n_seq


def kv_row_bytes(n_elements: int, cache_type: str) -> int:
    """ggml_row_size: bytes of one row of ``n_elements`` in ``cache_type``."""
    block, block_bytes = kv_type_block(cache_type)
    if n_elements % block:
        raise InvalidArgument(
            f"a KV row of {n_elements} elements is not a multiple of {cache_type}'s "
            f"block of {block}; use f16 for this model"
        )
    return n_elements // block * block_bytes


def check_kv_types(spec: ModelSpec, type_k: str, type_v: str) -> None:
    """Refuse a quantized cache type whose block does not divide the head dimension.

    llama.cpp checks this per head when it creates the context (llama_init_from_model)
    and fails; without flash attention ggml cannot even view the rows per head.
    """
    for which, cache_type, dim in (("K", type_k, spec.head_dim), ("V", type_v, spec.value_dim)):
        block, _ = kv_type_block(cache_type)
        if dim and dim % block:
            raise InvalidArgument(
                f"head dim {dim} is not a multiple of {cache_type}'s block of {block}: "
                f"llama.cpp cannot create a {cache_type} {which} cache for "
                f"{escape_untrusted(spec.name, 60)}; "
                "use f16, bf16 or f32"
            )


# ------------------------------------------------------------------ per-layer plan


@dataclass(frozen=True)
class CachePlan:
    """One memory module of a context, as llama.cpp would allocate it."""

    kind: str  # kv | swa | indexer | compressed | recurrent | state (DeepSeek-V4 compressor)
    cells: int  # per stream; recurrent: state rows (one per sequence); state: its rows
    streams: int
    layers: int
    k_bytes: int = 0
    v_bytes: int = 0
    r_bytes: int = 0  # recurrent: conv / token-shift states (+ PLE history); state: kv
    s_bytes: int = 0  # recurrent: SSM / wkv states; state: scores

    @property
    def bytes(self) -> int:
        return self.k_bytes + self.v_bytes + self.r_bytes + self.s_bytes


@dataclass(frozen=True)
class KVPlan:
    """Every memory module of one context; ``cells`` is the main cache's (llama_n_ctx)."""

    caches: tuple[CachePlan, ...]
    cells: int

    @property
    def k_bytes(self) -> int:
        return sum(c.k_bytes for c in self.caches)

    @property
    def v_bytes(self) -> int:
        return sum(c.v_bytes for c in self.caches)

    @property
    def state_bytes(self) -> int:
        return sum(c.r_bytes + c.s_bytes for c in self.caches)

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.caches)


def _attention_cache(
    kind: str, layers: list[AttentionLayer], cells: int, streams: int, types: tuple[str, str],
    v_width: int | None,
) -> CachePlan:  # fmt: skip
    """``v_width``: every V row padded to it (the transposed V cache without FA)."""
    k = sum(kv_row_bytes(layer.k, types[0]) for layer in layers)
    v = sum(
        kv_row_bytes(v_width if v_width is not None else layer.v, types[1])
        for layer in layers
        if layer.v
    )
    return CachePlan(kind, cells, streams, len(layers), k * cells * streams, v * cells * streams)


def plan_kv(
    layout: MemoryLayout,
    n_ctx: int,
    n_seq: int = 1,
    *,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: bool = True,
    n_ubatch: int = 512,
    swa_full: bool = False,
) -> KVPlan:
    """Every cache llama.cpp creates for ``layout`` at ``n_ctx`` tokens per sequence.

    ``n_ubatch`` is the context's micro-batch after llama.cpp's clamps (it sizes the
    sliding-window cache: the window plus one micro-batch, padded to 256 cells).
    """
    cells = kv_cells_per_seq(n_ctx, n_seq)
    types = (type_k, type_v)
    v_width = None if flash_attn else layout.v_max
    caches: list[CachePlan] = []
    full = [layer for layer in layout.attention if not (layout.has_swa and layer.swa)]
    if full:
        caches.append(_attention_cache("kv", full, cells, n_seq, types, v_width))
    if layout.has_swa:
        swa_cells = cells if swa_full else _pad(min(cells, layout.n_swa + n_ubatch))
        sliding = [layer for layer in layout.attention if layer.swa]
        caches.append(_attention_cache("swa", sliding, swa_cells, n_seq, types, v_width))
    if layout.indexer:
        index_v = None if flash_attn else max(layer.v for layer in layout.indexer)
        caches.append(
            _attention_cache("indexer", list(layout.indexer), cells, n_seq, types, index_v)
        )
    caches.extend(_compressed_caches(layout, cells, n_seq, types))
    if layout.recurrent_layers:
        rows = max(1, n_seq)  # one state per sequence, whatever the context
        per_row = rows * _F32
        # Qwen4-exp's PLE history is its own f32 tensor beside R; counted with R, as
        # llama.cpp's dry-run log adds its "P" figure to the conv states.
        r = per_row * (layout.recurrent_layers * layout.r_elements
                       + layout.p_layers * layout.p_elements)  # fmt: skip
        s = per_row * layout.recurrent_layers * layout.s_elements
        caches.append(
            CachePlan("recurrent", rows, 1, layout.recurrent_layers, r_bytes=r, s_bytes=s)
        )
    return KVPlan(tuple(caches), cells * n_seq)


def _compressed_caches(
    layout: MemoryLayout, cells: int, n_seq: int, types: tuple[str, str]
) -> list[CachePlan]:
    """DeepSeek-V4's compressed K caches and compressor states (llama_kv_cache_dsv4).

    Each compressed cache holds ``pad256(max(1, ceil(cells / ratio)))`` cells per stream;
    the compressor states are f32 and, like the caches, one stream per sequence even with
    a unified KV cache (the dsv4 cache forces them per sequence).
    """
    out = []
    for cache in layout.compressed:
        if cache.layers:
            comp_cells = _pad(max(1, -(-cells // cache.ratio)))
            out.append(_attention_cache(cache.kind, list(cache.layers), comp_cells, n_seq, types,
                                        None))  # fmt: skip
    for state in layout.compressor_states:
        if state.layers:
            half = state.layers * state.rows * state.width * n_seq * _F32  # kv, then score
            out.append(CachePlan("state", state.rows, n_seq, state.layers, r_bytes=half,
                                 s_bytes=half))  # fmt: skip
    return out


def layout_bytes_per_token(
    layout: MemoryLayout, *, type_k: str = "f16", type_v: str = "f16", sliding: bool = True
) -> int:
    """K plus V bytes one more token of context costs (``sliding``: count SWA layers too)."""
    return sum(
        kv_row_bytes(layer.k, type_k) + (kv_row_bytes(layer.v, type_v) if layer.v else 0)
        for layer in (*layout.attention, *layout.indexer)
        if sliding or not (layout.has_swa and layer.swa)
    )


# ----------------------------------------------------------- uniform models (presets)


def kv_cache_bytes(
    spec: ModelSpec,
    n_ctx: int,
    *,
    type_k: str = "f16",
    type_v: str = "f16",
    n_seq: int = 1,
) -> KVCacheEstimate:
    """The KV cache llama.cpp allocates for ``spec`` (every layer alike) at ``n_ctx`` tokens."""
    check_kv_types(spec, type_k, type_v)
    plan = plan_kv(layout_from_spec(spec), n_ctx, n_seq, type_k=type_k, type_v=type_v)
    return KVCacheEstimate(cells=plan.cells, k_bytes=plan.k_bytes, v_bytes=plan.v_bytes)


def kv_bytes_per_token(spec: ModelSpec, *, type_k: str = "f16", type_v: str = "f16") -> int:
    """K plus V bytes one token occupies across all layers (before cell padding)."""
    check_kv_types(spec, type_k, type_v)
    return layout_bytes_per_token(layout_from_spec(spec), type_k=type_k, type_v=type_v)


def with_kv_heads(spec: ModelSpec, n_kv_heads: int) -> ModelSpec:
    """The same model with ``n_kv_heads`` KV heads in every layer (MHA: n_heads, MQA: 1)."""
    return replace(spec, n_kv_heads=n_kv_heads, n_kv_heads_per_layer=None)


# ------------------------------------------------------------------- compute buffer


@dataclass(frozen=True)
class ContextShape:
    """The sizes llama.cpp settles on for a context, after its clamps and padding."""

    n_seq: int
    cells_per_seq: int  # n_ctx_seq: cells each sequence's stream holds
    n_batch: int  # logical batch after clamping to the context
    n_ubatch: int  # micro-batch after clamping to n_batch
    n_tokens: int  # tokens in the worst-case graph sched_reserve builds
    n_outputs: int = 0  # its rows of logits (the tokens before rounding to the sequences)

    @property
    def cells(self) -> int:
        return self.cells_per_seq * self.n_seq


def context_shape(
    n_ctx: int, n_seq: int = 1, *, n_ubatch: int = 512, n_batch: int = 512
) -> ContextShape:
    """Cells and batch sizes of a context, clamped the way llama-cpp-python and llama.cpp do."""
    _check_positive(n_ctx, n_seq)
    if n_ubatch <= 0 or n_batch <= 0:
        raise InvalidArgument(f"ubatch {n_ubatch} and batch size {n_batch} must be positive")
    requested = n_ctx * n_seq
    cells_per_seq = kv_cells_per_seq(n_ctx, n_seq)
    # Llama() and llama_context both cap n_batch at the (unpadded) context, then ubatch
    # at n_batch; sched_reserve's graph holds min(n_ctx, n_ubatch) tokens, a multiple of n_seq.
    batch = min(requested, n_batch)
    ubatch = min(batch, n_ubatch)
    outputs = min(cells_per_seq * n_seq, ubatch)
    tokens = _pad(outputs, n_seq)
    return ContextShape(n_seq, cells_per_seq, batch, ubatch, tokens, outputs)


@dataclass(frozen=True)
class ComputeEstimate:
    """The compute buffer's estimate and the phase of the graph that decides it."""

    bytes: int
    phase: str  # "replayed" (the allocator's walk), or the estimate's "output" / "attention"
    output_phase_bytes: int
    attention_phase_bytes: int


def compute_buffer_bytes(
    spec: ModelSpec,
    shape: ContextShape,
    *,
    flash_attn: bool = True,
    layout: MemoryLayout | None = None,
    swa_full: bool = False,
) -> ComputeEstimate | None:
    """ggml's compute buffer for the worst-case micro-batch, or None without a vocab size.

    For the architectures :mod:`localllm.plan.graph_archs` replays (llama, qwen2, phi3, gemma2,
    gemma3, ...: ``layout`` from the GGUF gives the sliding-window layers; experts' sizes
    come from the GGUF at ``spec.path``), the allocator's walk over llama.cpp's own graph:
    the buffer to the byte, give or take the tensors too small to matter (phase
    "replayed"); ``swa_full`` sizes the sliding-window cache as llama.cpp's flag does. For
    the others, an estimate: the peak of live tensors while the graph for
    ``shape.n_tokens`` tokens runs (the pp graph of sched_reserve, one output row per
    token), where two moments compete:

    - the output: f32 logits for every token (n_vocab x n_tokens) while the final norm's
      input and output (n_embd x n_tokens each) are still live;
    - attention without flash attention: the f32 KQ scores of all heads against every
      cell of a stream (n_kv x n_tokens x n_head) beside the f32 mask (n_kv x n_tokens)
      and the layer's activations (Q, K, V, residual, norm, attention output). With flash
      attention KQ is never materialised: only the mask, f32 and its f16 copy.
    """
    if not spec.vocab_size:
        return None
    t = shape.n_tokens
    n_kv = shape.cells_per_seq  # each stream attends over its own cells
    graph = graph_shape(spec, layout)
    if graph is not None:
        # The sliding-window cache: the window plus a micro-batch, padded (plan_kv's rule).
        n_kv_swa = n_kv
        if layout is not None and layout.has_swa and not swa_full:
            n_kv_swa = _pad(min(n_kv, layout.n_swa + shape.n_ubatch))
        replayed = replay_compute_bytes(
            graph, t, n_kv, flash_attn, shape.n_outputs or t, n_kv_swa=n_kv_swa,
            n_seq=shape.n_seq,
        )  # fmt: skip
        if replayed is not None:
            return ComputeEstimate(replayed, "replayed", replayed, replayed)
    t_per_seq = t // shape.n_seq
    n_embd_q = spec.n_heads * spec.head_dim
    n_embd_kv = spec.n_kv_heads * spec.head_dim
    output = t * spec.vocab_size * _F32 + 2 * t * spec.n_embd * _F32
    activations = t * _F32 * (spec.n_embd * 2 + n_embd_q * 3 + n_embd_kv * 2)
    mask = n_kv * t_per_seq * shape.n_seq * _F32
    if flash_attn:
        attention = mask + mask // _F32 * _F16 + activations
    else:
        scores = n_kv * t * spec.n_heads * _F32
        attention = scores + mask + activations
    peak = max(output, attention)
    return ComputeEstimate(
        bytes=round(peak * COMPUTE_FRAGMENTATION),
        phase="output" if output >= attention else "attention",
        output_phase_bytes=output,
        attention_phase_bytes=attention,
    )


def output_buffer_bytes(spec: ModelSpec, n_seq: int = 1) -> int | None:
    """llama.cpp's output buffer at context creation: one f32 logits row per sequence."""
    return spec.vocab_size * _F32 * n_seq if spec.vocab_size else None
