"""llama.cpp's dry-run log read back: each memory module rebuilt to the byte.

llama.cpp logs every cache it creates (``llama_kv_cache: size = ... (N cells, L layers,
S/T seqs), K (type): ... MiB, V (type): ... MiB``, the recurrent and compressor states)
and the compute buffers, to 0.01 MiB. :mod:`localllm.runtime.dry_run` drives llama.cpp;
this module parses those lines and rebuilds each module's bytes exactly (see there).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from localllm.gguf.ggml_types import kv_type_block

__all__ = [
    "CacheReport",
    "LoggedMemory",
    "attention_cache",
    "compute_bytes",
    "flash_attn_used",
    "parse_memory",
    "recurrent_cache",
    "recurrent_layers",
    "state_cache",
]

_MIB = 1024 * 1024
_F32 = 4


@dataclass(frozen=True)
class CacheReport:
    """One memory module of a context: an attention cache or a recurrent state."""

    kind: str  # kv | swa | indexer | compressed | recurrent | state (DeepSeek-V4 compressor)
    cells: int  # per stream (llama.cpp's kv_size); recurrent: state rows
    streams: int  # 1, or n_seq when each sequence has its own stream
    layers: int
    type_k: str  # recurrent: the R (conv) type
    type_v: str  # recurrent: the S (state) type
    # attention caches fill k/v_bytes; recurrent states r (conv) and s (ssm/wkv) bytes;
    # DeepSeek-V4 compressor states their kv (r) and score (s) tensors
    k_bytes: int
    v_bytes: int
    r_bytes: int = 0
    s_bytes: int = 0
    exact: bool = True  # False: bytes are the log's, rounded to 0.01 MiB

    @property
    def bytes(self) -> int:
        return self.k_bytes + self.v_bytes + self.r_bytes + self.s_bytes


# ------------------------------------------------------------------------ the log


@dataclass(frozen=True)
class LoggedMemory:
    """One memory module as llama.cpp logged it (MiB to 2 decimals)."""

    kind: str
    cells: int
    layers: int
    streams: int
    type_k: str
    type_v: str
    mib: tuple[float, ...]  # (K, V) or (R, S, P) MiB; state: (kv, score) bytes


_KV_LINE = re.compile(
    r"llama_kv_cache: size =\s*[\d.]+ MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)/(\d+) seqs\),"
    r" K \((\w+)\):\s*([\d.]+) MiB, V \((\w+)\):\s*([\d.]+) MiB"
)
_RS_LINE = re.compile(
    r"llama_memory_recurrent: size =\s*[\d.]+ MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+) seqs"
    r"\s+\d+ rs_seq\), R \((\w+)\):\s*([\d.]+) MiB, S \((\w+)\):\s*([\d.]+) MiB"
    r"(?:, P \(\w+\):\s*([\d.]+) MiB)?"
)
# DeepSeek-V4's compressor states: an f32 kv and an f32 score tensor per layer, each
# n_embd_state x state_size x streams x (1 + rs_seq); really allocated, small.
_DSV4_STATE_LINE = re.compile(
    r"llama_dsv4_comp_state: \w+ ratio = \d+, state = (\d+) x (\d+), streams = (\d+),"
    r" rs_seq = (\d+), layers = (\d+), size =\s*([\d.]+) MiB"
)
# Wrappers (iswa, DSA, MSA, DSV4, hybrid) announce the cache they create next.
_NEXT_CACHE = re.compile(r"creating (.*?)KV cache")
_COMPUTE_LINE = re.compile(r"compute buffer size\s*=\s*([\d.]+) MiB")
_FA_CONTEXT_LINE = re.compile(r"llama_context: flash_attn\s*=\s*(\w+)")
_FA_AUTO_LINE = re.compile(r"Flash Attention (enabled|not supported)")


def _next_kind(announced: str) -> str:
    if "non-SWA" in announced:
        return "kv"
    if "SWA" in announced:
        return "swa"
    if "indexer" in announced:
        return "indexer"
    if "compressed" in announced:
        return "compressed"
    return "kv"


def parse_memory(lines: Sequence[str]) -> list[LoggedMemory]:
    found: list[LoggedMemory] = []
    kind = "kv"
    for line in lines:
        if m := _NEXT_CACHE.search(line):
            kind = _next_kind(m[1])
        elif m := _KV_LINE.search(line):
            cells, layers, _seqs, streams = (int(m[i]) for i in range(1, 5))
            mib = (float(m[6]), float(m[8]))
            found.append(LoggedMemory(kind, cells, layers, streams, m[5], m[7], mib))
            kind = "kv"
        elif m := _RS_LINE.search(line):
            mib = (float(m[5]), float(m[7]), float(m[8] or 0.0))
            found.append(LoggedMemory("recurrent", int(m[1]), int(m[2]), 1, m[4], m[6], mib))
        elif m := _DSV4_STATE_LINE.search(line):
            size, width, streams, rs_seq, layers = (int(m[i]) for i in range(1, 6))
            half = layers * width * size * streams * (1 + rs_seq) * _F32
            found.append(LoggedMemory("state", size, layers, streams, "f32", "f32", (half, half)))
    return found


def _mib_matches(n_bytes: int, mib: float) -> bool:
    """Whether ``n_bytes`` prints as ``mib`` in llama.cpp's ``%.2f`` of a float."""
    return abs(n_bytes / _MIB - mib) <= 0.005 + mib * 2**-23


