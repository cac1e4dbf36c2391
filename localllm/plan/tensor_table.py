"""Tensor tables: a model's tensors (names, types, offsets, sizes) and header, no weights.

From a local GGUF (or a header-only file), a hub file's header preview (a catalog alias
with a quant, org/repo:QUANT, hf://...), or a preset with llama.cpp's own quantizer
choosing each tensor's type. ``bench --synthetic`` writes random weights behind one
(:mod:`localllm.plan.synthetic_gguf`); ``kv-calc --rpc`` dry-runs one across hosts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from localllm.errors import InvalidArgument, InvalidModelFile, LocalLLMError
from localllm.gguf.ggml_types import FILE_TYPES, GGML_TYPES, tensor_bytes
from localllm.gguf.header import GgufHeader, check_magic, parse_header_prefix, read_header
from localllm.gguf.spec import ModelSpec
from localllm.store.presets import lookup_preset
from localllm.store.resolver import resolve_model
from localllm.text import escape_untrusted

__all__ = [
    "DEFAULT_PRESET_QUANT",
    "TensorEntry",
    "TensorTable",
    "preset_table",
    "table_from_gguf",
    "table_from_prefix",
    "tensor_table_of",
]

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

    Raises ``localllm.gguf.header.HeaderIncomplete`` until ``prefix`` holds the whole header.
    """
    return _table(parse_header_prefix(prefix, label), prefix, file_bytes, label)


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


# ------------------------------------------------------------------------ references

# A preset's quant when --quant is not given: the size most people download.
DEFAULT_PRESET_QUANT = "Q4_K_M"


def tensor_table_of(ref: str | None, quant: str | None, workdir: Path) -> tuple[TensorTable, str]:
    """The tensor table ``ref`` names, and what to call the model."""
    preset = lookup_preset(ref)
    if preset is not None:
        chosen = (quant or DEFAULT_PRESET_QUANT).upper()
        return preset_table(preset.spec, chosen, workdir), f"{preset.spec.name} {chosen}"
    if quant is not None:
        raise InvalidArgument(
            "--quant picks a preset's quantization; for a catalog or hub model put the quant "
            "in the reference (llama-2-7b-chat:Q4_K_M)"
        )
    model = resolve_model(ref)
    label = model.pull_ref if model.kind != "path" else Path(model.ref).name
    if model.present and model.path is not None:
        return table_from_gguf(model.path), label
    if model.repo is None:
        raise InvalidArgument(f"{ref} has no file here and no hub repo to read its header from")
    from localllm.store.preview import remote_header  # lazy: huggingface_hub is slow to import

    preview = remote_header(model)
    return table_from_prefix(preview.prefix, preview.file_bytes, label), label
