"""Runs on every machine it meets: AMX CPUs, bad numbers, plans that cannot fit, non-GGUF paths.

The AMX rule is checked on saved logs of an AMX machine (Sapphire Rapids: llama.cpp's
system info and a load that placed weights in the AMX buffer) and on this machine against
/proc/cpuinfo; the memory refusals are computed with an injected available-memory figure,
so nothing large is ever allocated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from localllm.errors import InvalidArgument
from localllm.flags import parse_sweep
from localllm.runtime.library import (
    AMX_REPACK_NOTE,
    choose_repack,
    cpu_has_amx,
    load_log_uses_amx,
    system_info,
)

# Saved from an Intel Xeon (Sapphire Rapids) running this llama.cpp build.
AMX_SYSTEM_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
    "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | "
    "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |"
)
AMX_LOAD_LOG = [
    "load_tensors: loading model tensors, this can take a while... (mmap = true)",
    "load_tensors:          AMX model buffer size =    62.34 MiB",
    "load_tensors:   CPU_Mapped model buffer size =    92.10 MiB",
]
# Saved from this project's AMD EPYC machines.
EPYC_SYSTEM_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
    "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | "
    "OPENMP = 1 | REPACK = 1 |"
)
EPYC_LOAD_LOG = ["load_tensors:   CPU_Mapped model buffer size =    92.10 MiB"]


# ------------------------------------------------------------------------------ AMX


@pytest.mark.parametrize(
    ("info", "log", "amx"),
    [(AMX_SYSTEM_INFO, AMX_LOAD_LOG, True), (EPYC_SYSTEM_INFO, EPYC_LOAD_LOG, False)],
)
def test_amx_in_system_info_agrees_with_the_amx_buffer_in_the_load_log(
    info: str, log: list[str], amx: bool
) -> None:
    assert cpu_has_amx(info) is amx
    assert load_log_uses_amx(log) is amx


def test_amx_int8_zero_or_other_amx_words_are_not_amx() -> None:
    assert not cpu_has_amx(AMX_SYSTEM_INFO.replace("AMX_INT8 = 1", "AMX_INT8 = 0"))
    assert not load_log_uses_amx(["AMX_INT8 = 1 | model buffer size = 1 MiB"])


def _cpuinfo_has_amx() -> bool:
    flags = Path("/proc/cpuinfo").read_text()
    return re.search(r"^flags\s*:.*\bamx_int8\b", flags, re.M) is not None


def test_this_machine_amx_as_the_kernel_reports_it() -> None:
    """ggml's own probe and the kernel's CPU flags agree about this machine."""
    assert cpu_has_amx(system_info()) == _cpuinfo_has_amx()


def test_repack_default_is_off_exactly_on_amx_cpus() -> None:
    choice = choose_repack(None)
    assert choice.repack is not _cpuinfo_has_amx()
    assert choice.note == (AMX_REPACK_NOTE if _cpuinfo_has_amx() else None)
    assert choose_repack(True).repack and choose_repack(True).note is None
    assert not choose_repack(False).repack and choose_repack(False).note is None


@pytest.fixture(scope="module")
def q4_0_model(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 requantized to Q4_0, a type llama.cpp's CPU backend repacks (Q4_1 is not)."""
    import llama_cpp

    out = tmp_path_factory.mktemp("q4_0") / "smollm2-q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(smollm2_path).encode(), str(out).encode(), params)
    assert rc == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("repack", [True, False])
def test_repack_reaches_llama_cpp(q4_0_model: Path, repack: bool) -> None:
    """use_extra_bufts is set on the model llama.cpp loads: the repacked buffer appears
    in its load log only with --repack 1 (the CPU's own repack buffer, or AMX's)."""
    from localllm.runtime import LoadOptions, load_model

    model = load_model(q4_0_model, LoadOptions(n_ctx=256, repack=repack))
    try:
        extra = [line for line in model.load_log if re.search(r"(REPACK|AMX) model buffer", line)]
        assert bool(extra) is repack, model.load_log
        assert model.repack.repack is repack
    finally:
        model.close()


