"""`localllm system`: ggml's devices and memory, macOS's available memory, bench's backends.

No GPU here: an RPC server stands in for one (llama.cpp counts RPC devices as GPUs), and
macOS is represented by the output of real Macs, recorded below with where it comes from.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_port, start_rpc_server

from localllm.bench.record import BenchResult, Environment, RpcSplit
from localllm.bench.request import BenchTest
from localllm.machine import (
    ENV_AVAILABLE_MEMORY,
    SOURCE_VM_STAT,
    available_memory,
    parse_vm_stat,
    ram_bytes,
)
from localllm.runtime.devices import GgmlDevice, cpu_features
from localllm.runtime.rpc_devices import check_endpoint

# `vm_stat` on an Apple Silicon Mac (16 KiB pages), posted in HMCL-dev/HMCL pull request
# #4876 (2025-11-28); the lines after the compressor's are left out (not read).
VM_STAT_APPLE_SILICON = """\
Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                                3857.
Pages active:                            446206.
Pages inactive:                          443760.
Pages speculative:                         1075.
Pages throttled:                              0.
Pages wired down:                        181483.
Pages purgeable:                          17340.
"Translation faults":                8667427138.
Pages copy-on-write:                  156847509.
Pages zero filled:                   4902315421.
Pages reactivated:                    586001636.
Pages purged:                         174538344.
File-backed pages:                       294894.
Anonymous pages:                         596147.
Pages stored in compressor:             1943619.
Pages occupied by compressor:            442179.
"""
APPLE_SILICON_AVAILABLE = (3857 + 443760 + 17340 + 1075) * 16384  # free+inactive+purgeable+spec.

# `vm_stat` on an Intel Mac (4 KiB pages), posted in wazuh/wazuh issue #22113 (macOS test
# host of their 4.8.0 beta 2), complete.
VM_STAT_INTEL = """\
Mach Virtual Memory Statistics: (page size of 4096 bytes)
Pages free:                             6127229.
Pages active:                            485320.
Pages inactive:                          628646.
Pages speculative:                       430715.
Pages throttled:                              0.
Pages wired down:                        715958.
Pages purgeable:                          11820.
"Translation faults":                  11477162.
Pages copy-on-write:                     356264.
Pages zero filled:                      7628050.
Pages reactivated:                         9561.
Pages purged:                              1423.
File-backed pages:                      1080348.
Anonymous pages:                         464333.
Pages stored in compressor:                   0.
Pages occupied by compressor:                 0.
Decompressions:                               0.
Compressions:                                 0.
Pageins:                                 280307.
Pageouts:                                     0.
Swapins:                                      0.
Swapouts:                                     0.
"""
INTEL_AVAILABLE = (6127229 + 628646 + 11820 + 430715) * 4096

# llama.cpp's system_info on an M1 Mac with Metal (ggml-org/llama.cpp issue #2429).
SYSTEM_INFO_M1 = (
    "AVX = 0 | AVX2 = 0 | AVX512 = 0 | AVX512_VBMI = 0 | AVX512_VNNI = 0 | FMA = 0 | NEON = 1 "
    "| ARM_FMA = 1 | F16C = 0 | FP16_VA = 1 | WASM_SIMD = 0 | BLAS = 1 | SSE3 = 0 | VSX = 0 | "
)


# ------------------------------------------------------------------ macOS available memory


@pytest.mark.parametrize(
    ("text", "expected"),
    [(VM_STAT_APPLE_SILICON, APPLE_SILICON_AVAILABLE), (VM_STAT_INTEL, INTEL_AVAILABLE)],
    ids=["apple-silicon", "intel"],
)
def test_vm_stat_available_is_free_inactive_purgeable_speculative(text: str, expected: int) -> None:
    assert parse_vm_stat(text) == expected


def test_vm_stat_without_its_header_takes_the_page_size_given() -> None:
    body = VM_STAT_APPLE_SILICON.split("\n", 1)[1]
    assert parse_vm_stat(body, 16384) == APPLE_SILICON_AVAILABLE
    with pytest.raises(ValueError, match="page size"):
        parse_vm_stat(body)


def test_vm_stat_output_missing_a_counted_line_is_refused() -> None:
    text = VM_STAT_INTEL.replace("Pages purgeable:", "Pages unknown:")
    with pytest.raises(ValueError, match="Pages purgeable"):
        parse_vm_stat(text)


def _fake_tool(bin_dir: Path, name: str, output: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / f"{name}.out").write_text(output)
    script = bin_dir / name
    script.write_text(f"#!/bin/sh\ncat '{bin_dir / name}.out'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_macos_available_memory_runs_vm_stat(tmp_path: Path, monkeypatch) -> None:
    """On macOS (no SC_AVPHYS_PAGES) the figure is vm_stat's, named as the source."""
    monkeypatch.delenv(ENV_AVAILABLE_MEMORY, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir, "vm_stat", VM_STAT_APPLE_SILICON)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    found = available_memory()
    assert (found.bytes, found.source) == (APPLE_SILICON_AVAILABLE, SOURCE_VM_STAT)


