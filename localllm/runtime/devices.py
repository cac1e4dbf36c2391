"""What llama.cpp sees on this machine: ggml's compiled backends and its devices.

Devices come from ggml's device registry in libllama's own copy of libggml (the one a
load uses), through ctypes: name, description, type, backend and the free and total
memory each device reports. RPC servers given with ``--rpc`` are added as llama.cpp's
``--rpc`` adds them; llama.cpp counts their devices as GPUs, listed here as type RPC.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from localllm.runtime.library import import_llama_cpp, loaded_library
from localllm.runtime.params import LoadOptions

__all__ = [
    "DEVICE_TYPES",
    "UNIFIED_BACKENDS",
    "GgmlDevice",
    "cpu_features",
    "ggml_devices",
    "local_gpus",
    "rpc_load_devices",
    "split_applies",
]

# enum ggml_backend_dev_type (ggml-backend.h), as `system` names them.
DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "iGPU", 3: "ACCEL", 4: "META"}
# Backends whose GPU shares the host's RAM: Metal (registered as "MTL") on Apple Silicon.
UNIFIED_BACKENDS = ("MTL",)
_FEATURE = re.compile(r"(\w+)\s*=\s*1\b")


@dataclass(frozen=True)
class GgmlDevice:
    """One ggml device, as the registry reports it."""

    name: str  # ggml's name: CPU, CUDA0, MTL0, Vulkan0, RPC0...
    description: str
    type: str  # CPU, GPU, iGPU, ACCEL or RPC (an RPC server's device, a GPU to llama.cpp)
    backend: str  # the registry that owns it: CPU, CUDA, MTL, Vulkan, RPC...
    memory_total_bytes: int
    memory_free_bytes: int
    endpoint: str | None = None  # an RPC device's server
    handle: int = field(default=0, repr=False, compare=False)  # ggml_backend_dev_t

    @property
    def unified(self) -> bool:
        """Whether its memory is this machine's RAM (Metal, an iGPU): not counted twice."""
        return self.type == "iGPU" or self.backend in UNIFIED_BACKENDS

    def as_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "name": self.name,
            "description": self.description,
            "type": self.type,
            "backend": self.backend,
            "memory_total_bytes": self.memory_total_bytes,
            "memory_free_bytes": self.memory_free_bytes,
            "unified_memory": self.unified,
        }
        if self.endpoint:
            data["endpoint"] = self.endpoint
        return data


class _Registry:
    """ggml's registry functions in libllama's libggml, with their argtypes."""

    def __init__(self) -> None:
        import_llama_cpp()
        self.lib = loaded_library("ggml")
        vp, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        for name, args, res in (
            ("ggml_backend_dev_count", [], sz),
            ("ggml_backend_dev_get", [sz], vp),
            ("ggml_backend_dev_name", [vp], cp),
            ("ggml_backend_dev_description", [vp], cp),
            ("ggml_backend_dev_type", [vp], ctypes.c_int),
            ("ggml_backend_dev_memory", [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)], None),
            ("ggml_backend_dev_backend_reg", [vp], vp),
            ("ggml_backend_reg_count", [], sz),
            ("ggml_backend_reg_get", [sz], vp),
            ("ggml_backend_reg_name", [vp], cp),
        ):
            func = getattr(self.lib, name)
            func.argtypes, func.restype = args, res

    def text(self, func: str, handle: int) -> str:
        return (getattr(self.lib, func)(handle) or b"").decode(errors="replace")

    def device(self, handle: int, endpoint: str | None = None) -> GgmlDevice:
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        self.lib.ggml_backend_dev_memory(handle, ctypes.byref(free), ctypes.byref(total))
        backend = self.text("ggml_backend_reg_name", self.lib.ggml_backend_dev_backend_reg(handle))
        kind = DEVICE_TYPES.get(self.lib.ggml_backend_dev_type(handle), "unknown")
        return GgmlDevice(
            name=self.text("ggml_backend_dev_name", handle),
            description=self.text("ggml_backend_dev_description", handle),
            type="RPC" if backend.startswith("RPC") else kind,
            backend=backend,
            memory_total_bytes=total.value,
            memory_free_bytes=free.value,
            endpoint=endpoint,
            handle=handle,
        )

    def backends(self) -> tuple[str, ...]:
        return tuple(
            self.text("ggml_backend_reg_name", self.lib.ggml_backend_reg_get(i))
            for i in range(self.lib.ggml_backend_reg_count())
        )


def ggml_devices(endpoints: Sequence[str] = ()) -> tuple[tuple[str, ...], tuple[GgmlDevice, ...]]:
    """ggml's compiled backends and every device, then each ``--rpc`` server's devices.

    Each endpoint is checked first (one line naming a dead server); its devices are asked
    their memory through ggml's own RPC client.
    """
    registry = _Registry()
    devices = [
        registry.device(registry.lib.ggml_backend_dev_get(i))
        for i in range(registry.lib.ggml_backend_dev_count())
    ]
    if endpoints:
        from localllm.runtime.rpc_devices import add_rpc_servers

        known = {d.name for d in devices}
        for rpc in add_rpc_servers(endpoints):
            if rpc.name not in known:  # already in the registry: listed above
                devices.append(registry.device(rpc.handle, rpc.endpoint))
    return registry.backends(), tuple(devices)


def local_gpus() -> tuple[GgmlDevice, ...]:
    """This machine's GPU and iGPU devices (RPC servers' devices are not local)."""
    return tuple(d for d in ggml_devices()[1] if d.type in ("GPU", "iGPU"))


def split_applies(options: LoadOptions) -> bool:
    """Whether a load puts layers on other devices than this CPU (--rpc, or a GPU here):
    then plan/split.py checks each device's share against that device's memory."""
    if options.rpc:
        return True
    return options.n_gpu_layers != 0 and bool(local_gpus())


def cpu_features(info: str) -> tuple[str, ...]:
    """The features llama_print_system_info() reports as 1 (AVX2, NEON, AMX_INT8, ...)."""
    return tuple(_FEATURE.findall(info))


@contextlib.contextmanager
def rpc_load_devices(endpoints: Sequence[str]) -> Iterator[None]:
    """With --rpc: loads in the block place layers on these servers' devices (checked
    first), then on this machine's GPUs (llama.cpp's own order, as the split plan's dry
    run); without, nothing changes."""
    if not endpoints:
        yield
        return
    from localllm.runtime.rpc_devices import add_rpc_servers, model_devices

    with model_devices([*add_rpc_servers(endpoints), *local_gpus()]):
        yield
