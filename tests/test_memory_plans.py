"""One plan for everyone: llama.cpp's dry run behind kv-calc, info and the memory check,
and the analytic model held to it on real-scale headers.

Header-only GGUFs with published shapes (tests/support/header_models.py: no weights, sparse files)
are dry-run by llama.cpp; the analytic plan (kv_layout + memory.plan_kv) must give every
cache to the byte. kv-calc, info and the pre-load memory check must report llama.cpp's
figures whenever a GGUF (or a hub file's header) is at hand, and say "estimate" otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
from support.gguf_files import write_header_gguf
from support.header_models import gemma_header

from localllm.gguf.header import read_header
from localllm.gguf.kv_layout import MemoryLayout, layout_from_header
from localllm.gguf.spec import read_model_spec
from localllm.plan.context_plan import DRY_RUN_SOURCE, ESTIMATE_SOURCE
from localllm.plan.facts import resolve_architecture
from localllm.plan.kvcalc import KVCalcRequest, kv_calc
from localllm.plan.memory import (
    compute_buffer_bytes,
    context_shape,
    layout_bytes_per_token,
    plan_kv,
)
from localllm.plan.preload import plan_load
from localllm.runtime.dry_run import DryRunModel, DryRunSettings

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
HEADERS = (
    "llama-2-7b", "llama-2-13b", "llama-2-70b", "mistral-7b-v0.1", "mixtral-8x7b",
    "qwen2.5-7b", "gemma-2-9b", "gemma-3-4b", "phi-3-mini-4k", "deepseek-v2-lite",
    "mamba-2.8b", "jamba-v0.1",
)  # fmt: skip
# (ctx per sequence, sequences, K type, V type, flash attention, ubatch, full-size SWA)
KV_GRID = [
    (512, 1, "f16", "f16", True, 512, False),
    (4096, 1, "f16", "f16", True, 32, False),
    (4096, 16, "q8_0", "q8_0", True, 512, False),
    (32768, 1, "f16", "f16", True, 2048, False),
    (32768, 1, "f16", "f16", True, 512, True),
    (5000, 2, "q4_0", "f16", False, 128, False),
    (8192, 1, "f16", "f16", False, 2048, True),
]


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan-headers")
    return {name: write_header_gguf(root / f"{name}.gguf", name) for name in HEADERS}


def _by_kind(caches: object) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for c in caches:  # type: ignore[attr-defined]
        out[c.kind] += c.bytes
    return {kind: n for kind, n in out.items() if n}


# ----------------------------------------------------------- analytic == llama.cpp


@pytest.mark.parametrize("name", HEADERS)
def test_real_scale_kv_is_exact_to_the_byte(headers: dict[str, Path], name: str) -> None:
    layout = layout_from_header(read_header(headers[name]).kv)
    assert layout.unmodelled is None
    with DryRunModel(headers[name]) as model:
        for ctx, n_seq, type_k, type_v, fa, ubatch, swa_full in KV_GRID:
            got = model.plan(DryRunSettings(
                ctx, n_seq=n_seq, n_batch=ubatch, n_ubatch=ubatch, type_k=type_k,
                type_v=type_v, flash_attn="on" if fa else "off", swa_full=swa_full,
            ))  # fmt: skip
            if type_k != type_v and layout.attention and all(a.v == 0 for a in layout.attention):
                # MLA keeps V inside the cached latent: llama.cpp wants one type for both.
                assert got.error is not None and "different K" in got.error
                continue
            assert got.error is None, got.error
            assert all(c.exact for c in got.caches)
            shape = context_shape(ctx, n_seq, n_ubatch=ubatch, n_batch=ubatch)
            mine = plan_kv(layout, ctx, n_seq, type_k=type_k, type_v=type_v, flash_attn=fa,
                           n_ubatch=shape.n_ubatch, swa_full=swa_full)  # fmt: skip
            point = (ctx, n_seq, type_k, type_v, fa, ubatch, swa_full)
            assert _by_kind(mine.caches) == _by_kind(got.caches), point
            assert mine.cells == got.n_ctx, point


# The compute buffer: llama.cpp's allocator replayed over its graph (graph_memory,
# graph_archs); Mamba-2.8B's graph is not replayed: it gets the estimate.
COMPUTE_GRID = [
    (ctx, n_seq, ubatch, fa)
    for ctx in (512, 4096, 32768)
    for n_seq in (1, 3)
    for ubatch in (32, 512, 2048)
    for fa in (True, False)
    if ctx * n_seq <= 65536
]
REPLAYED = (
    "llama-2-7b", "llama-2-13b", "llama-2-70b", "mistral-7b-v0.1", "qwen2.5-7b",
    "phi-3-mini-4k", "gemma-2-9b", "gemma-3-4b", "mixtral-8x7b", "deepseek-v2-lite",
    "jamba-v0.1",
)  # fmt: skip


def _compute_errors(path: Path, phase: str = "replayed") -> list[float]:
    spec = read_model_spec(path)
    layout = layout_from_header(read_header(path).kv)
    errors = []
    with DryRunModel(path) as model:
        for ctx, n_seq, ubatch, fa in COMPUTE_GRID:
            got = model.plan(DryRunSettings(ctx, n_seq=n_seq, n_batch=ubatch, n_ubatch=ubatch,
                                            flash_attn="on" if fa else "off"))  # fmt: skip
            shape = context_shape(ctx, n_seq, n_ubatch=ubatch, n_batch=ubatch)
            est = compute_buffer_bytes(spec, shape, flash_attn=fa, layout=layout)
            assert est is not None and got.compute_bytes
            assert (est.phase == "replayed") == (phase == "replayed"), (ctx, n_seq, ubatch, fa)
            errors.append(est.bytes / got.compute_bytes - 1)
    return errors


@pytest.mark.parametrize("name", REPLAYED)
def test_compute_replayed_to_a_tenth_of_a_percent(headers: dict[str, Path], name: str) -> None:
    """The allocator's walk over each architecture's graph (dense, fused QKV, interleaved
    sliding windows with soft-capping, experts, MLA, Mamba + attention hybrid) gives
    llama.cpp's compute buffer (which it prints to 0.01 MiB) for ctx 512-32768, ubatch
    32-2048, 1 or 3 sequences, FA on and off: well within the issue's 3%."""
    errors = _compute_errors(headers[name])
    assert max(abs(e) for e in errors) < 0.001, [f"{e:+.3%}" for e in errors]


