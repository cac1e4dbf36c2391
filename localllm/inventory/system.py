"""`localllm system`'s core: what llama.cpp sees here and the defaults localllm derives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from localllm.errors import LocalLLMError
from localllm.machine import available_memory, memory_bandwidth, physical_cores, ram_bytes
from localllm.runtime.devices import GgmlDevice, cpu_features, ggml_devices
from localllm.runtime.library import choose_repack, llama_cpp_version, system_info

__all__ = ["SystemReport", "system_report"]


@dataclass(frozen=True)
class SystemReport:
    """`localllm system`: what llama.cpp sees here and the defaults localllm derives."""

    llama_cpp_python: str
    backends: tuple[str, ...]  # compiled (registered) backends: CPU, RPC, CUDA, MTL...
    devices: tuple[GgmlDevice, ...]
    cpu_features: tuple[str, ...]
    system_info: str
    repack: bool
    repack_reason: str
    threads: int  # the default: physical cores, as llama.cpp
    gpu_layers_default: str  # what -ngl's default (-1) does here
    ram_bytes: int
    available_memory_bytes: int | None
    available_memory_source: str
    bandwidth_bytes_per_s: float | None
    bandwidth_note: str  # how it was measured, or why not

    @property
    def gpu_devices(self) -> tuple[GgmlDevice, ...]:
        return tuple(d for d in self.devices if d.type in ("GPU", "iGPU", "RPC"))

    def as_json(self) -> dict[str, Any]:
        return {
            "llama_cpp_python": self.llama_cpp_python,
            "backends": list(self.backends),
            "devices": [d.as_json() for d in self.devices],
            "cpu_features": list(self.cpu_features),
            "system_info": self.system_info,
            "repack": self.repack,
            "repack_reason": self.repack_reason,
            "threads": self.threads,
            "gpu_layers_default": self.gpu_layers_default,
            "ram_bytes": self.ram_bytes,
            "available_memory_bytes": self.available_memory_bytes,
            "available_memory_source": self.available_memory_source,
            "memory_bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "memory_bandwidth_note": self.bandwidth_note,
        }


def _gpu_layers_default(devices: Sequence[GgmlDevice]) -> str:
    local = [d.name for d in devices if d.type in ("GPU", "iGPU")]
    if local:
        return f"all layers on {', '.join(local)} (-ngl -1)"
    if any(d.type == "RPC" for d in devices):
        return "all layers on the --rpc devices (-ngl -1)"
    return "no GPU backend: every layer on the CPU"


def system_report(endpoints: Sequence[str] = (), *, bandwidth: bool = True) -> SystemReport:
    """Backends, devices, CPU features, defaults and memory of this machine."""
    backends, devices = ggml_devices(endpoints)
    info = system_info()
    choice = choose_repack(None)
    reason = choice.note or (
        "llama.cpp's default: weights repacked for this CPU's kernels"
        if choice.repack
        else "llama.cpp's default"
    )
    bw, bw_note = None, "not measured (--no-bandwidth)"
    if bandwidth:
        try:
            measured = memory_bandwidth()
            bw = measured.bytes_per_s
            bw_note = f"{measured.method}; {'cached' if measured.cached else 'measured now'}"
        except LocalLLMError as exc:
            bw_note = str(exc)
    avail = available_memory()
    return SystemReport(
        llama_cpp_python=llama_cpp_version(),
        backends=backends,
        devices=devices,
        cpu_features=cpu_features(info),
        system_info=info,
        repack=choice.repack,
        repack_reason=reason,
        threads=physical_cores(),
        gpu_layers_default=_gpu_layers_default(devices),
        ram_bytes=ram_bytes(),
        available_memory_bytes=avail.bytes,
        available_memory_source=avail.source,
        bandwidth_bytes_per_s=bw,
        bandwidth_note=bw_note,
    )
