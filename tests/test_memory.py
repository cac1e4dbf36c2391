"""KV-cache, GQA and compute-buffer arithmetic: properties (hypothesis) and the lecture's figures.

The figures llama.cpp itself reports are checked in test_kv_calc_llama.py; here the
arithmetic is held to its own invariants and to the published architectures.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from localllm.errors import InvalidArgument
from localllm.gguf.ggml_types import kv_type_is_quantized
from localllm.gguf.spec import ModelSpec
from localllm.plan.memory import (
    KV_CELL_PADDING,
    KV_TYPE_BLOCKS,
    check_kv_types,
    compute_buffer_bytes,
    context_shape,
    kv_bytes_per_token,
    kv_cache_bytes,
    kv_cells,
    kv_cells_per_seq,
    kv_row_bytes,
    output_buffer_bytes,
    swa_kv_cells,
    with_kv_heads,
)
from localllm.store.presets import PRESETS

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
QUANT_TYPES = [t for t in KV_TYPE_BLOCKS if kv_type_is_quantized(t)]


@st.composite
def specs(draw: st.DrawFn) -> ModelSpec:
    """Llama-family shapes: KV heads divide the query heads, head dims a multiple of 32."""
    kv_heads = draw(st.integers(1, 16))
    group = draw(st.integers(1, 8))
    head_dim = 32 * draw(st.integers(1, 8))
    heads = kv_heads * group
    return ModelSpec(
        name="hypothesis",
        architecture="llama",
        n_layers=draw(st.integers(1, 96)),
        n_heads=heads,
        n_kv_heads=kv_heads,
        head_dim=head_dim,
        n_embd=heads * head_dim,
        n_ctx_train=4096,
        vocab_size=draw(st.integers(256, 200_000)),
    )


ctxs = st.integers(1, 200_000)
seqs = st.integers(1, 64)
kv_types = st.sampled_from(list(KV_TYPE_BLOCKS))


# ------------------------------------------------------------------------------- cells


@given(ctxs, seqs)
def test_cells_are_padded_per_sequence_and_never_short(n_ctx: int, n_seq: int) -> None:
    per_seq = kv_cells_per_seq(n_ctx, n_seq)
    assert per_seq % KV_CELL_PADDING == 0
    assert n_ctx <= per_seq < n_ctx + 2 * KV_CELL_PADDING
    assert kv_cells(n_ctx, n_seq) == per_seq * n_seq


@given(ctxs)
def test_one_sequence_pads_the_context_to_256(n_ctx: int) -> None:
    cells = kv_cells(n_ctx)
    assert cells % 256 == 0 and cells - 256 < n_ctx <= cells


@pytest.mark.parametrize("bad", [0, -1])
def test_cells_reject_non_positive_sizes(bad: int) -> None:
    with pytest.raises(InvalidArgument, match="context size"):
        kv_cells(bad)
    with pytest.raises(InvalidArgument, match="batch"):
        kv_cells(512, bad)


# ------------------------------------------------------------------------------- bytes


@given(specs(), ctxs, seqs, kv_types, kv_types)
def test_kv_bytes_are_cells_times_bytes_per_token(
    spec: ModelSpec, n_ctx: int, n_seq: int, type_k: str, type_v: str
) -> None:
    est = kv_cache_bytes(spec, n_ctx, type_k=type_k, type_v=type_v, n_seq=n_seq)
    per_token = kv_bytes_per_token(spec, type_k=type_k, type_v=type_v)
    assert est.total_bytes == est.k_bytes + est.v_bytes == est.cells * per_token
    assert est.cells == kv_cells(n_ctx, n_seq)


@given(specs(), kv_types)
def test_one_row_per_layer_per_cell_in_ggml_blocks(spec: ModelSpec, cache_type: str) -> None:
    block, block_bytes = KV_TYPE_BLOCKS[cache_type]
    row = spec.n_kv_heads * spec.head_dim
    per_token = kv_bytes_per_token(spec, type_k=cache_type, type_v=cache_type)
    assert per_token == 2 * spec.n_layers * (row // block) * block_bytes


@given(specs(), st.integers(1, 50_000), st.sampled_from(QUANT_TYPES))
def test_quantized_cache_is_smaller_than_f16_by_its_block_ratio(
    spec: ModelSpec, n_ctx: int, cache_type: str
) -> None:
    block, block_bytes = KV_TYPE_BLOCKS[cache_type]
    f16 = kv_cache_bytes(spec, n_ctx).total_bytes
    quant = kv_cache_bytes(spec, n_ctx, type_k=cache_type, type_v=cache_type).total_bytes
    assert quant * (2 * block) == f16 * block_bytes


@given(specs(), st.integers(1, 50_000), seqs)
def test_gqa_saving_is_the_query_to_kv_head_ratio(spec: ModelSpec, n_ctx: int, n_seq: int) -> None:
    gqa = kv_cache_bytes(spec, n_ctx, n_seq=n_seq).total_bytes
    mha = kv_cache_bytes(with_kv_heads(spec, spec.n_heads), n_ctx, n_seq=n_seq).total_bytes
    mqa = kv_cache_bytes(with_kv_heads(spec, 1), n_ctx, n_seq=n_seq).total_bytes
    assert mha * spec.n_kv_heads == gqa * spec.n_heads
    assert mqa * spec.n_kv_heads == gqa
    assert mqa <= gqa <= mha


@given(specs(), st.integers(1, 50_000), st.integers(1, 50_000))
def test_kv_bytes_grow_with_context(spec: ModelSpec, a: int, b: int) -> None:
    small, large = sorted((a, b))
    assert kv_cache_bytes(spec, small).total_bytes <= kv_cache_bytes(spec, large).total_bytes


def test_per_layer_kv_heads_are_summed_layer_by_layer() -> None:
    spec = replace(PRESETS["llama-2-7b"].spec, n_layers=4, n_kv_heads_per_layer=(32, 8, 8, 1))
    per_token = kv_bytes_per_token(spec)
    assert per_token == 2 * 2 * 128 * (32 + 8 + 8 + 1)


@pytest.mark.parametrize("cache_type", QUANT_TYPES)
def test_head_dim_the_block_does_not_divide_is_refused(cache_type: str) -> None:
    spec = replace(PRESETS["llama-2-7b"].spec, head_dim=80, n_embd=32 * 80)
    with pytest.raises(InvalidArgument, match=f"head dim 80 is not a multiple of {cache_type}"):
        check_kv_types(spec, cache_type, "f16")
    with pytest.raises(InvalidArgument, match="head dim 80"):
        kv_cache_bytes(spec, 512, type_v=cache_type)
    check_kv_types(spec, "f16", "bf16")  # float types have one-element blocks


def test_head_dim_is_checked_per_head_not_per_row() -> None:
    # 8 KV heads of 80 make a 640-element row (a multiple of 32), but each head of 80 is not.
    spec = replace(PRESETS["mistral-7b"].spec, head_dim=80)
    with pytest.raises(InvalidArgument, match="head dim 80"):
        check_kv_types(spec, "q8_0", "q8_0")


def test_unknown_cache_type_names_the_choices() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown KV cache type 'q3_k'.*q8_0"):
        kv_row_bytes(128, "q3_k")


# --------------------------------------------------------------- the lecture's figures


def test_llama2_7b_costs_512_kib_per_token() -> None:
    assert kv_bytes_per_token(PRESETS["llama-2-7b"].spec) == 512 * KIB


def test_llama2_13b_costs_800_kib_per_token() -> None:
    assert kv_bytes_per_token(PRESETS["llama-2-13b"].spec) == 800 * KIB


def test_llama2_70b_counted_as_mha() -> None:
    spec = PRESETS["llama-2-70b"].spec
    mha = with_kv_heads(spec, spec.n_heads)
    assert kv_bytes_per_token(mha) == 2.5 * MIB
    assert kv_cache_bytes(mha, 512).total_bytes == 1.25 * GIB
    assert kv_cache_bytes(mha, 4096).total_bytes == 10 * GIB
    assert kv_cache_bytes(mha, 4096, n_seq=16).total_bytes == 160 * GIB


def test_llama2_70b_with_its_8_kv_heads_is_8x_less() -> None:
    spec = PRESETS["llama-2-70b"].spec
    assert spec.n_kv_heads == 8
    mha = with_kv_heads(spec, spec.n_heads)
    for n_ctx, n_seq in ((512, 1), (4096, 1), (4096, 16)):
        real = kv_cache_bytes(spec, n_ctx, n_seq=n_seq).total_bytes
        assert real * 8 == kv_cache_bytes(mha, n_ctx, n_seq=n_seq).total_bytes
    assert kv_cache_bytes(spec, 4096, n_seq=16).total_bytes == 20 * GIB


@pytest.mark.parametrize(("name", "factor"), [("llama-2-70b", 8), ("mistral-7b", 4),
                                              ("llama-2-7b", 1), ("llama-3-8b", 4)])  # fmt: skip
def test_gqa_saving_factors(name: str, factor: int) -> None:
    spec = PRESETS[name].spec
    mha = kv_bytes_per_token(with_kv_heads(spec, spec.n_heads))
    assert mha == factor * kv_bytes_per_token(spec)


# ---------------------------------------------------------------------- other buffers


def test_sliding_window_bound_is_window_plus_ubatch_padded() -> None:
    # llama_kv_cache_iswa: SWA layers keep min(n_ctx_seq, n_swa + n_ubatch) cells, padded.
    assert swa_kv_cells(32768, 1, 4096, 512) == 4608
    assert swa_kv_cells(2048, 1, 4096, 512) == 2048
    assert swa_kv_cells(8192, 4, 4096, 512) == 4 * 4608


@given(ctxs, seqs, st.integers(1, 4096), st.integers(1, 4096))
def test_context_shape_follows_the_batch_clamps(
    n_ctx: int, n_seq: int, n_ubatch: int, n_batch: int
) -> None:
    shape = context_shape(n_ctx, n_seq, n_ubatch=n_ubatch, n_batch=n_batch)
    assert shape.n_batch == min(n_ctx * n_seq, n_batch)
    assert shape.n_ubatch == min(shape.n_batch, n_ubatch)
    assert shape.n_tokens % n_seq == 0
    assert shape.n_tokens - n_seq < min(shape.cells, shape.n_ubatch) <= shape.n_tokens


@given(specs(), st.integers(1, 20_000), st.integers(1, 2048))
def test_compute_buffer_grows_with_ubatch_and_flash_attention_never_costs_more(
    spec: ModelSpec, n_ctx: int, n_ubatch: int
) -> None:
    small = context_shape(n_ctx, n_ubatch=max(1, n_ubatch // 2), n_batch=4096)
    large = context_shape(n_ctx, n_ubatch=n_ubatch, n_batch=4096)
    for flash in (True, False):
        a, b = (
            compute_buffer_bytes(spec, small, flash_attn=flash),
            compute_buffer_bytes(spec, large, flash_attn=flash),
        )
        assert a is not None and b is not None and a.bytes <= b.bytes
    with_fa = compute_buffer_bytes(spec, large, flash_attn=True)
    without = compute_buffer_bytes(spec, large, flash_attn=False)
    assert with_fa is not None and without is not None and with_fa.bytes <= without.bytes


def test_compute_buffer_needs_a_vocabulary() -> None:
    spec = replace(PRESETS["llama-2-7b"].spec, vocab_size=None)
    assert compute_buffer_bytes(spec, context_shape(512)) is None
    assert output_buffer_bytes(spec) is None


def test_output_buffer_is_one_logits_row_per_sequence() -> None:
    spec = PRESETS["llama-3-8b"].spec
    assert output_buffer_bytes(spec, 3) == 3 * 128256 * 4
