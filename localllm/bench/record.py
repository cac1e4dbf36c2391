"""Bench results as records: llama-bench's fields, names, order and types, then ours.

Every record carries llama-bench's fields (so tools that read llama-bench output read
ours) and ours: peak RSS, the buffers llama.cpp allocated, the roofline fraction of
``tg`` and the machine and software the result was measured with. The formats (md, csv,
json, jsonl) are in :mod:`localllm.bench.formats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from localllm.bench.request import BenchTest
from localllm.machine import Bandwidth
from localllm.runtime.params import FLASH_ATTN_TYPES
from localllm.text import format_ranges

__all__ = [
    "EXTRA_FIELDS",
    "LLAMA_BENCH_FIELDS",
    "BenchResult",
    "Environment",
    "MemoryFigures",
    "RpcSplit",
]

# llama-bench's test::get_fields() of the llama.cpp build we run, in order, with the JSON
# type of each (test::get_field_type): i int, b bool, f float, s string.
LLAMA_BENCH_FIELDS: dict[str, str] = {
    "build_commit": "s",
    "build_number": "i",
    "cpu_info": "s",
    "gpu_info": "s",
    "backends": "s",
    "model_filename": "s",
    "model_type": "s",
    "model_size": "i",
    "model_n_params": "i",
    "n_batch": "i",
    "n_ubatch": "i",
    "n_threads": "i",
    "cpu_mask": "s",
    "cpu_strict": "b",
    "poll": "i",
    "type_k": "s",
    "type_v": "s",
    "n_gpu_layers": "i",
    "n_cpu_moe": "i",
    "split_mode": "s",
    "main_gpu": "i",
    "no_kv_offload": "b",
    "flash_attn": "i",
    "devices": "s",
    "tensor_split": "s",
    "tensor_buft_overrides": "s",
    "load_mode": "s",
    "lazy_mode": "s",
    "embeddings": "b",
    "no_op_offload": "i",
    "no_host": "b",
    "repack": "b",
    "fit_target": "i",
    "fit_min_ctx": "i",
    "n_prompt": "i",
    "n_gen": "i",
    "n_depth": "i",
    "test_time": "s",
    "avg_ns": "i",
    "stddev_ns": "i",
    "avg_ts": "f",
    "stddev_ts": "f",
}
# What llama-bench records for the settings localllm leaves at llama.cpp's defaults
# (the model loads with llama_model_default_params, contexts with the context defaults).
_FIXED_FIELDS: dict[str, Any] = {
    "cpu_mask": "0x0",
    "cpu_strict": False,
    "poll": 50,
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": False,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": False,
    "no_op_offload": 0,
    "no_host": False,
    "fit_target": 0,
    "fit_min_ctx": 0,
}
# Ours, after llama-bench's fields and samples (CSV leaves out the samples, as llama-bench).
EXTRA_FIELDS = (
    "tool",
    "localllm_version",
    "n_ctx",
    "n_ctx_cells",
    "flash_attn_used",
    "rope",
    "repetitions",
    "warmup",
    "peak_rss_bytes",
    "weights_bytes",
    "kv_bytes",
    "compute_bytes",
    "output_bytes",
    "swa_full",
    "plan_source",
    "plan_weights_bytes",
    "plan_kv_bytes",
    "plan_compute_bytes",
    "plan_output_bytes",
    "bandwidth_bytes_per_s",
    "tg_bytes_per_token",
    "roofline_ts",
    "roofline_fraction",
    "cpu_model",
    "cpu_cores",
    "cpu_threads",
    "ram_bytes",
    "os",
    "python_version",
    "llama_cpp_python_version",
    "llama_cpp_build",
    "ggml_version",
    "model_sha256",
    "synthetic",
    "synthetic_source",
    "rpc_servers",
    "layer_split",
)


@dataclass(frozen=True)
class Environment:
    """What a result was measured on and with."""

    cpu_model: str
    cpu_info: str  # llama.cpp's CPU device description (llama-bench's cpu_info)
    gpu_info: str
    backends: str
    cpu_cores: int  # physical
    cpu_threads: int  # logical CPUs this process may use
    ram_bytes: int
    os: str
    python_version: str
    llama_cpp_python_version: str
    llama_cpp_build: str  # ggml_commit() of the loaded library
    ggml_version: str
    system_info: str
    localllm_version: str
    model_path: str
    model_sha256: str


@dataclass(frozen=True)
class MemoryFigures:
    """A test's memory as planned before loading: llama.cpp's dry run, or the estimate."""

    source: str
    weights_bytes: int | None
    kv_bytes: int
    compute_bytes: int | None
    output_bytes: int | None


@dataclass(frozen=True)
class RpcSplit:
    """A model measured across llama.cpp RPC servers: who held which layers."""

    endpoints: tuple[str, ...]
    n_gpu_layers: int
    tensor_split: tuple[float, ...]
    layers: tuple[tuple[str, tuple[int, ...]], ...]  # (device, layers); output = n_layer

    @property
    def tensor_split_field(self) -> str:
        """llama-bench's tensor_split: each share as %.2f, joined by "/"; "0.00" unset."""
        return "/".join(f"{x:.2f}" for x in self.tensor_split) or "0.00"

    @property
    def gpu_descriptions(self) -> tuple[str, ...]:
        """Its RPC devices as ggml describes them (each one's endpoint), in order."""
        return tuple(
            device.split("[", 1)[1].rstrip("]") for device, _layers in self.layers if "[" in device
        )

    @property
    def layer_split_field(self) -> str:
        """Each device and its layer range: "CPU 0-10/RPC0[127.0.0.1:50052] 11-30"."""
        return "/".join(
            f"{device} {format_ranges(layers)}" for device, layers in self.layers if layers
        )