def test_a_recurrent_models_compute_estimate_is_within_3_percent(
    headers: dict[str, Path],
) -> None:
    """Mamba: no attention, so the logits phase decides; the estimate (its 2% for
    allocator holes included) stays within the issue's 3% over the same grid."""
    errors = _compute_errors(headers["mamba-2.8b"], phase="estimate")
    assert max(abs(e) for e in errors) <= 0.03, [f"{e:+.2%}" for e in errors]


def test_experts_need_their_gguf_for_a_replay(headers: dict[str, Path]) -> None:
    """Without the file (a preset, flags) the experts' sizes are unknown: the estimate."""
    spec = replace(read_model_spec(headers["mixtral-8x7b"]), path=None)
    layout = layout_from_header(read_header(headers["mixtral-8x7b"]).kv)
    est = compute_buffer_bytes(spec, context_shape(4096), layout=layout)
    assert est is not None and est.phase != "replayed"


def test_the_sliding_window_cache_size_reaches_the_compute_buffer(
    headers: dict[str, Path],
) -> None:
    """Without FA, Gemma 3's sliding layers score only the window's cells: a full-size SWA
    cache (``swa_full``) grows the compute buffer exactly as llama.cpp's does."""
    path = headers["gemma-3-4b"]
    spec, layout = read_model_spec(path), layout_from_header(read_header(path).kv)
    shape = context_shape(32768, n_ubatch=512, n_batch=512)
    with DryRunModel(path) as model:
        for swa_full in (False, True):
            got = model.plan(DryRunSettings(32768, flash_attn="off", swa_full=swa_full))
            est = compute_buffer_bytes(spec, shape, flash_attn=False, layout=layout,
                                       swa_full=swa_full)  # fmt: skip
            assert est is not None and got.compute_bytes
            assert abs(est.bytes / got.compute_bytes - 1) < 0.001, swa_full


