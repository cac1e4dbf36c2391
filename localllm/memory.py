"""KV cache, GQA/MQA/MHA, weights and compute-buffer arithmetic.

The KV figures follow llama.cpp's own allocation (src/llama-context.cpp,
src/llama-kv-cache.cpp): the context is padded to a multiple of 256 cells, and each
layer holds one K row and one V row per cell, of ``n_kv_heads * head_dim`` elements
stored in the cache type's blocks (ggml_row_size).
"""

from __future__ import annotations

from dataclasses import dataclass

from localllm.errors import InvalidArgument
from localllm.gguf_meta import ModelSpec

__all__ = [
    "KV_TYPE_BLOCKS",
    "KVCacheEstimate",
    "kv_bytes_per_token",
    "kv_cache_bytes",
    "kv_cells",
    "kv_row_bytes",
]

# ggml type -> (elements per block, bytes per block), as in ggml's type traits.
KV_TYPE_BLOCKS: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "iq4_nl": (32, 18),
}
# llama.cpp pads n_ctx to this many cells (GGML_PAD(n_ctx, 256) in llama-context.cpp).
KV_CELL_PADDING = 256


@dataclass(frozen=True)
class KVCacheEstimate:
    """What the KV cache of one context costs, split into K and V."""

    cells: int
    k_bytes: int
    v_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.k_bytes + self.v_bytes


def kv_cells(n_ctx: int, n_seq: int = 1) -> int:
    """Cells llama.cpp allocates for ``n_seq`` sequences of ``n_ctx`` tokens each."""
    if n_ctx <= 0:
        raise InvalidArgument(f"context size {n_ctx} must be a positive token count")
    if n_seq <= 0:
        raise InvalidArgument(f"batch {n_seq} must be at least 1 sequence")
    total = n_ctx * n_seq
    return -(-total // KV_CELL_PADDING) * KV_CELL_PADDING


def kv_row_bytes(n_elements: int, cache_type: str) -> int:
    """ggml_row_size: bytes of one row of ``n_elements`` in ``cache_type``."""
    try:
        block, block_bytes = KV_TYPE_BLOCKS[cache_type]
    except KeyError:
        raise InvalidArgument(
            f"unknown KV cache type {cache_type!r}; use one of {', '.join(KV_TYPE_BLOCKS)}"
        ) from None
    if n_elements % block:
        raise InvalidArgument(
            f"a KV row of {n_elements} elements is not a multiple of {cache_type}'s "
            f"block of {block}; use f16 for this model"
        )
    return n_elements // block * block_bytes


def kv_cache_bytes(
    spec: ModelSpec,
    n_ctx: int,
    *,
    type_k: str = "f16",
    type_v: str = "f16",
    n_seq: int = 1,
) -> KVCacheEstimate:
    """The KV cache llama.cpp allocates for ``spec`` at ``n_ctx`` tokens per sequence."""
    cells = kv_cells(n_ctx, n_seq)
    per_layer = spec.n_kv_heads_per_layer or (spec.n_kv_heads,) * spec.n_layers
    k_bytes = sum(kv_row_bytes(h * spec.head_dim, type_k) for h in per_layer) * cells
    v_bytes = sum(kv_row_bytes(h * spec.value_dim, type_v) for h in per_layer) * cells
    return KVCacheEstimate(cells=cells, k_bytes=k_bytes, v_bytes=v_bytes)


def kv_bytes_per_token(spec: ModelSpec, *, type_k: str = "f16", type_v: str = "f16") -> int:
    """K plus V bytes one token occupies across all layers (before cell padding)."""
    per_layer = spec.n_kv_heads_per_layer or (spec.n_kv_heads,) * spec.n_layers
    return sum(
        kv_row_bytes(h * spec.head_dim, type_k) + kv_row_bytes(h * spec.value_dim, type_v)
        for h in per_layer
    )
