"""llama.cpp's dry run (localllm.runtime.dry_run) against a full load and hand arithmetic.

A full load of the real SmolLM2 (runtime.buffers.measure_buffers: mmap, every buffer
allocated) is the reference for the buffer sizes the dry run reports; llama.cpp prints
those to 0.01 MiB, so they are compared there, and the byte-exact KV rebuild is held to
hand arithmetic from the published shapes. Header-only files at real scale (tests/
header_gguf.py: no weights, sparse) show the plan for models this machine could not
hold, each checked against arithmetic written out below.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import pytest
from support.gguf_files import write_header_gguf
from support.header_models import header_model, llama_header

from localllm.errors import InvalidArgument, ModelLoadError
from localllm.runtime.buffers import ContextSettings, measure_buffers
from localllm.runtime.dry_run import DryRunReport, DryRunSettings, plan_contexts

MIB = 1024 * 1024
GIB = 1024 * MIB
F16, F32 = 2, 4
Q8_0_ROW = 34 / 32  # bytes per element: blocks of 32 elements in 34 bytes
Q4_0_ROW = 18 / 32

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json): 30 layers, 9 heads, 3 KV heads,
# hidden 576 -> head dim 64, so 3 x 64 = 192 K (and V) elements per layer per cell.
SMOL_LAYERS, SMOL_KV_ROW, SMOL_VOCAB = 30, 192, 49152

# (n_ctx per sequence, n_seq, cache type, flash attention)
SMOL_GRID = [
    (512, 1, "f16", True),
    (4096, 1, "f16", True),
    (4096, 1, "f16", False),
    (512, 3, "f16", False),
    (4096, 3, "f16", True),
    (512, 1, "q8_0", True),
    (4096, 1, "q8_0", True),
    (4096, 3, "q8_0", True),
    (4096, 1, "q8_0", False),  # K quantized, V f16: the only quantized choice without FA
]


def _mib2(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / MIB, 2)


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol_pair(smollm2_path: Path) -> tuple[object, DryRunReport]:
    settings_real = [
        ContextSettings(n_ctx=c, n_seq=n, type_k=t, type_v=t if fa else "f16", flash_attn=fa)
        for c, n, t, fa in SMOL_GRID
    ]
    settings_dry = [
        DryRunSettings(
            c, n_seq=n, type_k=t, type_v=t if fa else "f16", flash_attn="on" if fa else "off"
        )
        for c, n, t, fa in SMOL_GRID
    ]
    return measure_buffers(smollm2_path, settings_real), plan_contexts(smollm2_path, settings_dry)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SMOL_GRID)), ids=[repr(g) for g in SMOL_GRID])
def test_dry_run_equals_a_full_load(smol_pair: tuple[object, DryRunReport], index: int) -> None:
    real_all, dry_all = smol_pair
    real = real_all.contexts[index]  # type: ignore[attr-defined]
    dry = dry_all.contexts[index]
    assert real.error is None and dry.error is None, (real.error, dry.error)
    assert dry.n_ctx == real.n_ctx
    (cache,) = dry.caches
    assert cache.kind == "kv" and cache.exact
    # llama.cpp prints every buffer to 0.01 MiB: the dry run's figures print the same.
    assert _mib2(dry.kv_bytes) == _mib2(real.buffers.kv_bytes)
    assert _mib2(cache.k_bytes) == _mib2(real.buffers.k_bytes)
    assert _mib2(cache.v_bytes) == _mib2(real.buffers.v_bytes)
    assert _mib2(dry.compute_bytes) == _mib2(real.buffers.compute_bytes)
    assert _mib2(dry.output_bytes) == _mib2(real.buffers.output_bytes)
    assert dry.flash_attn_used is real.buffers.flash_attn


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SMOL_GRID)), ids=[repr(g) for g in SMOL_GRID])
def test_smollm2_kv_rebuilt_to_the_byte(smol_pair: tuple[object, DryRunReport], index: int) -> None:
    n_ctx, n_seq, cache_type, fa = SMOL_GRID[index]
    dry = smol_pair[1].contexts[index]
    (cache,) = dry.caches
    # Each sequence gets its own stream of n_ctx cells (a multiple of 256 here).
    cells = n_ctx * n_seq
    k_per_element = F16 if cache_type == "f16" else Q8_0_ROW
    v_per_element = k_per_element if fa else F16
    assert (cache.cells, cache.streams, cache.layers) == (n_ctx, n_seq, SMOL_LAYERS)
    assert cache.k_bytes == SMOL_LAYERS * cells * SMOL_KV_ROW * k_per_element
    assert cache.v_bytes == SMOL_LAYERS * cells * SMOL_KV_ROW * v_per_element
    # One f32 logits row per sequence at context creation.
    assert dry.output_bytes == SMOL_VOCAB * F32 * n_seq


@pytest.mark.slow
def test_smollm2_weights_and_parameters(smollm2_path: Path) -> None:
    report = plan_contexts(smollm2_path, [])
    assert report.architecture == "llama"
    assert report.n_params == 134_515_008  # SmolLM2-135M's parameter count
    assert report.n_vocab == SMOL_VOCAB
    # Weights: the bytes of every tensor in the file's tensor table, as gguf-py reads it.
    tensors = gguf.GGUFReader(smollm2_path).tensors
    assert report.weights_bytes == sum(int(t.n_bytes) for t in tensors)
    assert report.n_params == sum(int(t.n_elements) for t in tensors)


# ------------------------------------------------------------------ header-only files


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("headers")
    names = (
        "llama-2-7b",
        "llama-2-13b",
        "llama-2-70b",
        "mistral-7b-v0.1",
        "mixtral-8x7b",
        "qwen2.5-7b",
        "gemma-2-9b",
        "gemma-3-4b",
        "phi-3-mini-4k",
        "deepseek-v2-lite",
        "mamba-2.8b",
        "jamba-v0.1",
    )
    return {name: write_header_gguf(root / f"{name}.gguf", name) for name in names}


def _one(path: Path, settings: DryRunSettings) -> tuple[DryRunReport, object]:
    report = plan_contexts(path, [settings])
    (plan,) = report.contexts
    assert plan.error is None, plan.error
    return report, plan


def test_header_only_files_are_sparse_at_full_size(headers: dict[str, Path]) -> None:
    path = headers["llama-2-70b"]
    stat = os.stat(path)
    # Q4_0 weights of a 70B: about 36 GiB of file, a few KiB of it on disk.
    assert stat.st_size > 35 * GIB
    assert stat.st_blocks * 512 < 1 * MIB


def test_llama_2_7b_plan_by_hand(headers: dict[str, Path]) -> None:
    report, plan = _one(headers["llama-2-7b"], DryRunSettings(4096))
    # KV: K and V, 32 layers, 4096 cells, 32 heads x 128 = 4096 elements, f16: 2 GiB exactly.
    assert plan.kv_bytes == 2 * 32 * 4096 * 4096 * F16 == 2 * GIB
    assert [(c.kind, c.layers, c.cells, c.exact) for c in plan.caches] == [("kv", 32, 4096, True)]
    # Weights: every matrix Q4_0 (18 bytes per 32 elements), norms f32.
    matrices = 2 * 32000 * 4096 + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    norms = (2 * 32 + 1) * 4096
    assert report.n_params == matrices + norms == 6_738_415_616
    assert report.weights_bytes == matrices * 18 // 32 + norms * F32
    # Compute holds at least the ubatch's f32 logits (512 x 32000); output one row.
    assert 512 * 32000 * F32 < plan.compute_bytes < 2 * 512 * 32000 * F32
    assert plan.output_bytes == 32000 * F32


@pytest.mark.parametrize(
    ("name", "layers", "kv_row"),
    [
        ("llama-2-13b", 40, 40 * 128),
        ("llama-2-70b", 80, 8 * 128),
        ("qwen2.5-7b", 28, 4 * 128),
        ("mixtral-8x7b", 32, 8 * 128),
        ("phi-3-mini-4k", 32, 32 * 96),
    ],
)
def test_full_attention_models_by_hand(
    headers: dict[str, Path], name: str, layers: int, kv_row: int
) -> None:
    for n_ctx, n_seq, cache_type, per_element in (
        (512, 1, "f16", F16),
        (4096, 1, "f16", F16),
        (512, 16, "q8_0", Q8_0_ROW),
        (4096, 1, "q4_0", Q4_0_ROW),
    ):
        settings = DryRunSettings(n_ctx, n_seq=n_seq, type_k=cache_type, type_v=cache_type)
        _, plan = _one(headers[name], settings)
        (cache,) = plan.caches  # phi3's declared window is ignored by llama.cpp
        assert (cache.kind, cache.layers, cache.streams) == ("kv", layers, n_seq)
        assert cache.k_bytes == cache.v_bytes == layers * n_ctx * n_seq * kv_row * per_element


def test_mistral_declared_window_gives_one_full_cache(headers: dict[str, Path]) -> None:
    # Mistral-7B v0.1 is a llama GGUF: llama.cpp does not apply its sliding window.
    _, plan = _one(headers["mistral-7b-v0.1"], DryRunSettings(32768))
    (cache,) = plan.caches
    assert cache.kind == "kv"
    assert plan.kv_bytes == 2 * 32 * 32768 * (8 * 128) * F16 == 4 * GIB


def test_gemma2_alternating_window(headers: dict[str, Path]) -> None:
    # 42 layers, every other one sliding (window 4096); 8 KV heads of key_length 256.
    _, plan = _one(headers["gemma-2-9b"], DryRunSettings(8192))
    full, swa = plan.caches
    assert (full.kind, full.layers, full.cells) == ("kv", 21, 8192)
    # The window plus one ubatch, padded to 256 cells: 4096 + 512.
    assert (swa.kind, swa.layers, swa.cells) == ("swa", 21, 4608)
    assert full.k_bytes == full.v_bytes == 21 * 8192 * 8 * 256 * F16
    assert swa.k_bytes == swa.v_bytes == 21 * 4608 * 8 * 256 * F16


@pytest.mark.parametrize("swa_full", [False, True])
def test_gemma3_interleaved_window(headers: dict[str, Path], swa_full: bool) -> None:
    # 34 layers: every 6th attends globally (5 layers), the rest to a 1024-token window;
    # 4 KV heads x key_length 256 = 1024 elements per layer per cell.
    _, plan = _one(headers["gemma-3-4b"], DryRunSettings(4096, swa_full=swa_full))
    full, swa = plan.caches
    swa_cells = 4096 if swa_full else 1024 + 512  # window + ubatch, already a multiple of 256
    assert (full.kind, full.layers, full.cells) == ("kv", 5, 4096)
    assert (swa.kind, swa.layers, swa.cells) == ("swa", 29, swa_cells)
    assert plan.kv_bytes == 2 * 1024 * F16 * (5 * 4096 + 29 * swa_cells)


def test_deepseek2_mla_caches_the_latent_only(headers: dict[str, Path]) -> None:
    # MLA: one K row of kv_lora_rank 512 + rope 64 per layer, no V at all.
    for cache_type, per_element in (("f16", F16), ("q8_0", Q8_0_ROW)):
        settings = DryRunSettings(4096, type_k=cache_type, type_v=cache_type)
        _, plan = _one(headers["deepseek-v2-lite"], settings)
        (cache,) = plan.caches
        assert cache.layers == 27 and cache.v_bytes == 0
        assert cache.k_bytes == 27 * 4096 * 576 * per_element


@pytest.mark.parametrize("n_seq", [1, 3])
def test_mamba_recurrent_state_per_sequence(headers: dict[str, Path], n_seq: int) -> None:
    # Per sequence and layer: conv state (d_conv - 1) x d_inner, ssm state d_state x d_inner.
    _, plan = _one(headers["mamba-2.8b"], DryRunSettings(4096, n_seq=n_seq))
    (state,) = plan.caches
    assert (state.kind, state.layers, state.cells, state.exact) == ("recurrent", 64, n_seq, True)
    assert state.r_bytes == n_seq * 64 * 3 * 5120 * F32
    assert state.s_bytes == n_seq * 64 * 16 * 5120 * F32
    assert state.k_bytes == state.v_bytes == 0
    # The state does not grow with the context.
    _, longer = _one(headers["mamba-2.8b"], DryRunSettings(32768, n_seq=n_seq))
    assert longer.kv_bytes == plan.kv_bytes


def test_jamba_hybrid_attention_and_state(headers: dict[str, Path]) -> None:
    # 32 layers: attention in 4 (every 8th from layer 4; 8 KV heads x 128), Mamba in 28.
    # llama.cpp's log says "32 layers" for the recurrent state: it counts them all.
    _, plan = _one(headers["jamba-v0.1"], DryRunSettings(4096, n_seq=2))
    attention, state = plan.caches
    assert (attention.kind, attention.layers, attention.streams) == ("kv", 4, 2)
    assert attention.k_bytes == attention.v_bytes == 4 * 2 * 4096 * 8 * 128 * F16
    assert (state.kind, state.layers, state.cells, state.exact) == ("recurrent", 28, 2, True)
    # d_inner 8192, d_state 16, d_conv 4
    assert state.r_bytes == 2 * 28 * 3 * 8192 * F32
    assert state.s_bytes == 2 * 28 * 16 * 8192 * F32


def test_flash_attention_off_materialises_the_scores(headers: dict[str, Path]) -> None:
    report = plan_contexts(
        headers["llama-2-7b"], [DryRunSettings(4096, flash_attn="off"), DryRunSettings(4096)]
    )
    off, on = report.contexts
    assert (off.flash_attn_used, on.flash_attn_used) == (False, True)
    # Without flash attention the f32 scores of all 32 heads over 4096 cells for the
    # 512-token ubatch are one tensor: 256 MiB, more than all of the FA buffer.
    scores = 4096 * 512 * 32 * F32
    assert off.compute_bytes > scores > on.compute_bytes
    assert off.kv_bytes == on.kv_bytes


def test_flash_attention_auto_resolves_on_cpu(headers: dict[str, Path]) -> None:
    report = plan_contexts(
        headers["llama-2-7b"],
        [
            DryRunSettings(4096, flash_attn="auto"),
            # A quantized V cache makes llama.cpp switch "auto" to on before anything else.
            DryRunSettings(4096, type_k="q8_0", type_v="q8_0", flash_attn="auto"),
        ],
    )
    plain, quantized = report.contexts
    assert plain.flash_attn_used is True and quantized.flash_attn_used is True
    assert quantized.kv_bytes == 2 * 32 * 4096 * 4096 * Q8_0_ROW


def test_a_70b_is_planned_from_its_header_alone(headers: dict[str, Path]) -> None:
    """No weights are read (the file is a header): how fast that is, is
    benchmarks/kv_calc_cold_start.py's to show, not a wall-clock bound here."""
    grid = [DryRunSettings(c, n_seq=b) for c in (512, 4096) for b in (1, 16)]
    report = plan_contexts(headers["llama-2-70b"], grid)
    assert all(p.error is None for p in report.contexts)
    # 70B at batch 16 x 4096: 16 streams of the 1.25 GiB single-sequence cache.
    assert report.contexts[3].kv_bytes == 16 * 2 * 80 * 4096 * 1024 * F16 == 20 * GIB


