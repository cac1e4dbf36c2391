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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from localllm.errors import InvalidArgument, InvalidModelFile, LocalLLMError
from localllm.ggml_types import FILE_TYPES, GGML_TYPES, tensor_bytes
from localllm.gguf_header import GgufHeader, check_magic, parse_header_prefix, read_header
from localllm.gguf_meta import ModelSpec
from localllm.text import escape_untrusted, format_bytes

__all__ = [
    "SCALE_SIGMA",
    "SyntheticFile",
    "TensorEntry",
    "TensorTable",
    "check_disk_space",
    "preset_table",
    "synthetic_gguf",
    "table_from_gguf",
    "table_from_prefix",
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
_N_SPECIAL_TOKENS = 3 + 256  # <unk> <s> </s> and the 256 byte tokens of a synthetic vocab


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the table: where its data starts (from the data section) and its size."""

    name: str
    type_id: int
    n_elements: int
    offset: int
    n_bytes: int


@dataclass(frozen=True)
class TensorTable:
    """What a synthetic file copies: the source's header bytes and tensor table."""

    header: bytes = field(repr=False)  # bytes [0, data_offset) of the source, verbatim
    tensors: tuple[TensorEntry, ...]
    data_offset: int
    file_bytes: int  # size of the file to write: the source's, or its tensors' extent
    source: str  # where the table came from, for records ("path", "org/repo:Q4_K_M", ...)

    @property
    def weights_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


@dataclass(frozen=True)
class SyntheticFile:
    """A synthetic GGUF on disk (deleted when its context manager exits)."""

    path: Path
    file_bytes: int
    write_seconds: float
    source: str


def _entries(header: GgufHeader, label: str) -> tuple[TensorEntry, ...]:
    entries = []
    for t in header.tensors:
        if t.type_id not in GGML_TYPES:
            raise InvalidModelFile(
                f"{label}: tensor {escape_untrusted(t.name, 60)!r} has unknown type id "
                f"{t.type_id}; a newer localllm may write it"
            )
        _, block, _ = GGML_TYPES[t.type_id]
        if t.n_elements % block:
            raise InvalidModelFile(
                f"{label}: tensor {escape_untrusted(t.name, 60)!r} has {t.n_elements} "
                f"elements, not a whole number of {block}-element blocks"
            )
        entries.append(
            TensorEntry(
                t.name, t.type_id, t.n_elements, t.offset, tensor_bytes(t.type_id, t.n_elements)
            )
        )
    return tuple(entries)


def _table(header: GgufHeader, head: bytes, size: int | None, source: str) -> TensorTable:
    tensors = _entries(header, source)
    alignment = header.kv.get("general.alignment", 32)
    data_end = header.data_offset + max((t.offset + t.n_bytes for t in tensors), default=0)
    # A complete source keeps its exact size; a header-only one gets its tensors' extent,
    # padded to the alignment as GGUF writers pad the last tensor.
    file_bytes = (
        size if size is not None and size >= data_end else -(-data_end // alignment) * alignment
    )
    # A header-only source may stop before the alignment padding: the padding is zeros.
    header_bytes = head[: header.data_offset].ljust(header.data_offset, b"\0")
    return TensorTable(header_bytes, tensors, header.data_offset, file_bytes, source)


def table_from_gguf(path: str | os.PathLike[str]) -> TensorTable:
    """The tensor table of a local GGUF: a complete model, or a header-only/sparse file."""
    path = Path(path)
    if not path.exists():
        raise InvalidModelFile(f"no such file: {path}")
    size = check_magic(path)
    header = read_header(path)
    with path.open("rb") as fh:
        head = fh.read(header.data_offset)
    return _table(header, head, size, str(path))


def table_from_prefix(prefix: bytes, file_bytes: int | None, label: str) -> TensorTable:
    """The tensor table from a GGUF file's first bytes (a hub header preview).

    Raises ``gguf_header.HeaderIncomplete`` until ``prefix`` holds the whole header.
    """
    return _table(parse_header_prefix(prefix, label), prefix, file_bytes, label)


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


# ------------------------------------------------------------------------------ presets


def _ftype_id(quant: str) -> int:
    wanted = quant.strip().upper()
    for type_id, name in FILE_TYPES.items():
        if name == wanted and type_id != 1024:  # 1024 is "GUESSED", not a target
            return type_id
    names = ", ".join(n for i, n in FILE_TYPES.items() if i != 1024)
    raise InvalidArgument(f"unknown quantization {quant!r}; use one of {names}")


def _preset_shapes(spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Llama tensors of ``spec``: name -> (numpy shape, is a norm), as convert_hf_to_gguf."""
    if spec.n_ff is None or spec.vocab_size is None:
        raise InvalidArgument(f"{spec.name}: a preset needs its FFN width and vocabulary size")
    if spec.vocab_size <= _N_SPECIAL_TOKENS:
        raise InvalidArgument(
            f"{spec.name}: vocabulary size {spec.vocab_size} is too small for a synthetic "
            f"vocabulary (more than {_N_SPECIAL_TOKENS} tokens)"
        )
    e, v, ff = spec.n_embd, spec.vocab_size, spec.n_ff
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    shapes = {"token_embd.weight": ((v, e), False)}
    for i in range(spec.n_layers):
        blk = f"blk.{i}."
        shapes |= {
            blk + "attn_norm.weight": ((e,), True),
            blk + "attn_q.weight": ((q, e), False),
            blk + "attn_k.weight": ((kv, e), False),
            blk + "attn_v.weight": ((kv, e), False),
            blk + "attn_output.weight": ((e, q), False),
            blk + "ffn_norm.weight": ((e,), True),
            blk + "ffn_gate.weight": ((ff, e), False),
            blk + "ffn_up.weight": ((ff, e), False),
            blk + "ffn_down.weight": ((e, ff), False),
        }
    shapes |= {"output_norm.weight": ((e,), True), "output.weight": ((v, e), False)}
    return shapes


def _preset_writer(spec: ModelSpec, path: Path, ftype: int) -> object:
    """A GGUFWriter holding ``spec``'s llama key/values and a synthetic SPM vocabulary."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_name(spec.name)
    w.add_file_type(ftype)
    if ftype != 1:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layers)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)  # Llama 2/3 and Mistral configs: rms_norm_eps 1e-5
    w.add_rope_freq_base(spec.rope_freq_base)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_vocab_size(spec.vocab_size)
    # Presets carry no tokenizer: an SPM vocabulary of the right size, with the byte
    # tokens llama.cpp's SPM tokenizer falls back on (a benchmark feeds token ids).
    n_special = _N_SPECIAL_TOKENS
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tokens += [f"tok{i}" for i in range(spec.vocab_size - n_special)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_special + [-float(i) for i in range(spec.vocab_size - n_special)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (spec.vocab_size - n_special))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    return w


def _write_header_only(
    spec: ModelSpec, path: Path, ftype: int, tensors: list[tuple[str, tuple[int, ...], int]]
) -> None:
    """A GGUF of ``tensors`` (name, numpy shape, ggml type) with no data written."""
    import gguf

    w = _preset_writer(spec, path, ftype)
    for name, shape, type_id in tensors:
        nbytes = tensor_bytes(type_id, int(np.prod(shape)))
        w.add_tensor_info(
            name, shape, np.dtype(np.float32), nbytes, gguf.GGMLQuantizationType(type_id)
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def preset_table(spec: ModelSpec, quant: str, workdir: str | os.PathLike[str]) -> TensorTable:
    """The tensor table of ``spec`` quantized to ``quant`` with llama.cpp's own type choices.

    Writes a header-only F16 GGUF of the preset's shapes, made sparse to its full size
    (llama.cpp's loader checks every tensor lies inside the file; no data is read), asks
    ``llama_model_quantize`` for a dry run, and writes the header of the file it would
    produce, tensors in its order. Both files live in ``workdir`` and are deleted.
    """
    from localllm.runtime.quantize import plan_quant_types

    ftype = _ftype_id(quant)
    shapes = _preset_shapes(spec)
    scratch = Path(tempfile.mkdtemp(prefix="localllm-preset-", dir=workdir))
    try:
        f16 = scratch / "f16.gguf"
        f16_tensors = [(n, shape, 0 if norm else 1) for n, (shape, norm) in shapes.items()]
        _write_header_only(spec, f16, 1, f16_tensors)
        extent = table_from_gguf(f16).file_bytes
        os.truncate(f16, extent)
        plan = plan_quant_types(f16, ftype)
        if sorted(n for n, _ in plan.tensor_types) != sorted(shapes):
            raise LocalLLMError(f"llama.cpp's quantizer planned other tensors than {spec.name} has")
        quantized = scratch / "quantized.gguf"
        _write_header_only(
            spec, quantized, ftype, [(n, shapes[n][0], t) for n, t in plan.tensor_types]
        )
        table = table_from_gguf(quantized)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    source = f"preset {spec.name} {FILE_TYPES[ftype]} (llama.cpp quantizer dry run)"
    return TensorTable(table.header, table.tensors, table.data_offset, table.file_bytes, source)
