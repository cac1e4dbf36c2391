"""Where llama.cpp puts a model across RPC devices, from its dry run (no weights sent).

A ``no_alloc`` load with the RPC devices attached makes llama.cpp choose each layer's
device exactly as a real load would (``load_tensors: layer N assigned to device D``), and
a context on it says which device holds each layer's KV cache (``llama_kv_cache: layer N:
dev = D``) and logs each device's compute buffer. Those are debug lines: they are
collected through runtime/log.py's ``debug_lines``.

Weights and KV buffers are dummies in a dry run (they log 0.00 MiB); the caller sizes
them from the tensor table and from the dry run's exact caches (:class:`SplitContext`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localllm.runtime.dry_run import ContextPlan, DryRunModel, DryRunSettings
from localllm.runtime.log import debug_lines
from localllm.runtime.rpc_devices import DeviceHandle, RpcDevice, attach_devices

__all__ = [
    "DeviceShare",
    "SplitContext",
    "SplitDryRun",
    "cache_devices",
    "parse_placement",
]

_LAYER_LINE = re.compile(r"load_tensors: layer\s+(\d+) assigned to device (\S+?),")
# Attention caches and recurrent states log which device keeps each layer, then a size.
_KV_LAYER_LINE = re.compile(
    r"(?:llama_kv_cache: |llama_memory_recurrent, )layer\s+(\d+): dev = (\S+)"
)
_KV_SIZE_LINE = re.compile(r"(?:llama_kv_cache|llama_memory_recurrent): size =")
_BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size\s*=\s*([\d.]+) MiB")
_RPC_BUFFER = re.compile(r"RPC(\d+)\[(.+)\]$")  # buffer type "RPC<server device>[endpoint]"
_NEW_CONTEXT = "llama_context: constructing llama_context"


@dataclass(frozen=True)
class DeviceShare:
    """What llama.cpp placed on one device, from its load log.

    Layer lists come from llama.cpp's debug lines (``layer N assigned to device``); the
    output layer is number ``n_layer``. Byte counts are the MiB figures it logged, as
    bytes; a dry run (``no_alloc``) logs 0 for weights and KV, real compute sizes.
    """

    device: str  # ggml's device name: "CPU", "RPC0", ...
    endpoint: str | None  # its RPC server; None for this machine
    layers: tuple[int, ...]
    kv_layers: tuple[int, ...]
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    output_bytes: int


def _local_device(buffer_type: str, local: Sequence[str]) -> str:
    """The local device a buffer type belongs to: CUDA0, MTL0_Mapped, MTL0_Private ->
    their GPU; CPU, CPU_Mapped, CPU_REPACK, CUDA_Host (pinned host RAM)... -> CPU."""
    base = buffer_type.split("_", 1)[0]
    return base if base in local else "CPU"


def parse_placement(
    lines: Sequence[str], devices: Sequence[RpcDevice], local_gpus: Sequence[str] = ()
) -> tuple[DeviceShare, ...]:
    """Per device (CPU first, then ``devices``, then ``local_gpus`` by name): layers and
    logged buffer bytes.

    With mmap, the local ``CPU_Mapped`` weights figure is the span of the file mapped,
    not what stays resident: load with mmap off for the local share's true size.
    """
    by_server = {(d.endpoint, d.index): d.name for d in devices}
    endpoint = {d.name: d.endpoint for d in devices}
    layers: dict[str, list[int]] = {"CPU": [], **{d.name: [] for d in devices}}
    layers.update((name, []) for name in local_gpus)
    kv_layers: dict[str, list[int]] = {}
    sizes: dict[str, dict[str, int]] = {}
    for line in lines:
        if m := _LAYER_LINE.search(line):
            layers.setdefault(m[2], []).append(int(m[1]))
        elif m := _KV_LAYER_LINE.search(line):
            kv_layers.setdefault(m[2], []).append(int(m[1]))
        elif m := _BUFFER_LINE.search(line):
            rpc = _RPC_BUFFER.match(m[1])
            if rpc:
                name = by_server.get((rpc[2], int(rpc[1])), m[1])
            else:
                name = _local_device(m[1], local_gpus)
            kind = sizes.setdefault(name, {})
            kind[m[2]] = kind.get(m[2], 0) + round(float(m[3]) * 1024 * 1024)
    shares = []
    for name in dict.fromkeys([*layers, *kv_layers, *sizes]):
        size = sizes.get(name, {})
        shares.append(
            DeviceShare(
                name,
                endpoint.get(name),
                tuple(layers.get(name, ())),
                tuple(kv_layers.get(name, ())),
                size.get("model", 0),
                size.get("KV", 0),
                size.get("compute", 0),
                size.get("output", 0),
            )
        )
    return tuple(shares)


def cache_devices(lines: Sequence[str]) -> list[dict[int, str]]:
    """For each cache or recurrent state a context logged, in order: its layers' devices."""
    caches: list[dict[int, str]] = []
    current: dict[int, str] = {}
    for line in lines:
        if m := _KV_LAYER_LINE.search(line):
            current[int(m[1])] = m[2]
        elif _KV_SIZE_LINE.search(line):
            caches.append(current)
            current = {}
    return caches


def _first_context(lines: Sequence[str]) -> list[str]:
    """The lines of the first context created in ``lines`` (a plan may add probes)."""
    starts = [i for i, line in enumerate(lines) if _NEW_CONTEXT in line]
    if len(starts) < 2:
        return list(lines)
    return list(lines[starts[0] : starts[1]])


@dataclass(frozen=True)
class SplitContext:
    """One context planned across devices: llama.cpp's exact caches and who holds what."""

    plan: ContextPlan  # caches to the byte, total compute (all devices)
    shares: tuple[DeviceShare, ...]  # layers per device, compute per device (log MiB)
    cache_devices: tuple[dict[int, str], ...]  # per cache of plan.caches: layer -> device


class SplitDryRun:
    """A model dry-loaded with RPC devices and local GPUs attached: plan contexts, see
    where things go.

    ``n_gpu_layers`` and ``tensor_split`` are llama.cpp's: RPC devices count as GPUs, the
    last ``n_gpu_layers`` layers (the output layer included) are spread over the devices
    (RPC first, then ``local_gpus``, llama.cpp's own order) in ``tensor_split``
    proportions (default: by their reported memory).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        devices: Sequence[RpcDevice],
        *,
        local_gpus: Sequence[DeviceHandle] = (),
        n_gpu_layers: int = -1,
        tensor_split: Sequence[float] | None = None,
        use_extra_bufts: bool = True,
    ) -> None:
        self.devices = tuple(devices)
        self.local_names = tuple(d.name for d in local_gpus)
        attached = [*self.devices, *local_gpus]
        arrays: list[Any] = []

        def configure(params: Any) -> None:
            arrays.extend(attach_devices(params, attached, tensor_split or ()))
            params.n_gpu_layers = n_gpu_layers
            params.use_mmap = False  # nothing is read anyway; no mapping to describe

        with debug_lines() as lines:
            self.model = DryRunModel(path, use_extra_bufts=use_extra_bufts, configure=configure)
        arrays.clear()  # referenced until here: llama.cpp has copied them
        self.load_lines = tuple(lines)
        self.path = Path(path)

    @property
    def weights_bytes(self) -> int:
        return self.model.weights_bytes

    def plan(self, settings: DryRunSettings) -> SplitContext:
        with debug_lines() as lines:
            plan = self.model.plan(settings)
        context = _first_context(lines)
        shares = parse_placement([*self.load_lines, *context], self.devices, self.local_names)
        return SplitContext(plan, shares, tuple(cache_devices(context)))

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> SplitDryRun:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