@dataclass(frozen=True)
class BenchResult:
    """One finished test: its samples and everything needed to make its record."""

    test: BenchTest
    samples_ns: tuple[int, ...]
    test_time: str
    model_filename: str
    model_type: str
    model_size: int
    model_n_params: int
    n_ctx_cells: int
    flash_attn_used: bool | None
    rope: str
    peak_rss_bytes: int
    weights_bytes: int | None
    kv_bytes: int | None
    compute_bytes: int | None
    output_bytes: int | None
    tg_bytes_per_token: int | None
    bandwidth: Bandwidth | None
    environment: Environment
    repetitions: int
    warmup: bool
    repack: bool = True  # weights in llama.cpp's extra (repacked) buffers: use_extra_bufts
    swa_full: bool = False  # the sliding-window cache at full size (llama-bench: no)
    plan: MemoryFigures | None = None  # the plan before loading (llama.cpp's dry run)
    synthetic: str | None = None  # random weights: where their tensor table came from
    split: RpcSplit | None = None  # layers on llama.cpp RPC servers (--rpc)

    # -- llama-bench's statistics (avg and stdev in llama-bench.cpp)
    @property
    def samples_ts(self) -> list[float]:
        return [1e9 * self.test.n_tokens / ns for ns in self.samples_ns]

    @property
    def avg_ns(self) -> int:
        return int(sum(self.samples_ns) // len(self.samples_ns))

    @property
    def stddev_ns(self) -> int:
        return int(_stdev([float(x) for x in self.samples_ns]))

    @property
    def avg_ts(self) -> float:
        ts = self.samples_ts
        return sum(ts) / len(ts)

    @property
    def stddev_ts(self) -> float:
        return _stdev(self.samples_ts)

    @property
    def backends(self) -> str:
        """llama-bench's backends: the GPU backends compiled in, then RPC when --rpc is used."""
        if self.split is None:
            return self.environment.backends
        names = [b for b in self.environment.backends.split(",") if b not in ("", "CPU", "RPC")]
        return ",".join([*names, "RPC"])

    @property
    def gpu_info(self) -> str:
        """llama-bench's gpu_info: every GPU device's description, RPC devices (their endpoint)
        included, as llama-bench --rpc registers them."""
        rpc = self.split.gpu_descriptions if self.split is not None else ()
        return ", ".join(d for d in (self.environment.gpu_info, *rpc) if d)

    @property
    def roofline_ts(self) -> float | None:
        if self.tg_bytes_per_token is None or self.bandwidth is None:
            return None
        return self.bandwidth.bytes_per_s / self.tg_bytes_per_token

    @property
    def roofline_fraction(self) -> float | None:
        roof = self.roofline_ts
        return self.avg_ts / roof if roof else None

    def record(self) -> dict[str, Any]:
        """llama-bench's fields (names, order, types), its samples, then ours."""
        t, env = self.test, self.environment
        values: dict[str, Any] = {
            "build_commit": env.llama_cpp_build,
            "build_number": 0,  # llama-cpp-python does not carry llama.cpp's build count
            "cpu_info": env.cpu_info,
            "gpu_info": self.gpu_info,
            "backends": self.backends,
            "model_filename": self.model_filename,
            "model_type": self.model_type,
            "model_size": self.model_size,
            "model_n_params": self.model_n_params,
            "n_batch": t.n_batch,
            "n_ubatch": t.n_ubatch,
            "n_threads": t.n_threads,
            "type_k": t.type_k,
            "type_v": t.type_v,
            "flash_attn": FLASH_ATTN_TYPES[t.flash_attn],
            "n_prompt": t.n_prompt,
            "n_gen": t.n_gen,
            "n_depth": t.n_depth,
            "test_time": self.test_time,
            "avg_ns": self.avg_ns,
            "stddev_ns": self.stddev_ns,
            "avg_ts": round(self.avg_ts, 6),
            "stddev_ts": round(self.stddev_ts, 6),
            "repack": self.repack,
            **_FIXED_FIELDS,
        }
        if self.split is not None:  # as llama-bench --rpc records them
            values["n_gpu_layers"] = self.split.n_gpu_layers
            values["tensor_split"] = self.split.tensor_split_field
        record = {name: values[name] for name in LLAMA_BENCH_FIELDS}
        record["samples_ns"] = list(self.samples_ns)
        record["samples_ts"] = [round(x, 6) for x in self.samples_ts]
        ours = self._our_fields()
        record.update((name, ours[name]) for name in EXTRA_FIELDS)
        return record

    def _our_fields(self) -> dict[str, Any]:
        env, bw = self.environment, self.bandwidth
        return {
            "tool": "localllm",
            "localllm_version": env.localllm_version,
            "n_ctx": self.test.n_ctx,
            "n_ctx_cells": self.n_ctx_cells,
            "flash_attn_used": self.flash_attn_used,
            "rope": self.rope,
            "repetitions": self.repetitions,
            "warmup": self.warmup,
            "peak_rss_bytes": self.peak_rss_bytes,
            "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes,
            "compute_bytes": self.compute_bytes,
            "output_bytes": self.output_bytes,
            "swa_full": self.swa_full,
            "plan_source": self.plan.source if self.plan else None,
            "plan_weights_bytes": self.plan.weights_bytes if self.plan else None,
            "plan_kv_bytes": self.plan.kv_bytes if self.plan else None,
            "plan_compute_bytes": self.plan.compute_bytes if self.plan else None,
            "plan_output_bytes": self.plan.output_bytes if self.plan else None,
            "bandwidth_bytes_per_s": round(bw.bytes_per_s) if bw else None,
            "tg_bytes_per_token": self.tg_bytes_per_token,
            "roofline_ts": _round(self.roofline_ts, 3),
            "roofline_fraction": _round(self.roofline_fraction, 4),
            "cpu_model": env.cpu_model,
            "cpu_cores": env.cpu_cores,
            "cpu_threads": env.cpu_threads,
            "ram_bytes": env.ram_bytes,
            "os": env.os,
            "python_version": env.python_version,
            "llama_cpp_python_version": env.llama_cpp_python_version,
            "llama_cpp_build": env.llama_cpp_build,
            "ggml_version": env.ggml_version,
            "model_sha256": env.model_sha256,
            "synthetic": self.synthetic is not None,
            "synthetic_source": self.synthetic,
            "rpc_servers": ",".join(self.split.endpoints) if self.split else None,
            "layer_split": self.split.layer_split_field if self.split else None,
        }


def _stdev(values: Sequence[float]) -> float:
    """llama-bench's stdev: the sample standard deviation, 0 for a single sample."""
    n = len(values)
    if n <= 1:
        return 0.0
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