@pytest.mark.slow
def test_bench_records_carry_repack(cli, store_with_smollm2: Path) -> None:
    result = cli("bench", "-p", "8", "-n", "0", "-r", "1", "-t", "1", "--repack", "0", "-o", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["repack"] is False


# ---------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["chat", "-p", "hi", "--threads", "100000"],
            "--threads 100000 is out of range; use 1 to 512",
        ),
        (["chat", "-p", "hi", "--threads", "0"], "threads 0 must be at least 1"),
        (["chat", "-p", "hi", "--ctx", "0"], "context size 0 must be a positive token count"),
        (
            ["chat", "-p", "hi", "--ctx", "99999999"],
            "--ctx 99999999 is out of range; use 1 to 16777216",
        ),
        (["chat", "-p", "hi", "--max-tokens", "0"], "max tokens 0 must be positive"),
        (["chat", "-p", "hi", "--max-tokens", "99999999"], "--max-tokens 99999999 is out of range"),
        (["chat", "-p", "hi", "--repack", "2"], "--repack '2': use 0 or 1"),
        (["bench", "-t", "513"], "-t 513 is out of range; use 1 to 512"),
        (["bench", "-p", "100000000"], "-p 100000000 is out of range; use 0 to 16777216"),
        (["bench", "-n", "20000000"], "-n 20000000 is out of range"),
        (["bench", "-d", "20000000"], "-d 20000000 is out of range"),
        (["bench", "-b", "0"], "--batch 0 must be at least 1"),
        (["bench", "-ub", "99999999"], "--ubatch 99999999 is out of range"),
        (["bench", "-r", "1001"], "-r 1001 is out of range; use 1 to 1000"),
        (["bench", "--repack", "yes"], "--repack 'yes': use 0 or 1"),
        (["ppl", "--threads", "600"], "--threads 600 is out of range; use 1 to 512"),
        (["ppl", "--ctx", "99999999"], "--ctx 99999999 is out of range"),
        (["kv-calc", "--ctx", "99999999"], "--ctx 99999999 is out of range"),
        (["kv-calc", "--batch", "1000"], "--batch 1000 is out of range; use 1 to 256"),
        (["kv-calc", "--ubatch", "0"], "--ubatch 0 is out of range"),
        (
            ["kv-calc", "--layers", "100000", "--heads", "8", "--head-dim", "64"],
            "--layers 100000 is out of range",
        ),
    ],
)
def test_numbers_out_of_bounds_are_one_line_exit_2(
    cli, store_with_smollm2: Path, args: list[str], message: str
) -> None:
    result = cli(*args, timeout=30)
    assert result.exit_code == 2, result.stderr
    assert message in result.error_line


def test_threads_up_to_ggml_limit_are_allowed() -> None:
    assert parse_sweep(["512"], "-t", minimum=1, maximum=512) == (512,)
    with pytest.raises(InvalidArgument, match="out of range"):
        parse_sweep(["513"], "-t", minimum=1, maximum=512)


@pytest.mark.slow
def test_more_threads_than_cpus_warn(cli, store_with_smollm2: Path) -> None:
    import os

    n = len(os.sched_getaffinity(0)) + 1
    result = cli("chat", "-p", "hi", "--max-tokens", "1", "--temp", "0", "--threads", str(n))
    assert result.exit_code == 0, result.stderr
    assert f"--threads {n} is more threads than the {n - 1} CPU" in result.stderr


# --------------------------------------------------------------------------- memory


def _plan_total(cli, *args: str) -> int:
    data = json.loads(cli("kv-calc", *args, "--json").stdout)
    return int(data["rows"][0]["total_bytes"])