# ------------------------------------------------------------------------ refusals


def test_quantized_v_without_flash_attention_is_llama_cpps_refusal(
    headers: dict[str, Path],
) -> None:
    report = plan_contexts(
        headers["llama-2-7b"], [DryRunSettings(4096, type_v="q8_0", flash_attn="off")]
    )
    (plan,) = report.contexts
    assert plan.error is not None and "flash_attn" in plan.error
    assert plan.caches == () and plan.kv_bytes == 0


def test_block_not_dividing_the_head_dim_is_refused(tmp_path: Path) -> None:
    # Head dim 80 (640 / 8): q8_0's 32-element blocks do not divide it.
    model = llama_header(
        "head-80", n_layer=2, n_embd=640, n_head=8, n_head_kv=8, n_ff=1024, source="test"
    )
    path = write_header_gguf(tmp_path / "head80.gguf", model)
    report = plan_contexts(
        path,
        [
            DryRunSettings(512, type_k="q8_0", flash_attn="off"),
            DryRunSettings(512, type_k="q8_0", type_v="q8_0"),
            DryRunSettings(512),
        ],
    )
    off, on, f16 = report.contexts
    assert off.error is not None and "80" in off.error  # llama.cpp itself would accept it
    assert on.error is not None and "80" in on.error  # llama.cpp's own check
    assert f16.error is None and f16.kv_bytes == 2 * 2 * 512 * 640 * F16


def test_a_truncated_header_file_is_a_load_error(headers: dict[str, Path], tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(headers["llama-2-7b"], "rb") as src:
        truncated.write_bytes(src.read(1 * MIB))
    with pytest.raises(ModelLoadError, match=r"file bounds|incomplete|corrupt"):
        plan_contexts(truncated, [DryRunSettings(512)])


def test_missing_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such model file"):
        plan_contexts(tmp_path / "absent.gguf", [DryRunSettings(512)])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (DryRunSettings(0), "n_ctx 0"),
        (DryRunSettings(512, n_seq=300), "n_seq 300"),
        (DryRunSettings(512, type_k="q3_k"), "q3_k"),
        (DryRunSettings(512, flash_attn="yes"), "'yes'"),
    ],
)
def test_bad_settings_are_refused_before_loading(
    tmp_path: Path, settings: DryRunSettings, message: str
) -> None:
    path = write_header_gguf(tmp_path / "m.gguf", header_model("llama-2-7b"))
    with pytest.raises(InvalidArgument, match=message):
        plan_contexts(path, [settings])
