"""localllm bench, core: parsing and sweeps, records and formats, roofline, decode loops.

CLI-level tests (real runs, error lines) are in test_bench_cli.py.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import statistics
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from localllm.bench.formats import (
    format_csv_header,
    format_csv_row,
    format_json,
    format_jsonl_row,
    format_markdown,
)
from localllm.bench.record import EXTRA_FIELDS, LLAMA_BENCH_FIELDS, BenchResult, Environment
from localllm.bench.request import BenchRequest, BenchTest
from localllm.bench.run import weights_read_per_token
from localllm.errors import InvalidArgument
from localllm.flags import parse_pairs, parse_sweep
from localllm.machine import (
    Bandwidth,
    measure_bandwidths,
    memory_bandwidth,
    online_cpus,
    raise_bandwidth,
)
from localllm.plan.kvcalc import KVCalcRequest, kv_calc

# ------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["512"], (512,)),
        (["128,512"], (128, 512)),
        (["128", "512,1024"], (128, 512, 1024)),  # repeated flags add up, as in llama-bench
        (["1-4"], (1, 2, 3, 4)),
        (["1-9+4"], (1, 5, 9)),
        (["128-1024*2"], (128, 256, 512, 1024)),
        (["0"], (0,)),
    ],
)
def test_int_lists_expand_like_llama_bench(values: list[str], expected: tuple[int, ...]) -> None:
    assert parse_sweep(values, "-p") == expected


@pytest.mark.parametrize("bad", ["-1", "abc", "1.5", "", "4-1x"])
def test_int_lists_reject_what_is_not_a_count(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="-p"):
        parse_sweep([bad], "-p")


def test_minimum_is_enforced() -> None:
    with pytest.raises(InvalidArgument, match="-t 0 must be at least 1"):
        parse_sweep(["0"], "-t", minimum=1)


def test_pg_pairs() -> None:
    assert parse_pairs(["512,128", "64,16"]) == ((512, 128), (64, 16))
    with pytest.raises(InvalidArgument, match="512,128"):
        parse_pairs(["512"])


# ------------------------------------------------------------------------- sweeps


def _llama_bench_order(req: BenchRequest) -> list[tuple[int, ...]]:
    """get_cmd_params_instances' nesting, written out independently of expand_tests."""
    out = []
    for nb, nub, tk, tv, fa, nt, nd in itertools.product(
        req.n_batch, req.n_ubatch, req.type_k, req.type_v, req.flash_attn, req.threads(),
        req.n_depth,
    ):  # fmt: skip
        shapes = [(p, 0) for p in req.n_prompt if p] + [(0, n) for n in req.n_gen if n]
        shapes += [pg for pg in req.n_pg if pg != (0, 0)]
        out += [(p, n, nd, nb, nub, tk, tv, fa, nt) for p, n in shapes]
    return out


def test_sweeps_expand_in_llama_bench_order() -> None:
    req = BenchRequest.from_flags(
        n_prompt=["128,512"], n_gen=["16"], threads=["1,2"], batch=["256", "2048"], pg=["64,8"]
    )
    tests = req.tests()
    got = [
        (t.n_prompt, t.n_gen, t.n_depth, t.n_batch, t.n_ubatch, t.type_k, t.type_v, t.flash_attn,
         t.n_threads)
        for t in tests
    ]  # fmt: skip
    assert got == _llama_bench_order(req)
    assert len(tests) == 2 * 2 * 4  # batches x threads x (pp128, pp512, tg16, pp64+tg8)
    assert [t.name for t in tests[:4]] == ["pp128", "pp512", "tg16", "pp64+tg8"]


def test_defaults_are_llama_bench_defaults() -> None:
    req = BenchRequest.from_flags(threads=["2"])
    tests = req.tests()
    assert [t.name for t in tests] == ["pp512", "tg128"]
    for t in tests:
        assert (t.n_batch, t.n_ubatch, t.type_k, t.type_v, t.flash_attn) == (
            2048, 512, "f16", "f16", "auto",
        )  # fmt: skip
        assert t.n_ctx == t.n_prompt + t.n_gen + t.n_depth  # llama-bench's n_ctx
    assert req.repetitions == 5


def test_zero_lengths_are_skipped_and_depth_names_the_test() -> None:
    req = BenchRequest.from_flags(n_prompt=["0"], n_gen=["32"], depth=["0,256"], threads=["1"])
    assert [t.name for t in req.tests()] == ["tg32", "tg32 @ d256"]
    assert req.tests()[1].n_ctx == 32 + 256


