"""kv-calc against llama.cpp itself, on the real SmolLM2-135M.

llama.cpp reports buffer sizes in its load log as MiB with two decimals; that is the
resolution of every byte comparison here: our bytes, printed the way llama.cpp prints
them, must be the same string. Cell counts come from llama_n_ctx and are compared
exactly. Compute and weights buffers are estimates: within 3% across ctx 512-8192 and
ubatch 32-512, flash attention on and off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localllm.errors import InvalidArgument
from localllm.gguf.spec import read_model_spec
from localllm.plan.kvcalc import KVCalcRequest, kv_calc
from localllm.plan.memory import (
    compute_buffer_bytes,
    context_shape,
    kv_cache_bytes,
    kv_cells_per_seq,
    output_buffer_bytes,
)
from localllm.plan.verify import mib_text
from localllm.runtime import LoadOptions, load_model
from localllm.runtime.buffers import BufferMeasurements, ContextSettings, measure_buffers

pytestmark = pytest.mark.slow

S = ContextSettings
KV_SETTINGS = [
    S(2048),
    S(1000),
    S(4096, type_k="q8_0", type_v="q8_0"),
    S(4096, type_k="q4_0", type_v="q4_0"),
    S(2048, flash_attn=False),
    S(3000, type_k="bf16", type_v="bf16"),
    S(700, type_k="f32", type_v="f32"),
    S(3000, type_k="q5_1", type_v="q5_1"),
    S(1500, type_k="iq4_nl", type_v="iq4_nl"),
    S(4096, type_k="q4_1", type_v="q5_0"),
    S(5000, type_k="q8_0", flash_attn=False),  # a quantized K alone needs no flash attention
    S(1000, n_seq=3),
    S(4096, n_seq=4, type_k="q8_0", type_v="q8_0"),
    S(300, n_seq=7),
]
QUANTIZED_V_WITHOUT_FA = S(2048, type_v="q8_0", flash_attn=False)
COMPUTE_GRID = [
    S(ctx, n_batch=ubatch, n_ubatch=ubatch, flash_attn=fa)
    for fa in (True, False)
    for ctx in (512, 1024, 2048, 4096, 8192)
    for ubatch in (32, 64, 128, 256, 512)
]


# Contexts shorter than the micro-batch: Llama() caps n_batch at n_ctx, llama.cpp caps
# n_ubatch at n_batch, and the reserved graph shrinks with them.
CLAMPED = [S(100), S(300), S(100, n_seq=2), S(40, n_seq=3), S(256, flash_attn=False)]


@pytest.fixture(scope="module")
def measured(smollm2_path: Path) -> BufferMeasurements:
    """One model load, one llama.cpp context per setting (nothing is evaluated)."""
    return measure_buffers(
        smollm2_path, [*KV_SETTINGS, QUANTIZED_V_WITHOUT_FA, *COMPUTE_GRID, *CLAMPED]
    )


def by_settings(measured: BufferMeasurements):
    return {c.settings: c for c in measured.contexts}


@pytest.mark.parametrize("settings", KV_SETTINGS, ids=lambda s: repr(s)[16:-1])
def test_kv_cache_equals_llama_cpp(
    measured: BufferMeasurements, smollm2_path: Path, settings: ContextSettings
) -> None:
    spec = read_model_spec(smollm2_path)
    got = by_settings(measured)[settings]
    assert got.error is None and got.buffers is not None
    est = kv_cache_bytes(
        spec, settings.n_ctx, type_k=settings.type_k, type_v=settings.type_v, n_seq=settings.n_seq
    )
    assert est.cells == got.n_ctx  # llama_n_ctx: all streams
    assert kv_cells_per_seq(settings.n_ctx, settings.n_seq) == got.buffers.kv_cells  # one stream
    assert got.buffers.k_bytes is not None and got.buffers.v_bytes is not None
    assert got.buffers.kv_bytes is not None
    assert mib_text(est.k_bytes) == mib_text(got.buffers.k_bytes)
    assert mib_text(est.v_bytes) == mib_text(got.buffers.v_bytes)
    assert mib_text(est.total_bytes) == mib_text(got.buffers.kv_bytes)
    output = output_buffer_bytes(spec, settings.n_seq)
    assert output is not None and got.buffers.output_bytes is not None
    assert mib_text(output) == mib_text(got.buffers.output_bytes)


def test_quantized_v_without_flash_attention_fails_in_llama_cpp_and_in_kv_calc(
    measured: BufferMeasurements,
) -> None:
    got = by_settings(measured)[QUANTIZED_V_WITHOUT_FA]
    assert got.buffers is None
    assert got.error is not None and "quantized V cache requires flash_attn" in got.error
    with pytest.raises(InvalidArgument, match="quantized V cache") as trapped:
        kv_calc(KVCalcRequest(ctx=(2048,), type_v="q8_0", flash_attn=False))
    with pytest.raises(InvalidArgument) as runtime_error:
        LoadOptions(n_ctx=2048, type_v="q8_0", flash_attn=False).validate()
    assert str(trapped.value) == str(runtime_error.value)


def test_compute_buffer_within_3_percent(measured: BufferMeasurements, smollm2_path: Path) -> None:
    spec = read_model_spec(smollm2_path)
    got = by_settings(measured)
    misses = []
    for s in [*COMPUTE_GRID, *CLAMPED]:
        actual = got[s].buffers
        assert actual is not None and actual.compute_bytes is not None
        shape = context_shape(s.n_ctx, s.n_seq, n_ubatch=s.n_ubatch, n_batch=s.n_batch)
        est = compute_buffer_bytes(spec, shape, flash_attn=s.flash_attn)
        assert est is not None
        error = est.bytes / actual.compute_bytes - 1
        if abs(error) > 0.03:
            misses.append((s, f"{error:+.2%}"))
    assert not misses


def test_weights_buffer_equals_the_tensor_table(
    measured: BufferMeasurements, smollm2_path: Path
) -> None:
    spec = read_model_spec(smollm2_path)
    assert spec.weights_bytes is not None and measured.weights_bytes is not None
    assert mib_text(spec.weights_bytes) == mib_text(measured.weights_bytes)


@pytest.mark.parametrize(
    "options",
    [LoadOptions(n_ctx=1000), LoadOptions(n_ctx=4096, type_k="q4_0", type_v="q4_0")],
    ids=["ctx1000-f16", "ctx4096-q4_0"],
)
def test_chat_load_path_allocates_what_kv_calc_says(
    smollm2_path: Path, options: LoadOptions
) -> None:
    """The same check through runtime.load_model, the path chat takes."""
    spec = read_model_spec(smollm2_path)
    model = load_model(smollm2_path, options)
    try:
        est = kv_cache_bytes(spec, options.n_ctx, type_k=options.type_k, type_v=options.type_v)
        assert model.n_ctx == est.cells
        assert model.buffers.kv_bytes is not None
        assert mib_text(est.total_bytes) == mib_text(model.buffers.kv_bytes)
    finally:
        model.close()


def test_verify_command_end_to_end(store_with_smollm2: Path, cli) -> None:
    result = cli("kv-calc", "--ctx", "1000,4096", "--batch", "1,2", "--kv-type", "f16,q8_0",
                 "--verify", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    lines = json.loads(result.stdout)["verify"]
    assert {line["quantity"] for line in lines} == {
        "weights",
        "cells",
        "K",
        "V",
        "KV",
        "compute",
        "output",
    }
    assert len([line for line in lines if line["quantity"] == "KV"]) == 2 * 2 * 2
    for line in lines:
        assert line["error"] is None
        if line["quantity"] == "compute":
            assert abs(line["difference"]) <= 0.03 * line["actual"]
        else:
            assert line["exact"], line
    table = cli("kv-calc", "--ctx", "2048", "--verify")
    assert table.exit_code == 0, table.stderr
    assert "llama.cpp's own report" in table.stdout
    assert "equal at 0.01 MiB" in table.stdout and "exact" in table.stdout


def test_info_and_kv_calc_share_the_kv_function(store_with_smollm2: Path, cli) -> None:
    info = json.loads(cli("info", "--json").stdout)
    calc = json.loads(cli("kv-calc", "--ctx", str(info["n_ctx_train"]), "--json").stdout)
    assert info["kv_bytes_per_token_f16"] == calc["per_token_bytes"]
    assert info["kv_bytes_at_trained_context_f16"] == calc["rows"][0]["kv_bytes"]
