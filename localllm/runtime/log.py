"""llama.cpp's log, captured instead of printed, and the facts read out of it.

Everything llama.cpp logs goes through one callback into a bounded list; a caller takes
a mark before a load or a context creation and reads the lines since. Debug lines are
not kept there (thousands per load); :func:`debug_lines` collects every line, debug
included, while a block runs. The buffer sizes llama.cpp reports are parsed into
:class:`BufferReport`.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localllm.errors import ModelLoadError

__all__ = [
    "BufferReport",
    "debug_lines",
    "install_log_capture",
    "load_model_file",
    "log_mark",
    "log_since",
    "parse_buffer_report",
    "set_log_echo",
]

_MIB = 1024 * 1024
# ggml_log_level (ggml.h): 1 debug, 2 info, 3 warn, 4 error, 5 continues the last line.
_LOG_KEEP_LEVELS = {2, 3, 4}  # debug lines (thousands per load) are dropped
_MAX_LINES = 5000


class _LogState:
    """The captured lines; ``dropped`` counts lines trimmed off the front so marks stay valid."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lines: list[str] = []
        self.dropped = 0
        self.partial: list[str] = []
        self.echo = False
        self.callback: Any = None  # the ctypes callback must stay referenced while installed
        self.last_level = 2
        self.listeners: list[list[str]] = []  # debug_lines() blocks running: every line
        self.listener_partial: list[str] = []


_state = _LogState()


def _capture(level: int, text: bytes) -> None:
    if level != 5:  # 5 continues the previous message at its level
        _state.last_level = level
    if _state.listeners:
        _to_listeners(text.decode("utf-8", errors="replace"))
    if _state.last_level not in _LOG_KEEP_LEVELS:
        return
    piece = text.decode("utf-8", errors="replace")
    with _state.lock:
        _state.partial.append(piece)
        if piece.endswith("\n"):
            line = "".join(_state.partial)
            _state.partial.clear()
            _state.lines.append(line.rstrip("\n"))
            if len(_state.lines) > _MAX_LINES:
                del _state.lines[:1000]
                _state.dropped += 1000
    if _state.echo:
        os.write(2, text)


def _to_listeners(piece: str) -> None:
    with _state.lock:
        _state.listener_partial.append(piece)
        if piece.endswith("\n"):
            line = "".join(_state.listener_partial).rstrip("\n")
            _state.listener_partial.clear()
            for lines in _state.listeners:
                lines.append(line)


@contextlib.contextmanager
def debug_lines() -> Iterator[list[str]]:
    """Every line llama.cpp logs while the block runs, debug lines included (the capture
    itself keeps only info and above)."""
    install_log_capture()
    lines: list[str] = []
    with _state.lock:
        _state.listeners.append(lines)
    try:
        yield lines
    finally:
        with _state.lock:
            _state.listeners = [other for other in _state.listeners if other is not lines]
            if not _state.listeners:
                _state.listener_partial.clear()


def install_log_capture() -> None:
    """Route llama.cpp's log into the capture (once per process)."""
    if _state.callback is not None:
        return
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, _user: Any) -> None:
        _capture(level, text)

    _state.callback = capture
    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))


def set_log_echo(echo: bool) -> None:
    """Also print what llama.cpp logs on stderr (``verbose``)."""
    _state.echo = echo


def log_mark() -> int:
    """A position in the log; :func:`log_since` returns the lines after it."""
    with _state.lock:
        return _state.dropped + len(_state.lines)


def log_since(mark: int) -> list[str]:
    with _state.lock:
        return list(_state.lines[max(mark - _state.dropped, 0) :])


def load_model_file(llama_cpp: Any, path: Path, params: Any) -> tuple[Any, list[str]]:
    """``llama_model_load_from_file`` with a ModelLoadError naming llama.cpp's own reason.

    Returns the model pointer and the load log.
    """
    install_log_capture()
    mark = log_mark()
    model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
    log = log_since(mark)
    if not model:
        errors = [line.strip() for line in log if "error" in line.lower()]
        reason = errors[-1] if errors else "unknown error"
        raise ModelLoadError(f"llama.cpp could not load {path.name}: {reason}")
    return model, log


@dataclass(frozen=True)
class BufferReport:
    """Buffer sizes as llama.cpp logged them at load (MiB with 2 decimals, as bytes)."""

    weights_bytes: int | None
    kv_bytes: int | None
    k_bytes: int | None
    v_bytes: int | None
    compute_bytes: int | None
    output_bytes: int | None
    kv_cells: int | None
    flash_attn: bool | None


def _mib(text: str) -> int:
    return round(float(text) * _MIB)


def _add(total: int | None, value: int) -> int:
    return value if total is None else total + value


_BUFFER_LINES = (
    ("weights", re.compile(r"model buffer size\s*=\s*([\d.]+) MiB")),
    ("kv", re.compile(r"KV buffer size\s*=\s*([\d.]+) MiB")),
    ("compute", re.compile(r"compute buffer size\s*=\s*([\d.]+) MiB")),
    ("output", re.compile(r"output buffer size\s*=\s*([\d.]+) MiB")),
)
_KV_CACHE_LINE = re.compile(r"\(\s*(\d+) cells,.*K \(\w+\):\s*([\d.]+) MiB, V \(\w+\):\s*([\d.]+)")


def parse_buffer_report(lines: Sequence[str]) -> BufferReport:
    """Pick the buffer sizes out of llama.cpp's load log (summed over devices)."""
    sizes: dict[str, int | None] = {"weights": None, "kv": None, "compute": None, "output": None}
    k = v = cells = None
    flash = None
    for line in lines:
        for name, pattern in _BUFFER_LINES:
            if m := pattern.search(line):
                sizes[name] = _add(sizes[name], _mib(m[1]))
                break
        if m := _KV_CACHE_LINE.search(line):
            cells = int(m[1])
            k, v = _add(k, _mib(m[2])), _add(v, _mib(m[3]))
        if m := re.search(r"flash_attn\s*=\s*(\w+)", line):
            flash = m[1] in ("enabled", "1", "true")
    return BufferReport(
        sizes["weights"], sizes["kv"], k, v, sizes["compute"], sizes["output"], cells, flash
    )
