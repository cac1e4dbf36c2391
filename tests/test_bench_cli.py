"""localllm bench through the real CLI: short real runs on SmolLM2, every format, errors.

No speed thresholds: figures must be positive and records complete. What the records
say about the model is checked against llama.cpp's own llama-bench when it is built.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from localllm.bench.record import EXTRA_FIELDS, LLAMA_BENCH_FIELDS
from localllm.catalog import load_catalog

REPO = Path(__file__).resolve().parents[1]
NATIVE_BENCH = REPO / "benchmarks" / "build" / "bin" / "llama-bench"
TINY = ["-p", "16", "-n", "4", "-r", "2", "-t", "1"]
SMOLLM2_SHA256 = load_catalog().lookup("smollm2-135m").quant(None).sha256  # the verified file


@pytest.fixture(scope="module")
def bandwidth_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One measured bandwidth for the module's runs (it is cached per machine anyway)."""
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture
def bench_env(
    store_with_smollm2: Path, bandwidth_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    monkeypatch.setenv("LOCALLLM_CACHE", str(bandwidth_cache))
    return store_with_smollm2


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-r", "0"], "repetitions 0 must be at least 1"),
        (["-p", "-1"], "-p '-1' is not a count"),
        (
            ["--kv-type", "q3_k"],
            "unknown KV cache type 'q3_k' (--kv-type); use one of f16, bf16, f32",
        ),
        (["-o", "xml"], "unknown output format 'xml'; use one of md, csv, json, jsonl"),
        (["-fa", "maybe"], "unknown flash attention mode 'maybe'"),
        (["-p", "64", "--ctx", "32"], "--ctx 32 is too small"),
        (["-pg", "512"], "--pg '512' must be two token counts"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, args: list[str], message: str) -> None:
    result = cli("bench", *args)
    assert result.exit_code == 2
    assert message in result.error_line
    assert result.stdout == ""


def test_unknown_rope_method_is_one_line(cli, bench_env: Path) -> None:
    result = cli("bench", "--ctx", "20000", "-p", "8", "-n", "0", "--rope", "magic")
    assert result.exit_code == 2
    assert "unknown RoPE method 'magic'" in result.error_line


def test_missing_model_is_one_line(cli, tmp_path: Path) -> None:
    result = cli("bench", str(tmp_path / "nope.gguf"))
    assert result.exit_code != 0
    assert "no such model file" in result.error_line


# ------------------------------------------------------------------------ real runs


@pytest.mark.slow
def test_json_run_gives_positive_figures_and_complete_records(cli, bench_env: Path) -> None:
    result = cli("bench", *TINY, "-o", "json")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [(r["n_prompt"], r["n_gen"]) for r in records] == [(16, 0), (0, 4)]
    for r in records:
        assert list(r)[: len(LLAMA_BENCH_FIELDS)] == list(LLAMA_BENCH_FIELDS)
        assert set(EXTRA_FIELDS) <= set(r)
        assert r["avg_ts"] > 0 and r["avg_ns"] > 0
        assert len(r["samples_ns"]) == len(r["samples_ts"]) == 2
        assert all(x > 0 for x in r["samples_ts"])
        assert r["n_threads"] == 1 and r["n_batch"] == 2048 and r["flash_attn"] == -1
        assert r["n_ctx"] == r["n_prompt"] + r["n_gen"]
        assert r["model_sha256"] == SMOLLM2_SHA256
        for key in ("peak_rss_bytes", "weights_bytes", "kv_bytes", "compute_bytes"):
            assert r[key] > 0, key
        assert r["bandwidth_bytes_per_s"] > 0
        assert r["build_commit"] and r["cpu_info"] and r["backends"]
        assert r["warmup"] is True and r["repetitions"] == 2
    pp, tg = records
    assert pp["roofline_fraction"] is None
    assert tg["roofline_fraction"] > 0
    # bytes per generated token: the (tied) weights plus the mean KV attended
    assert tg["tg_bytes_per_token"] > tg["model_size"]
    assert tg["roofline_ts"] == pytest.approx(
        tg["bandwidth_bytes_per_s"] / tg["tg_bytes_per_token"], rel=1e-3
    )


@pytest.mark.slow
@pytest.mark.skipif(not NATIVE_BENCH.is_file(), reason="native llama-bench not built")
def test_model_fields_match_native_llama_bench(cli, bench_env: Path, smollm2_path: Path) -> None:
    from localllm.runtime.library import choose_repack

    # Native llama-bench crashes on AMX CPUs unless told --repack 0, which localllm's
    # default chooses there by itself; both sides must run with the same value.
    repack = "1" if choose_repack(None).repack else "0"
    native = subprocess.run(
        [str(NATIVE_BENCH), "-m", str(smollm2_path), "-p", "8", "-n", "0", "-r", "1",
         "-t", "1", "--repack", repack, "-o", "json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    theirs = json.loads(native.stdout)[0]
    ours = json.loads(cli("bench", "-p", "8", "-n", "0", "-r", "1", "-t", "1", "-o", "json").stdout)
    ours = ours[0]
    assert set(theirs) <= set(ours)
    same = [k for k in theirs if k not in ("build_commit", "build_number", "model_filename",
                                           "test_time", "avg_ns", "stddev_ns", "avg_ts",
                                           "stddev_ts", "samples_ns", "samples_ts")]  # fmt: skip
    assert {k: ours[k] for k in same} == {k: theirs[k] for k in same}
    assert ours["build_commit"].startswith(theirs["build_commit"])
    assert [type(ours[k]) for k in theirs] == [type(theirs[k]) for k in theirs]


@pytest.mark.slow
def test_jsonl_sweep_streams_one_record_per_test(cli, bench_env: Path) -> None:
    result = cli("bench", "-p", "8,16", "-n", "0", "-r", "1", "-t", "1,2", "-o", "jsonl")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["n_threads"], r["n_prompt"]) for r in records] == [(1, 8), (1, 16), (2, 8), (2, 16)]
    assert all(r["avg_ts"] > 0 for r in records)


@pytest.mark.slow
def test_csv_and_markdown_runs(cli, bench_env: Path) -> None:
    args = ["-p", "8", "-n", "2", "-r", "1", "-t", "1", "--pg", "8,2", "-b", "4"]
    result = cli("bench", *args, "-o", "csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["n_prompt"], r["n_gen"], r["n_batch"]) for r in rows] == [
        ("8", "0", "4"), ("0", "2", "4"), ("8", "2", "4"),
    ]  # fmt: skip
    assert all(float(r["avg_ts"]) > 0 for r in rows)
    assert list(rows[0])[: len(LLAMA_BENCH_FIELDS)] == list(LLAMA_BENCH_FIELDS)

    result = cli("bench", *args)  # md is the default, as in llama-bench
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "| model " in lines[0] and "n_batch" in lines[0] and "t/s" in lines[0]
    tests = [line.split("|")[-4].strip() for line in lines[2:5]]
    assert tests == ["pp8", "tg2", "pp8+tg2"]
    assert any(line.startswith("build: ") for line in lines)
    assert SMOLLM2_SHA256 in result.stdout


@pytest.mark.slow
def test_more_threads_than_cores_warns_but_runs(cli, bench_env: Path) -> None:
    too_many = len(os.sched_getaffinity(0)) + 1
    result = cli("bench", "-p", "8", "-n", "0", "-r", "1", "-t", str(too_many), "-o", "jsonl")
    assert result.exit_code == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"-t {too_many} is more threads" in warning[0]
    assert json.loads(result.stdout)["n_threads"] == too_many


@pytest.mark.slow
def test_context_past_training_applies_the_rope_plan(cli, bench_env: Path) -> None:
    result = cli("bench", "-p", "8", "-n", "0", "-r", "1", "-t", "1", "--ctx", "9000",
                 "--rope", "linear", "-o", "json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)[0]
    assert record["rope"] == "linear" and record["n_ctx"] == 9000
    assert record["n_ctx_cells"] >= 9000
    assert "Linear position interpolation" in result.stderr