def test_macos_vm_stat_without_page_size_asks_sysctl(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_AVAILABLE_MEMORY, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir, "vm_stat", VM_STAT_INTEL.split("\n", 1)[1])
    _fake_tool(bin_dir, "sysctl", "4096\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert available_memory().bytes == INTEL_AVAILABLE


def test_macos_without_vm_stat_has_no_figure(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_AVAILABLE_MEMORY, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("PATH", str(tmp_path))  # no vm_stat at all
    found = available_memory()
    assert (found.bytes, found.source) == (None, "unknown")


def test_linux_available_memory_is_meminfo_s(monkeypatch) -> None:
    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo here")
    monkeypatch.delenv(ENV_AVAILABLE_MEMORY, raising=False)
    line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if "MemAvailable" in ln)
    found = available_memory()
    assert found.source == "MemAvailable"
    assert found.bytes == pytest.approx(int(line.split()[1]) * 1024, rel=0.05)


# ---------------------------------------------------------------------------- devices


def test_cpu_features_are_the_ones_reported_on() -> None:
    assert cpu_features(SYSTEM_INFO_M1) == ("NEON", "ARM_FMA", "FP16_VA", "BLAS")


def test_metal_and_integrated_gpus_share_host_memory() -> None:
    base = GgmlDevice("CUDA0", "NVIDIA GeForce RTX 4090", "GPU", "CUDA", 24 << 30, 23 << 30)
    assert not base.unified
    assert replace(base, name="MTL0", backend="MTL").unified  # Apple Silicon's Metal
    assert replace(base, name="Vulkan0", backend="Vulkan", type="iGPU").unified


def test_system_json_lists_the_cpu_device_and_the_memory_source(cli) -> None:
    result = cli("system", "--json", "--no-bandwidth")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    (cpu,) = [d for d in data["devices"] if d["type"] == "CPU"]
    assert cpu["name"] == "CPU" and cpu["backend"] == "CPU"
    # ggml-cpu reports the installed RAM (sysconf), read here through ctypes.
    assert cpu["memory_total_bytes"] == ram_bytes() > 0
    assert "CPU" in data["backends"]
    expected = available_memory()
    assert data["available_memory_source"] == expected.source
    assert data["available_memory_bytes"] == pytest.approx(expected.bytes, rel=0.05)
    assert data["threads"] >= 1
    assert data["memory_bandwidth_bytes_per_s"] is None


def test_system_names_the_environment_as_the_source_when_set(cli, monkeypatch) -> None:
    monkeypatch.setenv(ENV_AVAILABLE_MEMORY, "16GiB")
    data = json.loads(cli("system", "--json", "--no-bandwidth").stdout)
    assert data["available_memory_bytes"] == 16 << 30
    assert data["available_memory_source"] == ENV_AVAILABLE_MEMORY
    text = cli("system", "--no-bandwidth")
    assert text.exit_code == 0, text.stderr
    assert "16.00 GiB available (source: LOCALLLM_AVAILABLE_MEMORY)" in text.stdout
    # No GPU backend and no --rpc here: -ngl's default keeps every layer on the CPU.
    assert "-ngl default: no GPU backend: every layer on the CPU" in text.stdout


def test_system_refuses_a_dead_rpc_server_in_one_line(cli) -> None:

    port = free_port()
    result = cli("system", "--no-bandwidth", "--rpc", f"127.0.0.1:{port}", timeout=60)
    assert result.exit_code != 0
    assert f"127.0.0.1:{port}" in result.error_line


@pytest.mark.slow
def test_system_shows_an_rpc_server_as_a_device_with_its_memory(cli) -> None:
    port, proc = start_rpc_server(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"127.0.0.1:{port}"
        # The server's memory as its own protocol answers it (our Python client).
        [(free, total)] = check_endpoint("127.0.0.1", port).device_memory
        result = cli("system", "--json", "--no-bandwidth", "--rpc", endpoint)
        assert result.exit_code == 0, result.stderr
        data = json.loads(result.stdout)
        (rpc,) = [d for d in data["devices"] if d["type"] == "RPC"]
        assert rpc["name"] == "RPC0" and rpc["endpoint"] == endpoint
        assert rpc["description"] == endpoint  # ggml-rpc describes a device by its server
        assert (rpc["memory_free_bytes"], rpc["memory_total_bytes"]) == (free, total)
        assert data["gpu_layers_default"].startswith("all layers on the --rpc devices")
        text = cli("system", "--no-bandwidth", "--rpc", endpoint)
        assert text.exit_code == 0, text.stderr
        assert any(ln.split()[:2] == ["RPC0", "RPC"] for ln in text.stdout.splitlines())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------- bench's records


def _result(backends: str, gpu_info: str, split: RpcSplit | None) -> BenchResult:
    env = Environment(
        cpu_model="cpu", cpu_info="cpu", gpu_info=gpu_info, backends=backends, cpu_cores=2,
        cpu_threads=2, ram_bytes=8 << 30, os="Linux", python_version="3.11", localllm_version="0",
        llama_cpp_python_version="0.3.36", llama_cpp_build="abc1234", ggml_version="0.0.0",
        system_info="", model_path="/m.gguf", model_sha256="",
    )  # fmt: skip
    return BenchResult(
        test=BenchTest(0, 8, 0, 8, 256, 256, "f16", "f16", "auto", 2), samples_ns=(1_000_000,),
        test_time="t", model_filename="/m.gguf", model_type="llama", model_size=1, model_n_params=1,
        n_ctx_cells=256, flash_attn_used=True, rope="none", peak_rss_bytes=1, weights_bytes=1,
        kv_bytes=1, compute_bytes=1, output_bytes=1, tg_bytes_per_token=None, bandwidth=None,
        environment=env, repetitions=1, warmup=False, split=split,
    )  # fmt: skip


def test_bench_records_carry_the_gpu_backends_and_rpc_as_llama_bench() -> None:
    """llama-bench's backends: compiled GPU backends, then RPC; gpu_info: every GPU device
    description, an RPC device's being its endpoint (llama-bench --rpc registers them)."""
    split = RpcSplit(
        ("10.0.0.2:50052",), -1, (), (("CUDA0", (0, 1)), ("RPC0[10.0.0.2:50052]", (2, 3)))
    )
    cuda = _result("CUDA", "NVIDIA GeForce RTX 4090", None).record()
    assert (cuda["backends"], cuda["gpu_info"]) == ("CUDA", "NVIDIA GeForce RTX 4090")
    both = _result("CUDA", "NVIDIA GeForce RTX 4090", split).record()
    assert both["backends"] == "CUDA,RPC"
    assert both["gpu_info"] == "NVIDIA GeForce RTX 4090, 10.0.0.2:50052"
    cpu_split = replace(split, layers=(("CPU", (0, 1)), ("RPC0[10.0.0.2:50052]", (2, 3))))
    rpc = _result("CPU", "", cpu_split).record()
    assert (rpc["backends"], rpc["gpu_info"]) == ("RPC", "10.0.0.2:50052")