def test_kv_type_sets_both_and_type_k_overrides() -> None:
    req = BenchRequest.from_flags(kv_type=["q8_0"], type_k=["q4_0"], threads=["1"])
    assert {(t.type_k, t.type_v) for t in req.tests()} == {("q4_0", "q8_0")}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"repetitions": 0}, "repetitions 0 must be at least 1"),
        ({"n_prompt": ["-1"]}, "-p '-1' is not a count"),
        ({"kv_type": ["q3_k"]}, "unknown KV cache type 'q3_k'"),
        ({"flash_attn": ["maybe"]}, "unknown flash attention mode 'maybe'"),
        ({"output": "xml"}, "unknown output format 'xml'"),
        ({"n_prompt": ["0"], "n_gen": ["0"]}, "nothing to measure"),
        ({"n_prompt": ["512"], "ctx": ["256"]}, "--ctx 256 is too small"),
        ({"kv_type": ["q8_0"], "flash_attn": ["off"]}, "quantized V cache"),
        ({"threads": ["0"]}, "-t 0 must be at least 1"),
        ({"batch": ["0"]}, "--batch 0 must be at least 1"),
    ],
)
def test_bad_requests_fail_before_anything_loads(flags: dict, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        BenchRequest.from_flags(**flags)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------- records, formats


def _environment() -> Environment:
    return Environment(
        cpu_model="Test CPU", cpu_info="Test CPU", gpu_info="", backends="CPU", cpu_cores=2,
        cpu_threads=2, ram_bytes=8 << 30, os="Linux", python_version="3.11", localllm_version="0",
        llama_cpp_python_version="0.3.36", llama_cpp_build="abc1234", ggml_version="0.0.0",
        system_info="CPU : AVX2 = 1", model_path="/m/model.gguf", model_sha256="0" * 64,
    )  # fmt: skip


def _result(test: BenchTest, samples_ns: tuple[int, ...], tg_bytes: int | None) -> BenchResult:
    return BenchResult(
        test=test, samples_ns=samples_ns, test_time="2025-01-01T00:00:00Z",
        model_filename="/m/model.gguf", model_type="llama 1B Q4_0", model_size=600 << 20,
        model_n_params=1_100_000_000, n_ctx_cells=256, flash_attn_used=True, rope="none",
        peak_rss_bytes=900 << 20, weights_bytes=600 << 20, kv_bytes=4 << 20,
        compute_bytes=30 << 20, output_bytes=1 << 20, tg_bytes_per_token=tg_bytes,
        bandwidth=Bandwidth(20e9, "test", "2025-01-01T00:00:00Z", True),
        environment=_environment(), repetitions=len(samples_ns), warmup=True,
    )  # fmt: skip


def _results() -> list[BenchResult]:
    pp = BenchTest(512, 0, 0, 512, 2048, 512, "f16", "f16", "auto", 2)
    tg = BenchTest(0, 128, 0, 128, 2048, 512, "f16", "f16", "auto", 2)
    return [
        _result(pp, (1_700_000_000, 1_650_000_000, 1_720_000_000), None),
        _result(tg, (900_000_000, 950_000_000, 910_000_000), 650 << 20),
    ]


def test_statistics_are_llama_bench_s() -> None:
    for r in _results():
        ts = [1e9 * r.test.n_tokens / ns for ns in r.samples_ns]
        assert r.avg_ts == pytest.approx(statistics.mean(ts))
        assert r.stddev_ts == pytest.approx(statistics.stdev(ts))
        assert r.avg_ns == int(statistics.mean(r.samples_ns))
    single = _result(_results()[0].test, (1_000_000_000,), None)
    assert single.stddev_ts == 0.0 and single.stddev_ns == 0


def test_roofline_is_bandwidth_over_bytes_per_token() -> None:
    pp, tg = _results()
    assert pp.roofline_fraction is None
    roof = 20e9 / (650 << 20)
    assert tg.roofline_ts == pytest.approx(roof)
    assert tg.roofline_fraction == pytest.approx(tg.avg_ts / roof)


_JSON_TYPES = {"i": int, "b": bool, "f": float, "s": str}


def _check_record(record: dict) -> None:
    keys = list(record)
    n = len(LLAMA_BENCH_FIELDS)
    assert keys[:n] == list(LLAMA_BENCH_FIELDS)
    assert keys[n : n + 2] == ["samples_ns", "samples_ts"]
    assert keys[n + 2 :] == list(EXTRA_FIELDS)
    for name, kind in LLAMA_BENCH_FIELDS.items():
        value = record[name]
        assert type(value) is _JSON_TYPES[kind], (name, value)


def test_json_and_jsonl_carry_llama_bench_fields_in_order() -> None:
    results = _results()
    data = json.loads(format_json(results))
    assert len(data) == 2
    for record in data:
        _check_record(record)
    lines = [json.loads(format_jsonl_row(r)) for r in results]
    assert lines == data


def test_csv_has_llama_bench_columns_first() -> None:
    text = format_csv_header() + "".join(format_csv_row(r) for r in _results())
    rows = list(csv.reader(io.StringIO(text)))
    header = rows[0]
    assert header[: len(LLAMA_BENCH_FIELDS)] == list(LLAMA_BENCH_FIELDS)
    assert header[len(LLAMA_BENCH_FIELDS) :] == list(EXTRA_FIELDS)
    assert len(rows) == 3 and all(len(row) == len(header) for row in rows)
    record = dict(zip(header, rows[1], strict=True))
    assert record["cpu_strict"] == "0" and record["repack"] == "1"  # to_string(bool)
    assert float(record["avg_ts"]) == pytest.approx(_results()[0].avg_ts, abs=1e-6)
    assert text.splitlines()[1].startswith('"abc1234","0",')  # every value quoted


def test_markdown_is_llama_bench_s_table() -> None:
    req = BenchRequest.from_flags(threads=["2"])
    text = format_markdown(req, _results())
    lines = text.splitlines()
    assert lines[0].split("|")[1:-1] == [
        f" {'model':<30} ", f" {'size':>10} ", f" {'params':>10} ", f" {'backend':<10} ",
        f" {'threads':>7} ", f" {'test':>15} ", f" {'t/s':>20} ", f" {'roofline':>8} ",
    ]  # fmt: skip
    assert lines[1].startswith("| ------------------------------ | ---------: |")
    pp_row = lines[2]
    assert "600.00 MiB" in pp_row and "1.10 B" in pp_row and "pp512" in pp_row
    r = _results()[0]
    assert f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}" in pp_row
    assert "build: abc1234 (0)" in text