def test_the_layouts_say_what_each_model_keeps(headers: dict[str, Path]) -> None:
    def layout(name: str) -> MemoryLayout:
        return layout_from_header(read_header(headers[name]).kv)

    gemma3 = layout("gemma-3-4b")  # every 6th layer global: 5 of 34
    assert (gemma3.n_swa, sum(not a.swa for a in gemma3.attention)) == (1024, 5)
    gemma2 = layout("gemma-2-9b")  # every other layer slides over 4096 tokens
    assert (gemma2.n_swa, sum(a.swa for a in gemma2.attention)) == (4096, 21)
    assert not layout("mistral-7b-v0.1").has_swa  # a llama GGUF: llama.cpp ignores the window
    assert not layout("phi-3-mini-4k").has_swa  # llama.cpp disables Phi-3's window
    mla = layout("deepseek-v2-lite")  # the latent: kv_lora_rank 512 + rope 64, no V
    assert {(a.k, a.v) for a in mla.attention} == {(576, 0)}
    mamba = layout("mamba-2.8b")
    assert (mamba.attention, mamba.recurrent_layers) == ((), 64)
    assert (mamba.r_elements, mamba.s_elements) == (3 * 5120, 16 * 5120)
    jamba = layout("jamba-v0.1")
    assert [a.index for a in jamba.attention] == [4, 12, 20, 28]
    assert jamba.recurrent_layers == 28


def test_the_seed_models_per_token_figures(headers: dict[str, Path]) -> None:
    per_token = {
        name: layout_bytes_per_token(layout_from_header(read_header(headers[name]).kv))
        for name in ("llama-2-7b", "llama-2-13b", "llama-2-70b", "mistral-7b-v0.1")
    }
    # 2 (K and V) x layers x KV heads x 128 x 2 bytes
    assert per_token == {
        "llama-2-7b": 512 * KIB,  # 32 x 32
        "llama-2-13b": 800 * KIB,  # 40 x 40
        "llama-2-70b": 320 * KIB,  # 80 x 8 (2.5 MiB as MHA)
        "mistral-7b-v0.1": 128 * KIB,  # 32 x 8
    }


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-2-13b", "llama-2-70b", "mistral-7b"])
def test_seed_presets_equal_llama_cpps_allocation(headers: dict[str, Path], name: str) -> None:
    """The presets (no file: an estimate) give the KV and output llama.cpp allocates for
    the same shapes, at 512 and 4096 tokens, batch 1 and 16."""
    header = headers["mistral-7b-v0.1" if name == "mistral-7b" else name]
    request = KVCalcRequest(model=name, ctx=(512, 4096), batch=(1, 16))
    preset = kv_calc(request)
    from_file = kv_calc(KVCalcRequest(model=str(header), ctx=(512, 4096), batch=(1, 16)))
    assert preset.plan_source == ESTIMATE_SOURCE and from_file.plan_source == DRY_RUN_SOURCE
    for est, real in zip(preset.rows, from_file.rows, strict=True):
        assert (est.ctx, est.batch) == (real.ctx, real.batch)
        assert (est.cells, est.k_bytes, est.v_bytes) == (real.cells, real.k_bytes, real.v_bytes)
        assert est.output_bytes == real.output_bytes == 32000 * 4 * est.batch


# ------------------------------------------------------------ kv-calc's dry run


