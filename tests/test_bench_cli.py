"""localllm bench through the real CLI: short real runs on SmolLM2, every format, errors.

No speed thresholds. What a record says is held against independent references: the
arithmetic of tokens/s, KV cells and bytes and the roofline written out below from
SmolLM2's published shape, llama.cpp's own llama-bench (its record and its buffer log) on
the same model, and the machine's cache files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, SMOLLM2_SHA256

from localllm.bench.record import EXTRA_FIELDS, LLAMA_BENCH_FIELDS

TINY = ["-p", "16", "-n", "4", "-r", "2", "-t", "1"]
MIB = 1 << 20
# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json): 30 layers, 3 KV heads of 64 dims,
# a 49152-token vocabulary, input and output embeddings tied (no output.weight tensor).
# One token's f16 K and V: 30 layers x 3 heads x 64 dims x 2 bytes x 2 (K and V).
SMOL_KV_PER_TOKEN = 30 * 3 * 64 * 2 * 2
SMOL_VOCAB = 49152
KV_PAD = 256  # llama.cpp pads the KV cache to 256 cells


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


def _mib2(n_bytes: float) -> str:
    """Bytes as llama.cpp prints buffer sizes: MiB with two decimals."""
    return f"{n_bytes / MIB:.2f}"


def _cells(n_ctx: int) -> int:
    return -(-n_ctx // KV_PAD) * KV_PAD


@pytest.mark.slow
def test_json_run_records_hold_against_arithmetic(cli, bench_env: Path) -> None:
    result = cli("bench", *TINY, "-o", "json")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [(r["n_prompt"], r["n_gen"]) for r in records] == [(16, 0), (0, 4)]
    cached = json.loads((Path(os.environ["LOCALLLM_CACHE"]) / "bandwidth.json").read_text())
    for r in records:
        assert list(r)[: len(LLAMA_BENCH_FIELDS)] == list(LLAMA_BENCH_FIELDS)
        assert set(EXTRA_FIELDS) <= set(r)
        # llama-bench's statistics: tokens/s of each sample, their mean and sample stddev.
        n_tokens = r["n_prompt"] + r["n_gen"]
        assert len(r["samples_ns"]) == 2
        # (floats are printed with 6 decimals, as llama-bench's std::to_string does)
        ts = [n_tokens * 1e9 / ns for ns in r["samples_ns"]]
        assert r["samples_ts"] == pytest.approx(ts, abs=1e-6)
        assert r["avg_ts"] == pytest.approx(statistics.mean(ts), abs=1e-6)
        assert r["stddev_ts"] == pytest.approx(statistics.stdev(ts), abs=1e-6)
        assert r["avg_ns"] == int(statistics.mean(r["samples_ns"]))
        assert r["n_threads"] == 1 and r["n_batch"] == 2048 and r["flash_attn"] == -1
        assert r["n_ctx"] == r["n_prompt"] + r["n_gen"]
        assert r["model_sha256"] == SMOLLM2_SHA256
        # The buffers as llama.cpp logs them (MiB, 2 decimals): the padded KV cache of f16
        # K and V, and one row of f32 logits.
        assert r["n_ctx_cells"] == _cells(r["n_ctx"]) == 256
        assert _mib2(r["kv_bytes"]) == _mib2(SMOL_KV_PER_TOKEN * r["n_ctx_cells"]) == "5.62"
        assert _mib2(r["output_bytes"]) == _mib2(SMOL_VOCAB * 4) == "0.19"
        # Every weight is read while generating, and the file is mapped: all of it resident.
        assert r["weights_bytes"] + r["kv_bytes"] <= r["peak_rss_bytes"] <= r["ram_bytes"]
        assert [r["bandwidth_bytes_per_s"]] == [
            pytest.approx(e["bytes_per_s"], abs=1) for e in cached.values()
        ]
        assert r["warmup"] is True and r["repetitions"] == 2
    pp, tg = records
    assert pp["tg_bytes_per_token"] is None and pp["roofline_fraction"] is None
    # The roofline of tg4: the tied weights (all of model_size) plus the K and V of the
    # cells each step attends to, 1 to 4: 2.5 cells on average.
    per_token = tg["model_size"] + SMOL_KV_PER_TOKEN * (1 + 2 + 3 + 4) / 4
    assert tg["tg_bytes_per_token"] == per_token
    roof = tg["bandwidth_bytes_per_s"] / per_token
    # (the record rounds them to 3 and 4 decimals)
    assert tg["roofline_ts"] == pytest.approx(roof, abs=5e-4)
    assert tg["roofline_fraction"] == pytest.approx(tg["avg_ts"] / roof, abs=5e-5)


def _logged_mib(log: str, pattern: str) -> str:
    """The MiB figure(s) llama.cpp logged on lines matching ``pattern``, summed, as printed."""
    found = [float(m[1]) for m in re.finditer(pattern + r"\s*=\s*([\d.]+) MiB", log)]
    assert found, pattern
    return f"{sum(found):.2f}"


@pytest.mark.slow
def test_model_fields_match_native_llama_bench(
    cli, bench_env: Path, smollm2_path: Path, llama_bench_bin: Path
) -> None:
    """No -t on either side: the thread default is llama-bench's (physical cores)."""
    from localllm.runtime.library import choose_repack

    # Native llama-bench crashes on AMX CPUs unless told --repack 0, which localllm's
    # default chooses there by itself; both sides must run with the same value.
    repack = "1" if choose_repack(None).repack else "0"
    native = subprocess.run(
        [str(llama_bench_bin), "-m", str(smollm2_path), "-p", "8", "-n", "0", "-r", "1",
         "--repack", repack, "-o", "json", "-v"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    theirs = json.loads(native.stdout)[0]
    ours = json.loads(cli("bench", "-p", "8", "-n", "0", "-r", "1", "-o", "json").stdout)
    ours = ours[0]
    assert set(theirs) <= set(ours)
    same = [k for k in theirs if k not in ("build_commit", "build_number", "model_filename",
                                           "test_time", "avg_ns", "stddev_ns", "avg_ts",
                                           "stddev_ts", "samples_ns", "samples_ts")]  # fmt: skip
    assert "n_threads" in same
    assert {k: ours[k] for k in same} == {k: theirs[k] for k in same}
    assert ours["build_commit"].startswith(theirs["build_commit"])
    assert [type(ours[k]) for k in theirs] == [type(theirs[k]) for k in theirs]
    # The buffers as llama.cpp logged them for the same context, to its 0.01 MiB.
    log = native.stderr
    assert _mib2(ours["weights_bytes"]) == _logged_mib(log, r"model buffer size")
    assert _mib2(ours["kv_bytes"]) == _logged_mib(log, r"KV buffer size")
    assert _mib2(ours["compute_bytes"]) == _logged_mib(log, r"compute buffer size")
    assert _mib2(ours["output_bytes"]) == _logged_mib(log, r"output buffer size")
    cells = re.search(r"llama_kv_cache: size = .*\(\s*(\d+) cells", log)
    assert cells is not None and ours["n_ctx_cells"] == int(cells[1])


@pytest.mark.slow
def test_jsonl_sweep_streams_one_record_per_test(cli, bench_env: Path) -> None:
    result = cli("bench", "-p", "8,16", "-n", "0", "-r", "1", "-t", "1,2", "-o", "jsonl")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["n_threads"], r["n_prompt"]) for r in records] == [(1, 8), (1, 16), (2, 8), (2, 16)]
    for r in records:  # one repetition: its tokens over its time
        assert r["avg_ts"] == pytest.approx(r["n_prompt"] * 1e9 / r["samples_ns"][0], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_piped_rows_stream_as_each_test_ends(bench_env: Path, fmt: str) -> None:
    """The pp row reaches the pipe while tg still runs: at least tg's timed samples
    before the process ends (a run that printed everything at the end shows no gap)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "localllm", "bench", "-p", "8", "-n", "96", "-r", "2", "-t", "1",
         "-o", fmt],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    header = proc.stdout.readline() if fmt == "csv" else None
    first = proc.stdout.readline()
    first_at = time.monotonic()
    rest, stderr = proc.communicate(timeout=300)
    ended_at = time.monotonic()
    assert proc.returncode == 0, stderr
    if fmt == "csv":  # CSV carries no samples: two repetitions of avg_ns each
        pp, tg = csv.DictReader(io.StringIO(f"{header}{first}{rest}"))
    else:
        pp, tg = json.loads(first), json.loads(rest)
    tg_seconds = 2 * int(tg["avg_ns"]) / 1e9
    assert (int(pp["n_prompt"]), int(tg["n_gen"])) == (8, 96)
    assert ended_at - first_at >= tg_seconds > 0.2


def _run_in_process(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[dict, list[int]]:
    """``localllm bench ARGS -o jsonl`` in this process, counting llama_decode calls (the
    real function runs; the counter only records each batch's token count)."""
    import llama_cpp
    from typer.testing import CliRunner

    from localllm.cli import build_app

    batches: list[int] = []
    decode = llama_cpp.llama_decode

    def counting(ctx: object, batch: Any) -> int:
        batches.append(int(batch.n_tokens))
        return decode(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", counting)
    result = CliRunner().invoke(build_app(), ["bench", *args, "-o", "jsonl"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()], batches


@pytest.mark.slow
def test_no_warmup_skips_the_warmup_decodes(
    bench_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = ["-p", "16", "-n", "3", "-r", "1", "-t", "1"]
    records, batches = _run_in_process(monkeypatch, *flags)
    # llama-bench's warm-up: the whole prompt once, then one generated token; then the run.
    assert batches == [16, 16, 1, 1, 1, 1]
    assert [r["warmup"] for r in records] == [True, True]
    records, batches = _run_in_process(monkeypatch, *flags, "--no-warmup")
    assert batches == [16, 1, 1, 1]
    assert [r["warmup"] for r in records] == [False, False]


@pytest.mark.slow
def test_bandwidth_and_sha256_come_from_the_cache_until_refreshed(
    cli, store_with_smollm2: Path, smollm2_path: Path, tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "own-cache"
    monkeypatch.setenv("LOCALLLM_CACHE", str(cache))
    args = ("bench", "-p", "8", "-n", "0", "-r", "1", "-t", "1", "-o", "json")
    first = json.loads(cli(*args).stdout)[0]
    assert first["model_sha256"] == SMOLLM2_SHA256
    # Plant other figures where the caches keep them (by machine; by path, size, mtime).
    bandwidth = json.loads((cache / "bandwidth.json").read_text())
    assert [e["bytes_per_s"] for e in bandwidth.values()] == [
        pytest.approx(first["bandwidth_bytes_per_s"], abs=1)
    ]
    planted_bw = 1234567.0
    for entry in bandwidth.values():
        entry["bytes_per_s"] = planted_bw
    (cache / "bandwidth.json").write_text(json.dumps(bandwidth))
    hashes = json.loads((cache / "sha256.json").read_text())
    entry = hashes[str(smollm2_path.resolve())]
    stat = smollm2_path.stat()
    assert (entry["sha256"], entry["size"], entry["mtime_ns"]) == (
        SMOLLM2_SHA256, stat.st_size, stat.st_mtime_ns,
    )  # fmt: skip
    entry["sha256"] = "f" * 64
    (cache / "sha256.json").write_text(json.dumps(hashes))

    cached = json.loads(cli(*args).stdout)[0]
    assert cached["bandwidth_bytes_per_s"] == planted_bw  # not measured again
    assert cached["model_sha256"] == "f" * 64  # not hashed again
    refreshed = json.loads(cli(*args, "--refresh-bandwidth").stdout)[0]
    assert refreshed["bandwidth_bytes_per_s"] != planted_bw
    stored = json.loads((cache / "bandwidth.json").read_text())
    assert [e["bytes_per_s"] for e in stored.values()] == [
        pytest.approx(refreshed["bandwidth_bytes_per_s"], abs=1)
    ]


@pytest.mark.slow
def test_csv_and_markdown_runs(cli, bench_env: Path) -> None:
    args = ["-p", "8", "-n", "2", "-r", "1", "-t", "1", "--pg", "8,2", "-b", "4"]
    result = cli("bench", *args, "-o", "csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["n_prompt"], r["n_gen"], r["n_batch"]) for r in rows] == [
        ("8", "0", "4"), ("0", "2", "4"), ("8", "2", "4"),
    ]  # fmt: skip
    for r in rows:  # one repetition: its tokens over its time
        n_tokens = int(r["n_prompt"]) + int(r["n_gen"])
        assert float(r["avg_ts"]) == pytest.approx(n_tokens * 1e9 / int(r["avg_ns"]), rel=1e-6)
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


@pytest.mark.slow
def test_tg_never_exceeds_the_roofline_on_a_7b_header(cli, tmp_path: Path, monkeypatch) -> None:
    """A Llama-2-7B Q4_0 of zeros (header-only, sparse): llama.cpp's kernels stream 3.6 GB
    a token; the probe (its fastest method) must read at least as fast."""
    from support.gguf_files import write_header_gguf

    monkeypatch.setenv("LOCALLLM_CACHE", str(tmp_path / "own-cache"))
    path = write_header_gguf(tmp_path / "llama-2-7b.gguf", "llama-2-7b", weight_type="Q4_0")
    result = cli("bench", str(path), "-t", "2", "-p", "0", "-n", "16", "-r", "2", "-o", "json")
    assert result.exit_code == 0, result.stderr
    (tg,) = json.loads(result.stdout)
    assert tg["model_size"] > 3 << 30  # the real shape: every token reads 3.6 GB
    assert 0 < tg["roofline_fraction"] <= 1


@pytest.mark.slow
def test_a_tg_faster_than_the_cached_bandwidth_raises_it(
    cli, store_with_smollm2: Path, tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "own-cache"
    monkeypatch.setenv("LOCALLLM_CACHE", str(cache))
    args = ("bench", "-p", "0", "-n", "4", "-r", "1", "-t", "1", "-o", "json")
    assert cli(*args).exit_code == 0  # measures and caches the bandwidth
    bandwidth = json.loads((cache / "bandwidth.json").read_text())
    for entry in bandwidth.values():
        entry["bytes_per_s"] = 1e6  # a probe far slower than any generation
    (cache / "bandwidth.json").write_text(json.dumps(bandwidth))
    (tg,) = json.loads(cli(*args).stdout)
    assert tg["roofline_fraction"] == pytest.approx(1.0, abs=1e-4)
    assert tg["bandwidth_bytes_per_s"] == pytest.approx(tg["avg_ts"] * tg["tg_bytes_per_token"])
    (entry,) = json.loads((cache / "bandwidth.json").read_text()).values()
    assert entry["bytes_per_s"] == pytest.approx(tg["bandwidth_bytes_per_s"], abs=1)
    assert entry["method"].startswith("llama.cpp's own tg read rate")
