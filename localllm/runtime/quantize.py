"""llama.cpp's own quantizers, for synthetic weights: valid blocks and the type plan.

Two entry points, both thin wrappers over ggml / llama.cpp C functions:

- :func:`quantize_rows` runs ``ggml_quantize_chunk`` (ctypes into ``libggml-base`` from
  llama-cpp-python's lib directory) on float rows, so every block it returns has the
  scales and grid indices ggml itself would write: no NaN/Inf paths at inference.
- :func:`plan_quant_types` runs ``llama_model_quantize`` with ``dry_run``: llama.cpp
  decides each tensor's type for a file type (Q4_K_M keeps some tensors at Q6_K, ...)
  and logs it without reading or writing any tensor data; the log is parsed here.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from localllm.errors import InvalidArgument, ModelLoadError
from localllm.runtime.library import import_llama_cpp
from localllm.runtime.log import install_log_capture, log_mark, log_since

__all__ = [
    "QUANTIZABLE_TYPES",
    "QuantPlan",
    "ggml_type_ids",
    "plan_quant_types",
    "quantize_rows",
    "rows_are_valid",
]

# ggml types that ggml_quantize_chunk can write (its switch, ggml.c at this commit).
# Anything else hits `assert(false)` there, compiled out in release builds: the output
# would be uninitialised memory, so callers are refused before the call instead.
QUANTIZABLE_TYPES: frozenset[int] = frozenset(
    {2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 29, 34, 35, 39, 40, 41, 42}
)


# GGML_TYPE_COUNT in ggml.h at the pinned commit (llama-cpp-python 0.3.36).
_GGML_TYPE_COUNT = 43


@cache
def _ggml() -> Any:
    """libggml-base, with the signatures this module calls."""
    llama_cpp = import_llama_cpp()
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*"))
    if not candidates:
        raise ModelLoadError(f"no libggml-base in {lib_dir}; reinstall llama-cpp-python")
    lib = ctypes.CDLL(str(candidates[0]))
    i64, size_t, ptr, gtype = ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
    signatures = {
        "ggml_quantize_chunk": (size_t, [gtype, ptr, ptr, i64, i64, i64, ptr]),
        "ggml_quantize_requires_imatrix": (ctypes.c_bool, [gtype]),
        "ggml_validate_row_data": (ctypes.c_bool, [gtype, ptr, size_t]),
        "ggml_row_size": (size_t, [gtype, i64]),
        "ggml_blck_size": (i64, [gtype]),
        "ggml_type_name": (ctypes.c_char_p, [gtype]),
    }
    for name, (restype, argtypes) in signatures.items():
        func = getattr(lib, name)
        func.restype, func.argtypes = restype, argtypes
    return lib


@cache
def ggml_type_ids() -> dict[str, int]:
    """ggml's own type names (``q4_K``, ``f16``...) -> type ids, from ggml_type_name."""
    lib = _ggml()
    names: dict[str, int] = {}
    # ggml_type_name indexes a static table: ids past GGML_TYPE_COUNT would read beyond it.
    for type_id in range(_GGML_TYPE_COUNT):
        if lib.ggml_blck_size(type_id) > 0:  # removed types report a block size of 0
            names[lib.ggml_type_name(type_id).decode()] = type_id
    return names


def quantize_rows(type_id: int, rows: np.ndarray) -> np.ndarray:
    """Float32 ``rows`` (2-D) quantized by ggml to ``type_id``: uint8, one row per input row."""
    if type_id not in QUANTIZABLE_TYPES:
        raise InvalidArgument(f"ggml type {type_id} has no quantizer in ggml_quantize_chunk")
    lib = _ggml()
    src = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, n_per_row = src.shape
    if n_per_row % lib.ggml_blck_size(type_id):
        raise InvalidArgument(
            f"rows of {n_per_row} values do not split into blocks of "
            f"{lib.ggml_blck_size(type_id)} for ggml type {type_id}"
        )
    row_bytes = lib.ggml_row_size(type_id, n_per_row)
    dst = np.empty((nrows, row_bytes), dtype=np.uint8)
    # IQ2_XXS, IQ2_XS and IQ1_S assert on a missing importance matrix: a flat one
    # weighs every column alike, as quantizing without calibration data would.
    imatrix = np.ones(n_per_row, dtype=np.float32)
    needs_imatrix = lib.ggml_quantize_requires_imatrix(type_id)
    written = lib.ggml_quantize_chunk(
        type_id,
        src.ctypes.data,
        dst.ctypes.data,
        0,
        nrows,
        n_per_row,
        imatrix.ctypes.data if needs_imatrix else None,
    )
    if written != dst.size:
        raise ModelLoadError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.size}")
    return dst


def rows_are_valid(type_id: int, data: np.ndarray) -> bool:
    """ggml_validate_row_data: llama.cpp's own NaN/Inf check of quantized or float data."""
    buf = np.ascontiguousarray(data)
    return bool(_ggml().ggml_validate_row_data(type_id, buf.ctypes.data, buf.nbytes))


@dataclass(frozen=True)
class QuantPlan:
    """The type llama.cpp's quantizer gives each tensor for one file type (a dry run)."""

    ftype: int
    tensor_types: tuple[tuple[str, int], ...]  # (tensor name, ggml type id), in llama.cpp's order
    warnings: tuple[str, ...] = ()


# One tensor line of llama_model_quantize's log (llama-quant.cpp, dry-run branch):
# "[  12/ 291]   blk.1.attn_q.weight - [ 4096,  4096, 1, 1], type =    f16, size = ... (q4_K)"
_TENSOR_LINE = re.compile(
    r"^\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+-\s+\[[^\]]*\],\s+type\s+=\s+(?P<cur>\w+),"
    r"\s+size\s+=.*?(?:\((?P<new>\w+)\))?\s*$"
)


def plan_quant_types(f16_path: Path, ftype: int, n_threads: int = 1) -> QuantPlan:
    """Run llama.cpp's quantizer in dry-run mode on ``f16_path`` and read its type choices.

    ``f16_path`` must be a complete GGUF as far as llama.cpp's loader checks (every tensor
    inside the file's size) but its data is never read: a sparse file costs no disk.
    """
    llama_cpp = import_llama_cpp()
    install_log_capture()
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    params.dry_run = True
    mark = log_mark()
    status = llama_cpp.llama_model_quantize(
        str(f16_path).encode(), str(f16_path.with_suffix(".unused")).encode(), ctypes.byref(params)
    )
    lines = log_since(mark)
    if status != 0:
        reason = next((ln for ln in reversed(lines) if "failed" in ln or "error" in ln), "")
        raise ModelLoadError(
            f"llama.cpp's quantizer refused file type {ftype} for {f16_path.name}: "
            f"{reason.strip() or 'no reason logged'}"
        )
    names = ggml_type_ids()
    plan: list[tuple[str, int]] = []
    for line in lines:
        if m := _TENSOR_LINE.match(line.strip()):
            type_name = m["new"] or m["cur"]
            if type_name not in names:
                raise ModelLoadError(f"llama.cpp's quantizer chose an unknown type {type_name!r}")
            plan.append((m["name"], names[type_name]))
    if not plan:
        raise ModelLoadError(f"llama.cpp's quantizer logged no tensor plan for {f16_path.name}")
    warnings = tuple(ln.strip() for ln in lines if "WARNING" in ln)
    return QuantPlan(ftype=ftype, tensor_types=tuple(plan), warnings=warnings)