# ----------------------------------------------------------------------- roofline


def _write_tensors(path: Path, tied: bool) -> tuple[int, int]:
    writer = gguf.GGUFWriter(str(path), "llama")
    embd = np.zeros((64, 16), dtype=np.float32)
    writer.add_tensor("token_embd.weight", embd)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((16, 16), dtype=np.float32))
    total = embd.nbytes + 16 * 16 * 4
    if not tied:
        writer.add_tensor("output.weight", np.zeros((64, 16), dtype=np.float32))
        total += 64 * 16 * 4
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return total, embd.nbytes


def test_generated_tokens_read_one_embedding_row_unless_tied(tmp_path: Path) -> None:
    total, embd_bytes = _write_tensors(tmp_path / "untied.gguf", tied=False)
    assert weights_read_per_token(tmp_path / "untied.gguf", total) == total - embd_bytes
    total, _ = _write_tensors(tmp_path / "tied.gguf", tied=True)
    assert weights_read_per_token(tmp_path / "tied.gguf", total) == total


def _one_thread_read_bandwidth() -> float:
    """An independent reference: one thread summing 64 MiB with numpy, best of 5."""
    data = np.ones(8 << 20, dtype=np.int64)
    data.sum()  # fault the pages in
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return (8 << 20) * 8 / best


def test_bandwidth_is_measured_once_then_cached(tmp_path: Path) -> None:
    first = memory_bandwidth()
    assert not first.cached
    # Every CPU reading its slice is at least about one thread's bandwidth and at most
    # all of them at once (a factor 3 each way for a shared machine's noise): a wrong
    # unit, byte count or clock is off by 8x or 1000x.
    one_thread = _one_thread_read_bandwidth()
    assert one_thread / 3 < first.bytes_per_s < one_thread * online_cpus() * 3
    again = memory_bandwidth()
    assert again.cached and again.bytes_per_s == first.bytes_per_s
    cache = json.loads((tmp_path / "cache" / "localllm" / "bandwidth.json").read_text())
    assert [entry["bytes_per_s"] for entry in cache.values()] == [first.bytes_per_s]


# --------------------------------------------------------------- decode loops (real)


def _kv_tokens(ctx: object) -> int:
    """Tokens of sequence 0 in a bench context's KV cache, read from llama.cpp itself."""
    import llama_cpp

    memory = llama_cpp.llama_get_memory(ctx.ctx)  # type: ignore[attr-defined]
    return int(llama_cpp.llama_memory_seq_pos_max(memory, 0)) + 1


