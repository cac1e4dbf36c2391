"""The llama.cpp library itself: importing it lazily, and what build and devices it has."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from localllm.errors import ModelLoadError

__all__ = [
    "AMX_REPACK_NOTE",
    "LlamaBuild",
    "RepackChoice",
    "choose_repack",
    "cpu_has_amx",
    "import_llama_cpp",
    "library_fingerprint",
    "llama_build",
    "llama_cpp_version",
    "load_log_uses_amx",
    "loaded_library",
    "system_info",
]

# llama.cpp at the pinned commit crashes in its AMX kernels when weights are repacked
# (SIGSEGV in ggml_backend_amx_mul_mat, SIGILL in tinygemm_kernel_amx): llama.cpp#20824.
AMX_REPACK_NOTE = (
    "this CPU has AMX, whose kernels in this llama.cpp build crash when weights are "
    "repacked (ggml-org/llama.cpp#20824): loading without repacking; --repack 1 forces it"
)


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


def library_fingerprint() -> tuple[tuple[str, int, int], ...]:
    """Which llama.cpp build is installed, without loading it: the name, size and mtime of
    llama_cpp's ``__init__.py`` and of each shared library (a rebuild changes them)."""
    from importlib.util import find_spec
    from pathlib import Path

    spec = find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return ()
    package = Path(next(iter(spec.submodule_search_locations)))
    files = [package / "__init__.py", *sorted((package / "lib").glob("*"))]
    found = []
    for file in files:
        try:
            st = file.stat()
        except OSError:
            continue
        found.append((file.name, st.st_size, st.st_mtime_ns))
    return tuple(found)


def loaded_library(name: str, libdir: Path | None = None) -> Any:
    """A CDLL over the very file libllama already mapped for ``lib<name>``.

    The wheel ships ``libggml.so``, ``.so.0`` and ``.so.0.x`` as three copies (wheels
    hold no symlinks), and libllama maps the ``.so.0`` ones: opening another copy would
    load a second ggml with its own device registry and RPC connections.
    """
    llama_cpp = import_llama_cpp()
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rstrip("\n").split(maxsplit=5)[-1]
            base = os.path.basename(path)
            if path.startswith("/") and re.fullmatch(rf"lib{re.escape(name)}\.so\.\d+", base):
                return ctypes.CDLL(path)
    from llama_cpp._ctypes_extensions import load_shared_library

    libdir = libdir or Path(llama_cpp.__file__).resolve().parent / "lib"
    return load_shared_library(name, libdir)  # not Linux: the loader's own naming


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
    # libllama's own ggml: llama_cpp._ggml opens another copy, whose registry never sees
    # the RPC servers added for a load.
    lib = loaded_library("ggml")
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
        system_info=system_info(),
    )


@cache
def system_info() -> str:
    """llama_print_system_info(): the CPU features this llama.cpp build uses here."""
    llama_cpp = import_llama_cpp()
    return str(llama_cpp.llama_print_system_info().decode(errors="replace").strip())


def cpu_has_amx(info: str) -> bool:
    """Whether ggml's system info reports AMX (``AMX_INT8 = 1``)."""
    return re.search(r"\bAMX_INT8\s*=\s*1\b", info) is not None


def load_log_uses_amx(lines: Sequence[str]) -> bool:
    """Whether a load put weights in ggml's AMX buffer (``AMX model buffer size``)."""
    return any(re.search(r"\bAMX model buffer size\b", line) for line in lines)


@dataclass(frozen=True)
class RepackChoice:
    """Whether weights are repacked (llama.cpp's use_extra_bufts), and why it says so."""

    repack: bool
    note: str | None = None  # set when localllm changed llama.cpp's default


def choose_repack(requested: bool | None) -> RepackChoice:
    """--repack as given, else llama.cpp's default (on) except on AMX CPUs (off)."""
    if requested is not None:
        return RepackChoice(requested)
    if cpu_has_amx(system_info()):
        return RepackChoice(False, AMX_REPACK_NOTE)
    return RepackChoice(True)