@pytest.mark.parametrize(
    "command", [["chat", "-p", "hi"], ["ppl"], ["bench", "-p", "16", "-n", "4"]]
)
def test_a_plan_that_does_not_fit_is_refused_before_loading(
    cli, store_with_smollm2: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setenv("LOCALLLM_AVAILABLE_MEMORY", "50MiB")  # less than the 92 MiB of weights
    result = cli(*command, timeout=60)
    assert result.exit_code == 1, result.stderr
    line = result.error_line
    assert re.search(r"needs [\d.]+ GiB \(weights 0\.09 \+ KV [\d.]+ \+ compute [\d.]+ GiB\)", line)
    assert "but 0.05 GiB is available" in line
    assert "no context fits" in line and "--no-memory-check" in line


def test_refusal_and_kv_calc_agree_at_the_boundary(
    cli, store_with_smollm2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kv-calc's total for chat's settings (ctx 4096, f16, flash attention) is the line:
    one byte less is refused with that total, the total itself is not refused."""
    total = _plan_total(cli, "--ctx", "4096")
    monkeypatch.setenv("LOCALLLM_AVAILABLE_MEMORY", str(total - 1))
    refused = cli("chat", "-p", "hi", "--max-tokens", "1", timeout=60)
    assert refused.exit_code == 1
    assert f"needs {total / 2**30:.2f} GiB" in refused.error_line
    verdict = json.loads(cli("kv-calc", "--ctx", "4096", "--json").stdout)["rows"][0]["verdict"]
    assert verdict == "too big"
    # The largest context it names is kv-calc's own budget answer for that memory.
    budget = json.loads(
        cli("kv-calc", "--budget", str(total - 1), "--kv-type", "f16", "--json").stdout
    )["budget"][0]["max_ctx"]
    assert f"the largest --ctx that fits: {budget} with f16" in refused.error_line


@pytest.mark.slow
def test_the_exact_total_loads_and_no_memory_check_overrides(
    cli, store_with_smollm2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    total = _plan_total(cli, "--ctx", "4096")
    monkeypatch.setenv("LOCALLLM_AVAILABLE_MEMORY", str(total))
    assert cli("chat", "-p", "hi", "--max-tokens", "1", "--temp", "0").exit_code == 0
    monkeypatch.setenv("LOCALLLM_AVAILABLE_MEMORY", "1MiB")
    result = cli("chat", "-p", "hi", "--max-tokens", "1", "--temp", "0", "--no-memory-check")
    assert result.exit_code == 0, result.stderr


def test_a_huge_context_names_what_would_fit(
    cli, store_with_smollm2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measured case: ctx 2,000,000 on SmolLM2 (~43 GiB of KV); quantized caches fit more."""
    monkeypatch.setenv("LOCALLLM_AVAILABLE_MEMORY", "23GiB")
    result = cli("chat", "-p", "hi", "--ctx", "2000000", timeout=60)
    assert result.exit_code == 1
    line = result.error_line
    found = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) with (f16|q8_0|q4_0)", line))
    assert set(found) == {"f16", "q8_0", "q4_0"}
    assert found["f16"] < 2_000_000 and found["f16"] < found["q8_0"] < found["q4_0"]
    # SmolLM2: 30 layers x 3 KV heads x 64 dims x 2 (K and V) x 2 bytes = 23040 B per token in
    # f16; 23 GiB cannot hold a million tokens of that, but holds several hundred thousand.
    assert 500_000 < found["f16"] < 23 * 2**30 // 23040


# ----------------------------------------------------------------------- non-GGUF paths


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom", "dir", "notes.txt"])
def test_a_path_that_is_not_a_gguf_is_said_so(cli, tmp_path: Path, target: str) -> None:
    if target == "dir":
        target = str(tmp_path)
    elif target == "notes.txt":
        path = tmp_path / "notes.txt"
        path.write_text("just some notes\n")
        target = str(path)
    for command in ("info", "kv-calc"):
        result = cli(command, target, timeout=20)
        assert result.exit_code == 1, result.stderr
        assert "not a GGUF file" in result.error_line
        assert "pull" not in result.error_line
