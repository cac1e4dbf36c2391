"""`localllm system`: ggml's devices and memory, macOS's available memory, bench's backends.

No GPU here: an RPC server stands in for one (llama.cpp counts RPC devices as GPUs), and
macOS is represented by the output of real Macs, recorded below with where it comes from.
"""

# ruff: noqa: UP031  (llama.cpp's log lines are written with its own printf formats)
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


# ------------------------------------------------------ GPUs in the split plan (no GPU here)


def _gpu_load_log(gpu: str = "CUDA0", host: str = "CUDA_Host", model: str = "") -> list[str]:
    """A load and a context on ``gpu`` with -ngl 3 of 4 layers + output, in the format strings
    of llama.cpp at the pinned commit (llama-model.cpp, llama-kv-cache.cpp,
    llama-context.cpp); written here, as no GPU machine is at hand."""
    lines = [
        "load_tensors: layer %3d assigned to device %s, is_swa = %d" % (i, dev, 0)
        for i, dev in enumerate(["CPU", "CPU", gpu, gpu, gpu])
    ]
    lines += [
        "load_tensors: %12s model buffer size = %8.2f MiB" % ("CPU_Mapped", 70.31),
        "load_tensors: %12s model buffer size = %8.2f MiB" % (model or gpu, 500.0),
        "llama_context: constructing llama_context",
    ]
    lines += [
        "llama_kv_cache: layer %3d: dev = %s" % (i, d)
        for i, d in enumerate(["CPU"] * 2 + [gpu] * 2)
    ]
    lines += [
        "llama_kv_cache: %10s KV buffer size = %8.2f MiB" % ("CPU", 8.0),
        "llama_kv_cache: %10s KV buffer size = %8.2f MiB" % (gpu, 8.0),
        "llama_kv_cache: size = %7.2f MiB (%6u cells, %3d layers, %2u/%u seqs), K (%s): %7.2f MiB, "
        "V (%s): %7.2f MiB" % (16.0, 4096, 4, 1, 1, "f16", 8.0, "f16", 8.0),
        "llama_context: %10s  output buffer size = %8.2f MiB" % (host, 0.19),
        "llama_context: %10s compute buffer size = %8.2f MiB" % (gpu, 120.5),
        "llama_context: %10s compute buffer size = %8.2f MiB" % (host, 12.01),
    ]
    return lines


def test_placement_names_a_local_gpu_and_keeps_pinned_host_memory_here() -> None:
    from localllm.runtime.rpc_plan import parse_placement

    shares = {s.device: s for s in parse_placement(_gpu_load_log(), (), ["CUDA0"])}
    assert list(shares) == ["CPU", "CUDA0"]
    cpu, gpu = shares["CPU"], shares["CUDA0"]
    assert (cpu.layers, gpu.layers) == ((0, 1), (2, 3, 4))
    assert (cpu.kv_layers, gpu.kv_layers) == ((0, 1), (2, 3))
    assert gpu.endpoint is None  # a local device, not a server's
    assert gpu.weights_bytes == round(500.0 * MIB) and cpu.weights_bytes == round(70.31 * MIB)
    assert gpu.compute_bytes == round(120.5 * MIB)
    # CUDA_Host is pinned RAM of this machine: its compute and output buffers stay here.
    assert (cpu.compute_bytes, cpu.output_bytes) == (round(12.01 * MIB), round(0.19 * MIB))


def test_metal_buffer_types_are_the_metal_device_s() -> None:
    from localllm.runtime.rpc_plan import parse_placement

    # Metal's weights buffer is MTL0_Mapped (mmap) or MTL0_Private; host buffers are CPU.
    lines = _gpu_load_log("MTL0", "CPU", model="MTL0_Mapped")
    shares = {s.device: s for s in parse_placement(lines, (), ["MTL0"])}
    assert shares["MTL0"].weights_bytes == round(500.0 * MIB)
    assert shares["MTL0"].layers == (2, 3, 4)


MIB = 1 << 20
# recommendedMaxWorkingSetSize of a 16 GB M1 as llama.cpp logged it ("10922.67 MB"), from
# abetlen/llama-cpp-python issue #687: what ggml reports as the Metal device's memory.
M1_16GB_WORKING_SET = round(10922.67 * MIB)


def _split_context(gpu: str):
    from localllm.runtime.dry_run import CacheReport, ContextPlan, DryRunSettings
    from localllm.runtime.rpc_plan import DeviceShare, SplitContext

    cache = CacheReport("kv", 4096, 1, 4, "f16", "f16", 512 * MIB, 512 * MIB)
    plan = ContextPlan(DryRunSettings(4096), (cache,), cache.bytes, 300 * MIB, 1 * MIB)
    shares = (
        DeviceShare("CPU", None, (0, 1), (0, 1), 0, 0, 20 * MIB, 1 * MIB),
        DeviceShare(gpu, None, (2, 3, 4), (2, 3), 0, 0, 280 * MIB, 0),
    )
    devices = {i: "CPU" if i < 2 else gpu for i in range(4)}
    return SplitContext(plan, shares, (devices,))


@pytest.mark.parametrize("unified", [True, False], ids=["metal", "cuda"])
def test_a_unified_gpu_s_share_counts_once_against_this_machine_s_ram(unified: bool) -> None:
    from localllm.plan.split import THIS_MACHINE, host_shares

    name, backend = ("MTL0", "MTL") if unified else ("CUDA0", "CUDA")
    gpu = GgmlDevice(name, "gpu", "GPU", backend, M1_16GB_WORKING_SET, M1_16GB_WORKING_SET)
    weights = {None: 100 * MIB, 0: 1000 * MIB, 1: 1000 * MIB, 2: 1000 * MIB, 3: 1000 * MIB,
               4: 2000 * MIB}  # fmt: skip
    memory = {THIS_MACHINE: 4 << 30, name: gpu.memory_free_bytes}
    here, there = host_shares(_split_context(name), weights, memory, (gpu,))
    assert (here.host, there.host, there.unified) == (THIS_MACHINE, name, unified)
    assert here.weights_bytes == 2100 * MIB and there.weights_bytes == 4000 * MIB
    assert (here.kv_bytes, there.kv_bytes) == (512 * MIB, 512 * MIB)
    assert there.verdict == "fits"  # 4.8 GiB in a 10.7 GiB working set
    # Here: 2.6 GiB of its own share in 4 GiB. On unified memory the GPU's 4.8 GiB are in
    # the same RAM: 7.4 GiB, too big; a discrete GPU's are not.
    assert here.shared_bytes == (there.total_bytes if unified else 0)
    assert here.verdict == ("too big" if unified else "fits")


def test_no_gpu_and_no_rpc_means_no_split_here() -> None:
    from localllm.runtime.devices import local_gpus, split_applies
    from localllm.runtime.params import LoadOptions

    if local_gpus():
        pytest.skip("this machine has a GPU")
    assert not split_applies(LoadOptions())
    assert split_applies(LoadOptions(rpc=("127.0.0.1:50052",)))


def test_ngl_without_a_gpu_or_rpc_is_refused_in_one_line(cli, store_with_smollm2: Path) -> None:
    result = cli("kv-calc", "--ctx", "512", "-ngl", "10")
    assert result.exit_code != 0
    assert "-ngl 10 places layers on a GPU or --rpc devices" in result.error_line