def test_kv_calc_of_a_file_is_llama_cpps_dry_run(headers: dict[str, Path]) -> None:
    path = headers["llama-2-70b"]
    result = kv_calc(KVCalcRequest(model=str(path), ctx=(4096,), batch=(1, 16)))
    with DryRunModel(path) as model:
        weights = model.weights_bytes
        plans = [model.plan(DryRunSettings(4096, n_seq=b)) for b in (1, 16)]
    assert result.plan_source == DRY_RUN_SOURCE and result.weights_bytes == weights
    for row, plan in zip(result.rows, plans, strict=True):
        assert row.source == DRY_RUN_SOURCE
        assert (row.kv_bytes, row.compute_bytes, row.output_bytes) == (
            plan.kv_bytes, plan.compute_bytes, plan.output_bytes,
        )  # fmt: skip
        assert row.total_bytes == weights + plan.kv_bytes + plan.compute_bytes + plan.output_bytes
    assert result.rows[1].kv_bytes == 16 * 2 * 80 * 4096 * 1024 * 2 == 20 * GIB


def test_kv_calc_shows_both_sliding_window_sizes(headers: dict[str, Path], cli) -> None:
    path = str(headers["gemma-3-4b"])
    window = json.loads(cli("kv-calc", path, "--ctx", "4096,32768", "--json").stdout)
    full = json.loads(cli("kv-calc", path, "--ctx", "4096,32768", "--swa-full", "--json").stdout)
    assert window["swa"]["commands_use"] == "window" and full["swa"]["commands_use"] == "full"
    assert window["swa"]["window"] == 1024 and window["swa"]["sliding_layers"] == 29
    row_per_cell = 2 * 4 * 256 * 2  # K and V, 4 KV heads x 256, f16: per layer and cell
    for w, f in zip(window["rows"], full["rows"], strict=True):
        ctx = w["ctx"]
        assert w["swa_cells"] == 1024 + 512 and f["swa_cells"] == ctx
        assert w["kv_bytes"] == row_per_cell * (5 * ctx + 29 * 1536)
        assert f["kv_bytes"] == row_per_cell * 34 * ctx
        assert w["other_swa_kv_bytes"] == f["kv_bytes"] and f["other_swa_kv_bytes"] == w["kv_bytes"]
        assert w["source"] == DRY_RUN_SOURCE
    table = cli("kv-calc", path, "--ctx", "32768")
    assert "other SWA" in table.stdout and "29 of 34 layers attend to 1024 tokens" in table.stdout