# ------------------------------------------------------------------ exact rebuild


def _row_bytes(type_name: str, n_elements: int) -> int:
    block, block_bytes = kv_type_block(type_name.lower())
    return n_elements // block * block_bytes


def _probe_elements(probe: LoggedMemory) -> tuple[int, int] | None:
    """K and V elements per cell (summed over layers) from a probe cache, if unambiguous."""
    per_element = probe.cells * probe.streams * _F32 / _MIB
    out = []
    for mib in probe.mib[:2]:
        n = round(mib / per_element)
        if not _mib_matches(n * probe.cells * probe.streams * _F32, mib):
            return None
        # Unambiguous only if the neighbouring counts print differently.
        if per_element < 0.011 and n > 0:
            return None
        out.append(n)
    return out[0], out[1]


def _report(
    logged: LoggedMemory, k: int, v: int, r: int = 0, s: int = 0, *, layers: int | None = None,
    exact: bool = True,
) -> CacheReport:  # fmt: skip
    n_layers = logged.layers if layers is None else layers
    return CacheReport(logged.kind, logged.cells, logged.streams, n_layers, logged.type_k,
                       logged.type_v, k, v, r, s, exact)  # fmt: skip


def attention_cache(logged: LoggedMemory, probe: LoggedMemory | None) -> CacheReport:
    elements = _probe_elements(probe) if probe and probe.kind == logged.kind else None
    if elements is not None:
        cells = logged.cells * logged.streams
        k = cells * _row_bytes(logged.type_k, elements[0])
        v = cells * _row_bytes(logged.type_v, elements[1])
        if _mib_matches(k, logged.mib[0]) and _mib_matches(v, logged.mib[1]):
            return _report(logged, k, v)
    k, v = (round(mib * _MIB) for mib in logged.mib[:2])
    return _report(logged, k, v, exact=False)


def recurrent_layers(logged: LoggedMemory, widths: tuple[int, int]) -> int | None:
    """How many layers keep a state, if this line's MiB tell (the log counts all layers)."""
    r_mib, s_mib, _ = logged.mib
    per_layer = max(widths) * logged.cells * _F32
    if per_layer / _MIB <= 0.011:  # a layer more or less would print the same
        return None
    layers = round(max(r_mib, s_mib) * _MIB / per_layer)
    return layers if _recurrent_matches(logged, widths, layers) else None


def _recurrent_matches(logged: LoggedMemory, widths: tuple[int, int], layers: int) -> bool:
    r_mib, s_mib, p_mib = logged.mib
    rows = layers * logged.cells * _F32
    return (
        layers > 0
        and p_mib == 0.0
        and _mib_matches(rows * widths[0], r_mib)
        and _mib_matches(rows * widths[1], s_mib)
    )


def recurrent_cache(
    logged: LoggedMemory, widths: tuple[int, int] | None, layers: int | None
) -> CacheReport:
    """The state rebuilt from its row widths and layer count, if the log agrees."""
    if widths is not None and layers is not None and _recurrent_matches(logged, widths, layers):
        rows = layers * logged.cells * _F32
        return _report(logged, 0, 0, rows * widths[0], rows * widths[1], layers=layers)
    r_mib, s_mib, p_mib = logged.mib
    r, s = round((r_mib + p_mib) * _MIB), round(s_mib * _MIB)
    return _report(logged, 0, 0, r, s, exact=False)


def state_cache(logged: LoggedMemory) -> CacheReport:
    """A DeepSeek-V4 compressor state, rebuilt from its line's own fields."""
    return _report(logged, 0, 0, int(logged.mib[0]), int(logged.mib[1]))


def compute_bytes(log: Sequence[str]) -> int | None:
    """The compute buffers' sum (llama.cpp logs one line per backend)."""
    computes = [float(m[1]) for ln in log if (m := _COMPUTE_LINE.search(ln))]
    return round(sum(computes) * _MIB) if computes else None


def flash_attn_used(log: Sequence[str]) -> bool | None:
    """Flash attention as the context runs it: asked for, or "auto" resolved by llama.cpp."""
    asked = None
    for line in log:
        if m := _FA_CONTEXT_LINE.search(line):
            asked = m[1]  # after llama_init_from_model's own switches (quantized V: on)
        elif asked == "auto" and (m := _FA_AUTO_LINE.search(line)):
            return m[1] == "enabled"
    return {"enabled": True, "disabled": False}.get(asked or "")