def test_a_huge_range_is_refused_at_once() -> None:
    # Found by the restructure: the size check ran after the whole expansion, so this
    # range (10^12 values) looped until memory ran out instead of failing.
    with pytest.raises(InvalidArgument, match="expands to too many values"):
        parse_sweep(["1-1000000000000"], "-p")


@pytest.mark.slow
def test_loops_decode_exactly_the_tokens_they_time(smollm2_path: Path) -> None:
    from localllm.runtime.llama_bench import BenchModel, ContextConfig

    with (
        BenchModel(smollm2_path) as model,
        model.new_context(ContextConfig(n_ctx=64, n_batch=8, n_ubatch=8, n_threads=1)) as ctx,
    ):
        assert ctx.n_ctx >= 64 and ctx.buffers.kv_bytes and ctx.buffers.compute_bytes
        ctx.warmup(20, 4)
        ctx.clear()
        assert _kv_tokens(ctx) == 0
        ns = ctx.timed_run(20, 4)  # 20 prompt tokens in chunks of 8, then 4 single steps
        assert ns > 0 and _kv_tokens(ctx) == 24
        for _ in range(2):  # the second prefill restores the saved state
            ctx.clear()
            ctx.prefill_depth(16)
            assert _kv_tokens(ctx) == 16
            ctx.timed_run(0, 3)
            assert _kv_tokens(ctx) == 19


def test_field_list_is_the_one_of_the_llama_bench_we_build(llama_cpp_source: Path) -> None:
    source = (llama_cpp_source / "tools/llama-bench/llama-bench.cpp").read_text()
    block = source[source.index("get_fields() {") : source.index("return fields;")]
    names = [m for m in (s.strip() for s in block.split('"')[1::2]) if m]
    assert names == list(LLAMA_BENCH_FIELDS)


# ----------------------------------------------------------------- the memory plan


@pytest.mark.slow
def test_records_carry_the_dry_run_plan_of_their_context(
    cli, store_with_smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each record carries its context's plan before loading (llama.cpp's dry run, kv-calc's
    row for the same settings) beside the buffers the real context then logged."""
    monkeypatch.setenv("LOCALLLM_CACHE", str(tmp_path / "bench-cache"))
    result = cli("bench", "-p", "16", "-n", "4", "-r", "1", "-t", "1", "--no-warmup",
                 "-ub", "8", "-o", "json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert len(records) == 2

    def mib2(n: int) -> str:  # llama.cpp logs buffers in MiB with two decimals
        return f"{n / (1 << 20):.2f}"

    for r in records:
        assert r["plan_source"] == "llama.cpp dry run" and r["swa_full"] is False
        row = kv_calc(
            KVCalcRequest(ctx=(r["n_ctx"],), ubatch=r["n_ubatch"], n_batch=r["n_batch"])
        ).rows[0]
        planned = (r["plan_weights_bytes"], r["plan_kv_bytes"], r["plan_compute_bytes"],
                   r["plan_output_bytes"])  # fmt: skip
        assert planned == (row.weights_bytes, row.kv_bytes, row.compute_bytes, row.output_bytes)
        # The plan is what the real context allocated, to llama.cpp's 0.01 MiB.
        for name in ("kv_bytes", "compute_bytes", "output_bytes"):
            assert mib2(r[f"plan_{name}"]) == mib2(r[name]), name
        assert r["plan_kv_bytes"] == 30 * 3 * 64 * 2 * 2 * 256  # SmolLM2, 256 cells, f16


def test_the_probe_reads_several_ways_and_keeps_the_fastest() -> None:
    rates = measure_bandwidths(size_bytes=32 << 20, passes=2)
    assert {"numpy add.reduce", "numpy bitwise_or.reduce"} <= set(rates)
    assert "libc memchr" in rates  # glibc (this project's CI and dev machines)
    one_thread = _one_thread_read_bandwidth()
    for rate in rates.values():  # each a plausible read rate, as the cached one above
        assert one_thread / 3 < rate < one_thread * online_cpus() * 3


def test_a_faster_observed_rate_raises_the_cached_bandwidth(tmp_path: Path) -> None:
    measured = memory_bandwidth()
    kept = raise_bandwidth(measured.bytes_per_s / 2, "slower: ignored")
    assert kept.bytes_per_s == measured.bytes_per_s and kept.cached
    raised = raise_bandwidth(measured.bytes_per_s * 2, "llama.cpp's own tg read rate")
    assert raised.bytes_per_s == measured.bytes_per_s * 2 and not raised.cached
    again = memory_bandwidth()
    assert again.cached and again.bytes_per_s == measured.bytes_per_s * 2
    assert again.method == "llama.cpp's own tg read rate"
