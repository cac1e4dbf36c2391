"""The llama.cpp library itself: importing it lazily, and what build and devices it has."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from localllm.errors import ModelLoadError

__all__ = ["LlamaBuild", "import_llama_cpp", "llama_build", "llama_cpp_version"]


def import_llama_cpp() -> Any:
    """Import llama_cpp (and load its shared library) on first need, as a domain error."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelLoadError(
            f"llama-cpp-python is not importable ({exc}); run `make setup`"
        ) from None
    return llama_cpp


def llama_cpp_version() -> str:
    """llama-cpp-python's version, read without importing (and loading) the library."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class LlamaBuild:
    """What llama.cpp build is running and on what devices, as llama-bench reports it."""

    llama_cpp_python: str
    ggml_version: str
    commit: str  # ggml_commit(): the llama.cpp commit the library was built from
    cpu_info: str  # CPU device descriptions, joined like llama-bench's get_cpu_info
    gpu_info: str
    backends: str  # registered backends other than CPU, or "CPU"
    system_info: str  # llama_print_system_info(): the CPU features compiled in


def _cstr(lib: Any, name: str, argtypes: list[Any]) -> Any:
    func = getattr(lib, name)
    func.argtypes = argtypes
    func.restype = ctypes.c_char_p
    return func


def _bind_registry(lib: Any) -> None:
    """argtypes of ggml's device and backend registry functions (not in the bindings)."""
    for name, args, res in (
        ("ggml_backend_dev_count", [], ctypes.c_size_t),
        ("ggml_backend_dev_get", [ctypes.c_size_t], ctypes.c_void_p),
        ("ggml_backend_dev_type", [ctypes.c_void_p], ctypes.c_int),
        ("ggml_backend_reg_count", [], ctypes.c_size_t),
        ("ggml_backend_reg_get", [ctypes.c_size_t], ctypes.c_void_p),
        ("ggml_backend_reg_dev_count", [ctypes.c_void_p], ctypes.c_size_t),
    ):
        func = getattr(lib, name)
        func.argtypes, func.restype = args, res


def llama_build() -> LlamaBuild:
    """Versions, commit and devices of the loaded llama.cpp (ggml's device registry)."""
    llama_cpp = import_llama_cpp()
    from llama_cpp import _ggml

    lib = _ggml.libggml
    _bind_registry(lib)
    describe = _cstr(lib, "ggml_backend_dev_description", [ctypes.c_void_p])
    reg_name = _cstr(lib, "ggml_backend_reg_name", [ctypes.c_void_p])
    # enum ggml_backend_dev_type: 0 CPU, 1 GPU, 2 IGPU, 3 ACCEL (ggml-backend.h)
    cpus, gpus = [], []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        text = (describe(dev) or b"").decode(errors="replace")
        if kind in (0, 3):
            cpus.append(text)
        elif kind in (1, 2):
            gpus.append(text)
    backends, rpc_used = [], False
    for i in range(lib.ggml_backend_reg_count()):
        reg = lib.ggml_backend_reg_get(i)
        name = (reg_name(reg) or b"").decode(errors="replace")
        if name.startswith("RPC"):
            rpc_used = rpc_used or lib.ggml_backend_reg_dev_count(reg) > 0
        elif name != "CPU":
            backends.append(name)
    if rpc_used:
        backends.append("RPC")
    return LlamaBuild(
        llama_cpp_python=llama_cpp_version(),
        ggml_version=_cstr(lib, "ggml_version", [])().decode(errors="replace"),
        commit=_cstr(lib, "ggml_commit", [])().decode(errors="replace"),
        cpu_info=", ".join(cpus),
        gpu_info=", ".join(gpus),
        backends=",".join(backends) if backends else "CPU",
        system_info=llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    )
