"""Synthetic-weight GGUFs: a model's exact tensor table with random weights, for speed.

llama.cpp's speed depends on the tensor table (names, shapes, types) and the settings,
hardly on the weight values, so a file with the real header and random weights runs at
about the real model's speed (SmolLM2 here, both read from disk: tg within 0.4%, pp 1.8%,
once block scales spread as trained ones do, see SCALE_SIGMA; all-zero weights are faster).

The header (key/values, tensor infos, alignment padding) is copied byte for byte from
the source: nothing is decoded or re-encoded, so metadata, offsets and alignment are
the source's by construction, and the copy costs a memcpy (gguf-py's GGUFReader would
take ~2 s decoding the vocabulary just to write it back).

Weights: float tensors are numpy normal * 0.02, times a lognormal factor per 256-value
group so block scales spread as trained weights' do (norms 1 + normal * 0.02); quantized
tensors are tiled from a pool of blocks that ggml's own quantizer wrote from such floats,
so every block carries sane f16 scales (no NaN/Inf paths). Tiling is numpy ``take`` on
random block indices: a 4 GB file is written at memory/disk speed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localllm.errors import InvalidModelFile, LocalLLMError
from localllm.gguf.ggml_types import GGML_TYPES
from localllm.plan.tensor_table import TensorEntry, TensorTable
from localllm.text import format_bytes

__all__ = [
    "SCALE_SIGMA",
    "SyntheticFile",
    "check_disk_space",
    "synthetic_gguf",
    "write_synthetic",
]

_FLOAT_TYPES = {0: np.float32, 1: np.float16, 28: np.float64, 30: "bf16"}
_INT_TYPES = {24, 25, 26, 27}  # I8..I64: left as zeros (no model weights use them)
# Llama's init std, near trained 7B weights (SmolLM2's are 0.05-0.4; speed measured the
# same from 0.02 to 0.4).
_WEIGHT_STD = 0.02
# Trained weights vary in magnitude from block to block; i.i.d. normals do not. That spread
# sets speed: ggml on x86 turns each block's f16 scale into f32 through a 256 KB lookup
# table, so narrowly spread scales stay in L1 and ran SmolLM2 tg 5-9% faster than its real
# weights. Each 256-value group (a K-quant super-block) gets a lognormal factor: sigma 0.2
# brings the spread of log2(block scale) to SmolLM2's (median over tensors 0.37, vs 0.24).
SCALE_SIGMA = 0.2
_SCALE_GROUP = 256
_POOL_BLOCKS = 4096
# IQ1/IQ2 quantizers search grids: ~1 ms per block, so their pools are kept small.
_SLOW_POOL_BLOCKS = 512
_SLOW_QUANTIZERS = {16, 17, 19, 22, 29}
_QUANT_ROW = 4096  # a multiple of every block size (32, 64, 128, 256)
_CHUNK_BYTES = 64 << 20
_DISK_MARGIN = 256 << 20  # never fill a disk to its last byte


@dataclass(frozen=True)
class SyntheticFile:
    """A synthetic GGUF on disk (deleted when its context manager exits)."""

    path: Path
    file_bytes: int
    write_seconds: float
    source: str


def check_disk_space(directory: Path, needed: int, free: int | None = None) -> None:
    """Refuse before writing when ``directory``'s disk cannot hold ``needed`` bytes.

    ``free`` overrides the measured free space (tests; callers that know better).
    """
    if free is None:
        try:
            free = shutil.disk_usage(directory).free
        except OSError as exc:
            raise LocalLLMError(
                f"cannot write a synthetic model file to {directory}: {exc.strerror or exc}"
            ) from None
    if free < needed + _DISK_MARGIN:
        raise LocalLLMError(
            f"a synthetic model file needs {format_bytes(needed)} on {directory}, which has "
            f"{format_bytes(free)} free; free some space or write it to a bigger disk"
        )


# ------------------------------------------------------------------------------ weights


def _float_bytes(values: np.ndarray, type_id: int) -> np.ndarray:
    """float32 values as the bytes of a float ggml type."""
    kind = _FLOAT_TYPES[type_id]
    if kind == "bf16":  # numpy has no bfloat16: its bits are float32's top half
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    return values.astype(kind).view(np.uint8)


def _float_values(
    rng: np.random.Generator, n: int, norm: bool, scale_sigma: float = SCALE_SIGMA
) -> np.ndarray:
    values = rng.standard_normal(n, dtype=np.float32) * np.float32(_WEIGHT_STD)
    if norm:  # RMS-norm weights sit around 1 in trained models, not around 0.
        return values + np.float32(1.0)
    groups = -(-n // _SCALE_GROUP)
    factors = np.exp(np.float32(scale_sigma) * rng.standard_normal(groups, dtype=np.float32))
    return values * np.repeat(factors, _SCALE_GROUP)[:n]


class _Pools:
    """Per-type pools of valid units (quantized blocks, or runs of float values)."""

    def __init__(self, rng: np.random.Generator, scale_sigma: float) -> None:
        self.rng = rng
        self.scale_sigma = scale_sigma
        self.pools: dict[tuple[int, bool], np.ndarray] = {}

    def get(self, type_id: int, norm: bool) -> np.ndarray:
        """A 2-D uint8 array: one valid unit of ``type_id`` data per row."""
        key = (type_id, norm and type_id in _FLOAT_TYPES)
        if key not in self.pools:
            self.pools[key] = self._build(type_id, key[1])
        return self.pools[key]

    def _build(self, type_id: int, norm: bool) -> np.ndarray:
        name, block, block_bytes = GGML_TYPES[type_id]
        if type_id in _FLOAT_TYPES:
            unit = 256
            values = _float_values(self.rng, _POOL_BLOCKS * unit, norm, self.scale_sigma)
            data = _float_bytes(values, type_id)
            return data.reshape(_POOL_BLOCKS, -1)
        from localllm.runtime.quantize import QUANTIZABLE_TYPES, quantize_rows, rows_are_valid

        if type_id not in QUANTIZABLE_TYPES:
            raise InvalidModelFile(
                f"tensors of type {name} cannot be synthesized (ggml has no quantizer for it)"
            )
        n_blocks = _SLOW_POOL_BLOCKS if type_id in _SLOW_QUANTIZERS else _POOL_BLOCKS
        rows = n_blocks * block // _QUANT_ROW
        floats = _float_values(self.rng, rows * _QUANT_ROW, False, self.scale_sigma)
        floats = floats.reshape(rows, _QUANT_ROW)
        pool = quantize_rows(type_id, floats)
        if not rows_are_valid(type_id, pool):  # ggml's own NaN/Inf check of every block
            raise LocalLLMError(f"ggml quantized finite values to invalid {name} blocks")
        return pool.reshape(n_blocks, block_bytes)


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    """pwrite until all of ``data`` is written (a short write precedes ENOSPC)."""
    while data:
        n = os.pwrite(fd, data, pos)
        data, pos = data[n:], pos + n


def _write_tensor(fd: int, pos: int, tensor: TensorEntry, pools: _Pools) -> None:
    """Fill one tensor's bytes at ``pos``: random picks from its type's pool, in chunks."""
    if tensor.type_id in _INT_TYPES or tensor.n_bytes == 0:
        return  # the file was created sparse: these bytes already read as zeros
    norm = tensor.name.endswith("norm.weight")
    rng = pools.rng
    if tensor.type_id in _FLOAT_TYPES and tensor.n_elements <= _POOL_BLOCKS * 256:
        values = _float_values(rng, tensor.n_elements, norm, pools.scale_sigma)
        data = _float_bytes(values, tensor.type_id)
        _pwrite_all(fd, memoryview(data), pos)
        return
    pool = pools.get(tensor.type_id, norm)
    unit_bytes = pool.shape[1]
    n_units, tail = divmod(tensor.n_bytes, unit_bytes)
    per_chunk = max(1, _CHUNK_BYTES // unit_bytes)
    buf = np.empty((min(per_chunk, n_units), unit_bytes), dtype=np.uint8)
    for start in range(0, n_units, per_chunk):
        count = min(per_chunk, n_units - start)
        picks = rng.integers(0, len(pool), size=count, dtype=np.intp)
        # mode="clip" lets take write straight into buf ("raise" buffers the output).
        np.take(pool, picks, axis=0, out=buf[:count], mode="clip")
        _pwrite_all(fd, memoryview(buf[:count]).cast("B"), pos)
        pos += count * unit_bytes
    if tail:  # only float tensors have a tail shorter than a pool unit
        _pwrite_all(fd, memoryview(pool[0, :tail]), pos)


def _leave_cold(fd: int) -> None:
    """Flush the file and drop it from the page cache, so llama.cpp reads it from disk.

    Flushed: otherwise the kernel writes gigabytes back while the benchmark runs, on the
    same cores. Dropped: how a file sits in the page cache moves its speed a little (2 MiB
    folios are mapped as huge pages: SmolLM2 written in 64 MiB chunks ran tg 2% faster
    than written in 64 KiB ones), so the synthetic file is measured in the state any model
    has once read from disk, whatever wrote it (benchmarks/synthetic_7b.md, section 4).
    """
    os.fsync(fd)
    if hasattr(os, "posix_fadvise"):  # not on macOS: there the file stays cached
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def write_synthetic(
    table: TensorTable, path: Path, *, seed: int = 0, scale_sigma: float = SCALE_SIGMA
) -> None:
    """Write ``table``'s header and random weights to a new file at ``path``, left cold.

    ``scale_sigma``: the spread of the per-256-value magnitude factor (0: i.i.d. weights,
    for comparisons; see SCALE_SIGMA).
    """
    pools = _Pools(np.random.default_rng(seed), scale_sigma)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, table.file_bytes)  # sparse: alignment padding stays zeros
            _pwrite_all(fd, memoryview(table.header), 0)
            for tensor in table.tensors:
                _write_tensor(fd, table.data_offset + tensor.offset, tensor, pools)
            _leave_cold(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise LocalLLMError(
            f"cannot write the synthetic model file {path}: {exc.strerror or exc}; "
            "check the disk it goes to"
        ) from None


@contextmanager
def synthetic_gguf(
    table: TensorTable,
    directory: str | os.PathLike[str],
    *,
    seed: int = 0,
    free_bytes: int | None = None,
    keep: Path | None = None,
) -> Iterator[SyntheticFile]:
    """A synthetic GGUF in a fresh temporary directory under ``directory``, deleted on exit.

    Whatever ends the ``with`` block (success, an exception, Ctrl-C) the directory goes;
    ``keep`` moves the file there first, on success only. The disk check comes first,
    before a byte is written (``free_bytes`` overrides the measured free space).
    """
    directory = Path(directory)
    check_disk_space(directory, table.file_bytes, free_bytes)
    workdir = Path(tempfile.mkdtemp(prefix="localllm-synthetic-", dir=directory))
    try:
        path = workdir / "synthetic.gguf"
        started = time.perf_counter()
        write_synthetic(table, path, seed=seed)
        elapsed = time.perf_counter() - started
        yield SyntheticFile(path, table.file_bytes, elapsed, table.source)
        if keep is not None:
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, keep)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