def test_estimate_flag_never_imports_llama_cpp(headers: dict[str, Path]) -> None:
    code = (
        "import sys\n"
        "from localllm.cli import main\n"
        f"sys.argv = ['localllm', 'kv-calc', {str(headers['gemma-3-4b'])!r}, '--estimate',"
        " '--ctx', '4096', '--json']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "sys.stderr.write('LLAMA_CPP_IMPORTED=%s' % ('llama_cpp' in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LLAMA_CPP_IMPORTED=False" in proc.stderr
    data = json.loads(proc.stdout)
    assert data["plan_source"] == ESTIMATE_SOURCE
    # The estimate of KV is exact here too: the same layout, the same arithmetic.
    assert data["rows"][0]["kv_bytes"] == 2 * 4 * 256 * 2 * (5 * 4096 + 29 * 1536)


def test_a_file_llama_cpp_cannot_load_falls_back_to_the_estimate(tmp_path: Path, cli) -> None:
    path = write_header_gguf(
        tmp_path / "bad.gguf", "llama-2-7b", overrides={"llama.rope.dimension_count": 64}
    )  # llama.cpp refuses: n_rot 64 != head dim 128
    result = cli("kv-calc", str(path), "--ctx", "4096", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["plan_source"] == ESTIMATE_SOURCE
    assert any("invalid n_rot" in w and "estimates" in w for w in data["warnings"])
    assert data["rows"][0]["kv_bytes"] == 2 * GIB


# --------------------------------------------------------------- memory check


def test_the_memory_check_plans_with_llama_cpps_dry_run(headers: dict[str, Path]) -> None:
    path = headers["gemma-3-4b"]
    spec = read_model_spec(path)
    plan = plan_load("gemma", spec, n_ctx=8192)
    assert plan.source == DRY_RUN_SOURCE
    row = kv_calc(KVCalcRequest(model=str(path), ctx=(8192,))).rows[0]
    assert plan.row.total_bytes == row.total_bytes
    full = plan_load("gemma", spec, n_ctx=8192, swa_full=True)
    assert full.row.kv_bytes == row.other_swa_kv_bytes > plan.row.kv_bytes


def test_resolve_architecture_keeps_the_files_layout(headers: dict[str, Path]) -> None:
    facts = resolve_architecture(str(headers["jamba-v0.1"]))
    assert facts.has_gguf and facts.memory_layout.recurrent_layers == 28
    assert not resolve_architecture("llama-2-7b").has_gguf


# ------------------------------------------------------------------- hub preview


def test_kv_calc_of_a_hub_file_dry_runs_its_header(tmp_path: Path, cli, monkeypatch) -> None:
    from support.hub_server import FakeHub

    tiny = gemma_header("tiny-gemma3", n_layer=6, n_embd=256, n_head=4, n_head_kv=2,
                        head_dim=64, n_ff=512, n_vocab=32000, n_ctx=8192, window=512)  # fmt: skip
    path = write_header_gguf(tmp_path / "tiny.gguf", tiny, weight_type="F16")
    hub = FakeHub()
    hub.add_repo("test-org/Tiny-GGUF", {"tiny-gemma3.F16.gguf": path})
    hub.start()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    try:
        result = cli("kv-calc", "hf://test-org/Tiny-GGUF/tiny-gemma3.F16.gguf", "--ctx", "4096",
                     "--json")  # fmt: skip
    finally:
        hub.stop()
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["source"] == "hub header" and data["plan_source"] == DRY_RUN_SOURCE
    local = kv_calc(KVCalcRequest(model=str(path), ctx=(4096,))).rows[0]
    row = data["rows"][0]
    assert (row["kv_bytes"], row["compute_bytes"]) == (local.kv_bytes, local.compute_bytes)
    # 1 global layer in 6 (pattern 6): 5 layers x (512 + 512 cells), 1 x 4096
    assert row["kv_bytes"] == 2 * 2 * 64 * 2 * (4096 + 5 * 1024)
    # The header only: a few MB at most of a file the size of its weights.
    served = sum(hub.bytes_served.values())
    assert 0 < served <= 8 * MIB < path.stat().st_size


# -------------------------------------------------------------------------- info


def test_info_shows_the_dry_run_plan_and_the_template(store_with_smollm2: Path, cli) -> None:
    data = json.loads(cli("info", "--json").stdout)
    memory = data["memory"]
    assert memory["source"] == DRY_RUN_SOURCE
    plans = {p["ctx"]: p for p in memory["plans"]}
    assert set(plans) == {4096, 8192}  # chat's default context, then the trained one
    # SmolLM2: 30 layers x 3 KV heads x 64, K and V, f16: 23040 bytes per token.
    assert plans[8192]["kv_bytes"] == data["kv_bytes_at_trained_context_f16"] == 23040 * 8192
    row = kv_calc(KVCalcRequest(ctx=(4096,))).rows[0]
    assert plans[4096]["total_bytes"] == row.total_bytes
    assert plans[4096]["compute_bytes"] == row.compute_bytes
    status = data["chat_template_status"]
    assert status["parses"] is True and status["error"] is None
    assert status["system_role"] is True and status["tools"] is False
    table = cli("info").stdout
    assert "memory at 4096" in table and "llama.cpp dry run" in table
    assert "parses; system role" in table


def test_info_flags_a_template_that_does_not_parse(tmp_path: Path, cli) -> None:
    path = write_header_gguf(
        tmp_path / "broken.gguf",
        gemma_header("broken", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=64,
                     n_ff=512, n_vocab=1000, n_ctx=2048, window=256),
        overrides={"tokenizer.chat_template": "{% for message in messages %}{{ message"},
    )  # fmt: skip
    result = cli("info", str(path), "--json")
    assert result.exit_code == 0, result.stderr
    status = json.loads(result.stdout)["chat_template_status"]
    assert status["parses"] is False and status["error"]
    assert "does not work" in cli("info", str(path)).stdout
