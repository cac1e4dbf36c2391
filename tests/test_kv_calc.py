"""``localllm kv-calc`` without llama.cpp: sources of architecture, sweeps, budget, traps, JSON.

The comparisons against llama.cpp's own allocations are in test_kv_calc_llama.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from support.gguf_files import write_gguf

from localllm.errors import InvalidArgument, ModelNotFound
from localllm.flags import parse_count_list, parse_kv_types, parse_size
from localllm.machine import available_memory_bytes
from localllm.plan.facts import ArchFlags, resolve_architecture
from localllm.plan.kvcalc import KVCalcRequest, kv_calc
from localllm.plan.memory import KV_TYPE_BLOCKS, kv_bytes_per_token, kv_cache_bytes, with_kv_heads
from localllm.runtime import LoadOptions
from localllm.store.catalog import load_catalog
from localllm.store.presets import PRESETS, llama_param_count

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
JSON_ROW_KEYS = {"ctx", "batch", "type_k", "type_v", "cells", "k_bytes", "v_bytes", "kv_bytes",
                 "mha_kv_bytes", "mqa_kv_bytes", "compute_bytes", "total_bytes"}  # fmt: skip


def run_json(cli, *args: str) -> dict:
    result = cli("kv-calc", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# ---------------------------------------------------------------------------- parsing


def test_parse_lists_sizes_and_types() -> None:
    assert parse_count_list("512, 2048,4k,512", "--ctx") == (512, 2048, 4096)
    assert parse_size("8GiB") == 8 * GIB
    assert parse_size("8 G") == 8 * GIB
    assert parse_size("16GB") == 16 * 10**9
    assert parse_size("512MiB") == 512 * MIB
    assert parse_kv_types("F16,q8_0") == ("f16", "q8_0")


@pytest.mark.parametrize("text", ["", "abc", "512,x", "-5", "0", "1.5"])
def test_parse_count_list_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument, match="--ctx"):
        parse_count_list(text, "--ctx")


@pytest.mark.parametrize("text", ["lots", "8XB", "0GiB", ""])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument, match="--budget"):
        parse_size(text)


# ------------------------------------------------------------------ architecture sources


def test_presets_need_no_file_and_agree_with_their_catalog_twins() -> None:
    catalog = load_catalog()
    for name, preset in PRESETS.items():
        spec = preset.spec
        assert spec.source == "preset" and spec.path is None
        if preset.catalog_twin is None:
            continue
        entry = catalog.lookup(preset.catalog_twin)
        assert entry is not None and entry.spec is not None, name
        twin = entry.spec
        for attr in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "n_embd", "n_ff",
                     "vocab_size", "n_ctx_train", "rope_freq_base", "sliding_window"):  # fmt: skip
            assert getattr(spec, attr) == getattr(twin, attr), (name, attr)


def test_llama3_70b_preset_facts() -> None:
    spec = PRESETS["llama-3-70b"].spec
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (80, 64, 8, 128)
    assert (spec.n_embd, spec.n_ff, spec.vocab_size, spec.n_ctx_train) == (
        8192,
        28672,
        128256,
        8192,
    )
    assert spec.rope_freq_base == 500000.0


def test_param_count_matches_the_catalog() -> None:
    # The catalog's n_params come from the published checkpoints.
    for alias in ("llama-2-7b-chat", "llama-2-13b-chat", "llama-2-70b-chat", "llama-3-8b-instruct"):
        entry = load_catalog().lookup(alias)
        assert entry is not None and entry.spec is not None
        assert llama_param_count(entry.spec) == entry.spec.n_params, alias


def test_gguf_header_gives_the_same_figures_as_the_preset(tmp_path: Path, cli) -> None:
    path = write_gguf(tmp_path / "llama-2-70b.gguf", "llama-2-70b")
    from_file = run_json(cli, str(path), "--ctx", "512,4096", "--batch", "1,16")
    from_preset = run_json(cli, "llama-2-70b", "--ctx", "512,4096", "--batch", "1,16")
    keys = ("ctx", "batch", "cells", "k_bytes", "v_bytes", "kv_bytes", "mha_kv_bytes")
    assert [[r[k] for k in keys] for r in from_file["rows"]] == [
        [r[k] for k in keys] for r in from_preset["rows"]
    ]
    assert from_file["source"] == "gguf"
    assert from_file["weights_bytes"] == 32 * 16 * 4 + 32 * 4  # the factory's two f32 tensors


def test_catalog_alias_without_its_file_uses_catalog_facts(cli) -> None:
    data = run_json(cli, "llama-2-13b-chat", "--ctx", "4096")
    entry = load_catalog().lookup("llama-2-13b-chat")
    assert entry is not None and entry.spec is not None
    quant = entry.quant(None)
    assert quant is not None
    assert data["source"] == "catalog"
    assert data["weights_bytes"] == quant.size_bytes
    assert data["per_token_bytes"] == kv_bytes_per_token(entry.spec) == 800 * KIB


def test_flags_alone_describe_a_model(cli) -> None:
    data = run_json(cli, "--layers", "32", "--heads", "32", "--kv-heads", "8",
                    "--head-dim", "128", "--ctx", "4096")  # fmt: skip
    row = data["rows"][0]
    assert data["source"] == "flags"
    assert row["kv_bytes"] == 32 * 2 * 8 * 128 * 2 * 4096
    assert data["gqa_saving_factor"] == 4
    assert row["compute_bytes"] is None and data["weights_bytes"] is None


def test_flags_override_a_preset(cli) -> None:
    data = run_json(cli, "llama-2-70b", "--kv-heads", "64", "--ctx", "4096")
    assert data["source"] == "preset+flags"
    assert data["rows"][0]["kv_bytes"] == 10 * GIB


def test_missing_flags_are_named(cli) -> None:
    result = cli("kv-calc", "--layers", "32", "--heads", "32")
    assert result.exit_code == 2
    assert "missing --head-dim" in result.error_line


def test_kv_heads_must_divide_heads(cli) -> None:
    result = cli("kv-calc", "--layers", "2", "--heads", "32", "--kv-heads", "5", "--head-dim", "64")
    assert result.exit_code == 2
    assert "--kv-heads 5 must divide --heads 32" in result.error_line


def test_unknown_model_is_one_line(cli) -> None:
    result = cli("kv-calc", "llama-9-1t")
    assert result.exit_code == ModelNotFound.exit_code
    assert "unknown model 'llama-9-1t'" in result.error_line


def test_default_model_renders_table_and_chart(store_with_smollm2: Path, cli) -> None:
    result = cli("kv-calc", "--ctx", "512,2048")
    assert result.exit_code == 0, result.stderr
    assert "smollm2-135m (gguf)" in result.stdout
    assert "GQA saves 3x" in result.stdout
    assert "KV cache against context" in result.stdout
    assert "weights 92.10 MiB" in result.stdout  # the weights line of the chart
    assert "45.00 MiB" in result.stdout  # 2048 f16 K+V, as llama.cpp prints it


# ------------------------------------------------------------------ sweeps and the JSON


def test_json_shape_and_sweep_order(cli) -> None:
    data = run_json(cli, "llama-2-7b", "--ctx", "512,2048", "--batch", "1,4",
                    "--kv-type", "f16,q8_0")  # fmt: skip
    assert set(data) >= {"model", "per_token_bytes", "gqa_saving_factor", "weights_bytes", "rows"}
    assert data["model"] == "llama-2-7b"
    rows = data["rows"]
    assert len(rows) == 2 * 2 * 2
    assert all(set(r) >= JSON_ROW_KEYS for r in rows)
    assert {(r["ctx"], r["batch"], r["type_k"]) for r in rows} == {
        (c, b, t) for c in (512, 2048) for b in (1, 4) for t in ("f16", "q8_0")
    }
    spec = PRESETS["llama-2-7b"].spec
    for r in rows:
        est = kv_cache_bytes(
            spec, r["ctx"], type_k=r["type_k"], type_v=r["type_v"], n_seq=r["batch"]
        )
        assert (r["cells"], r["k_bytes"], r["v_bytes"], r["kv_bytes"]) == (
            est.cells, est.k_bytes, est.v_bytes, est.total_bytes)  # fmt: skip
        assert r["total_bytes"] == (
            r["kv_bytes"] + r["compute_bytes"] + r["output_bytes"] + data["weights_bytes"]
        )


def test_type_k_and_type_v_apart(cli) -> None:
    data = run_json(cli, "llama-3-8b", "--ctx", "8192", "--type-k", "q8_0", "--type-v", "q4_0")
    row = data["rows"][0]
    spec = PRESETS["llama-3-8b"].spec
    assert (row["type_k"], row["type_v"]) == ("q8_0", "q4_0")
    assert row["k_bytes"] == kv_cache_bytes(spec, 8192, type_k="q8_0").k_bytes
    assert row["v_bytes"] == kv_cache_bytes(spec, 8192, type_v="q4_0").v_bytes


def test_lecture_figures_through_the_cli(cli) -> None:
    data = run_json(cli, "llama-2-70b", "--ctx", "512,4096", "--batch", "1,16")
    mha = {(r["ctx"], r["batch"]): r["mha_kv_bytes"] for r in data["rows"]}
    real = {(r["ctx"], r["batch"]): r["kv_bytes"] for r in data["rows"]}
    assert mha[(512, 1)] == 1.25 * GIB
    assert mha[(4096, 1)] == 10 * GIB
    assert mha[(4096, 16)] == 160 * GIB
    assert all(mha[k] == 8 * real[k] for k in mha)
    assert data["gqa_saving_factor"] == 8
    assert run_json(cli, "llama-2-7b", "--ctx", "512")["per_token_bytes"] == 512 * KIB
    assert run_json(cli, "llama-2-13b", "--ctx", "512")["per_token_bytes"] == 800 * KIB
    assert run_json(cli, "mistral-7b", "--ctx", "512")["gqa_saving_factor"] == 4
    assert run_json(cli, "llama-2-7b", "--ctx", "512")["gqa_saving_factor"] == 1


def test_mistral_v01_declared_window_is_not_applied(cli) -> None:
    """Mistral-7B v0.1 declares a 4096-token window, but it is a llama GGUF and llama.cpp's
    llama architecture attends to every cell: no sliding-window cache, a note says why."""
    result = cli("kv-calc", "mistral-7b", "--ctx", "2048,16384", "--json")
    data = json.loads(result.stdout)
    by_ctx = {r["ctx"]: r for r in data["rows"]}
    assert by_ctx[16384]["cells"] == 16384
    assert by_ctx[16384]["kv_bytes"] == 2 * 32 * 8 * 128 * 2 * 16384
    assert "swa_cells" not in by_ctx[16384] and "swa" not in data
    table = cli("kv-calc", "mistral-7b-instruct-v0.1", "--ctx", "16384")
    assert "SWA cells" not in table.stdout
    assert "sliding window" in table.stderr and "does not apply" in table.stderr


def test_no_swa_columns_for_models_without_a_window(cli) -> None:
    data = run_json(cli, "llama-2-7b", "--ctx", "4096")
    assert "swa_cells" not in data["rows"][0]


def test_verdict_against_available_memory() -> None:
    result = kv_calc(KVCalcRequest(model="llama-2-70b", ctx=(4096,), batch=(1, 16)))
    available = result.available_bytes
    assert available is not None and available > 0
    for row in result.rows:
        expected = ("fits" if row.total_bytes <= 0.85 * available
                    else "tight" if row.total_bytes <= available else "too big")  # fmt: skip
        assert row.verdict == expected


def test_available_memory_is_memavailable() -> None:
    with open("/proc/meminfo", encoding="ascii") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    kib = int(fields["MemAvailable"].split()[0])
    # Memory moves between the two reads; within 5% is the same figure.
    assert available_memory_bytes() == pytest.approx(kib * 1024, rel=0.05)


# ------------------------------------------------------------------------- the budget


def test_budget_finds_the_largest_context_that_fits_per_kv_type() -> None:
    budget = 8 * GIB
    result = kv_calc(KVCalcRequest(model="llama-2-7b", batch=(1, 2), budget_bytes=budget))
    assert {(b.type_k, b.batch) for b in result.budget} == {
        (t, n) for t in KV_TYPE_BLOCKS for n in (1, 2)
    }
    facts = resolve_architecture("llama-2-7b")
    for b in result.budget:
        if b.capped:  # stops at the trained context when the whole of it fits
            assert b.max_ctx == facts.spec.n_ctx_train
            continue
        assert b.max_ctx > 0 and b.max_ctx % 256 == 0
        assert b.total_bytes <= budget
        longer = kv_calc(
            KVCalcRequest(ctx=(b.max_ctx + 256,), batch=(b.batch,), kv_types=(b.type_k,)), facts
        )
        assert longer.rows[0].total_bytes > budget
    f16 = next(b for b in result.budget if b.type_k == "f16" and b.batch == 1)
    q4 = next(b for b in result.budget if b.type_k == "q4_0" and b.batch == 1)
    assert q4.max_ctx >= f16.max_ctx


def test_budget_past_the_trained_length_only_with_rope() -> None:
    facts = resolve_architecture("llama-2-7b")
    request = KVCalcRequest(kv_types=("q4_0",), budget_bytes=64 * GIB)
    capped = kv_calc(request, facts).budget[0]
    assert capped.capped and capped.max_ctx == 4096
    extended = kv_calc(replace(request, rope="yarn"), facts).budget[0]
    assert extended.max_ctx > 4096


def test_budget_smaller_than_the_weights(cli) -> None:
    data = run_json(cli, "llama-2-70b", "--budget", "8GiB", "--kv-type", "f16")
    assert data["budget"] == [{"type_k": "f16", "type_v": "f16", "batch": 1, "max_ctx": 0,
                               "kv_bytes": 0, "total_bytes": 0}]  # fmt: skip
    assert data["rows"] == []
    table = cli("kv-calc", "llama-2-70b", "--budget", "8GiB", "--kv-type", "f16")
    assert "none fits" in table.stdout and "weights alone" in table.stderr


def test_budget_skips_types_llama_cpp_would_refuse(cli) -> None:
    result = cli("kv-calc", "llama-2-7b", "--budget", "16GiB", "--flash-attn", "off", "--json")
    data = json.loads(result.stdout)
    assert {b["type_v"] for b in data["budget"]} == {"f16", "bf16", "f32"}


# ------------------------------------------------------------------------------ traps


def test_quantized_v_without_flash_attention_is_the_runtime_error(cli) -> None:
    with pytest.raises(InvalidArgument) as runtime_error:
        LoadOptions(type_v="q8_0", flash_attn=False).validate()
    result = cli("kv-calc", "llama-2-7b", "--kv-type", "q8_0", "--flash-attn", "off")
    assert result.exit_code == 2
    assert result.error_line == str(runtime_error.value)
    assert result.stdout == ""
    ok = cli("kv-calc", "llama-2-7b", "--type-k", "q8_0", "--flash-attn", "off")
    assert ok.exit_code == 0, ok.stderr  # a quantized K alone is fine


def test_head_dim_the_block_does_not_divide(cli) -> None:
    result = cli("kv-calc", "--layers", "40", "--heads", "32", "--kv-heads", "8",
                 "--head-dim", "80", "--kv-type", "q4_0")  # fmt: skip
    assert result.exit_code == 2
    line = result.error_line
    assert "head dim 80 is not a multiple of q4_0's block of 32" in line
    assert "use f16, bf16 or f32" in line


def test_head_dim_trap_on_a_gguf(tmp_path: Path, cli) -> None:
    path = write_gguf(tmp_path / "odd.gguf", "llama-2-7b",
                      overrides={"llama.attention.key_length": 80,
                                 "llama.attention.value_length": 80})  # fmt: skip
    result = cli("kv-calc", str(path), "--type-v", "q8_0")
    assert result.exit_code == 2
    assert "head dim 80 is not a multiple of q8_0's block of 32" in result.error_line


def test_context_past_trained_length_warns_and_points_to_rope(cli) -> None:
    result = cli("kv-calc", "llama-2-7b", "--ctx", "2048,8192")
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "8192 is past the trained 4096 tokens" in warnings[0]
    assert "--rope yarn" in warnings[0]
    with_rope = cli("kv-calc", "llama-2-7b", "--ctx", "8192", "--rope", "yarn")
    assert with_rope.exit_code == 0
    assert "warning:" not in with_rope.stderr
    assert "YaRN" in with_rope.stderr  # the RoPE plan's own sentence
    inside = cli("kv-calc", "llama-2-7b", "--ctx", "4096")
    assert "warning:" not in inside.stderr


def test_unknown_rope_method(cli) -> None:
    result = cli("kv-calc", "llama-2-7b", "--ctx", "8192", "--rope", "magic")
    assert result.exit_code == 2
    assert "unknown RoPE method 'magic'" in result.error_line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--kv-type", "q3_k"], "unknown KV cache type 'q3_k' (--kv-type)"),
        (["--type-v", "int8"], "unknown KV cache type 'int8' (--type-v)"),
        (["--ctx", "4k,lots"], "--ctx '4k,lots'"),
        (["--batch", "0"], "--batch '0': 0 must be at least 1"),
        (["--budget", "lots"], "--budget 'lots' is not a size"),
        (["--flash-attn", "maybe"], "--flash-attn 'maybe': use on or off"),
        (["--ubatch", "0"], "--ubatch 0 is out of range; use 1 to 16777216"),
    ],
)
def test_bad_flag_values_are_one_line_errors(cli, args: list[str], expected: str) -> None:
    result = cli("kv-calc", "llama-2-7b", *args)
    assert result.exit_code == 2
    assert expected in result.error_line


def test_verify_needs_a_file(cli) -> None:
    result = cli("kv-calc", "llama-2-70b", "--verify")
    assert result.exit_code == 2
    assert "--verify loads the model" in result.error_line
    not_here = cli("kv-calc", "llama-2-7b-chat", "--verify")
    assert not_here.exit_code == 2
    assert "no GGUF file of llama-2-7b-chat here" in not_here.error_line


def test_flag_overrides_cannot_be_verified(store_with_smollm2: Path, cli) -> None:
    result = cli("kv-calc", "smollm2-135m", "--kv-heads", "9", "--verify")
    assert result.exit_code == 2
    assert "drop --layers" in result.error_line


# ------------------------------------------------------------------------ cold start


@pytest.mark.parametrize(
    ("model", "flags", "imported"),
    [("llama-2-70b", [], False), ("SMOLLM2", ["--estimate"], False), ("SMOLLM2", [], True)],
)
def test_kv_calc_imports_llama_cpp_only_to_dry_run_a_gguf(
    store_with_smollm2: Path, model: str, flags: list[str], imported: bool
) -> None:
    """A preset is arithmetic (no llama_cpp, a cold start in well under a second); a GGUF
    is dry-run by llama.cpp unless --estimate asks for the arithmetic alone."""
    ref = (
        str(store_with_smollm2 / "SmolLM2-135M-Instruct.Q4_1.gguf") if model == "SMOLLM2" else model
    )
    code = (
        "import sys\n"
        "from localllm.cli import main\n"
        f"sys.argv = ['localllm', 'kv-calc', {ref!r}, '--ctx', '512,4096', '--json', *{flags!r}]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "sys.stderr.write('LLAMA_CPP_IMPORTED=%s' % ('llama_cpp' in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"LLAMA_CPP_IMPORTED={imported}" in proc.stderr
    data = json.loads(proc.stdout)
    assert data["rows"]
    assert data["plan_source"] == ("llama.cpp dry run" if imported else "estimate")


def test_flag_overrides_keep_mha_arithmetic() -> None:
    facts = resolve_architecture("llama-2-70b", ArchFlags(kv_heads=1))
    spec = facts.spec
    assert spec.attention_kind == "MQA"
    assert kv_bytes_per_token(spec) * 64 == kv_bytes_per_token(with_kv_heads(spec, 64))
