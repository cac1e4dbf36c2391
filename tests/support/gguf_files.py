"""The tests' one GGUF writer (gguf-py's GGUFWriter), in three shapes, and an independent reader.

- :func:`write_gguf`: a small file with a published model's header facts (:data:`ARCHS`)
  and a couple of tiny tensors, keys dropped or changed at will;
- :func:`write_header_gguf`: a header-only file at real scale, the full tensor table of a
  published model (:mod:`support.header_models`), sparse on disk;
- :func:`gguf_with_chat_template`: a copy of a real GGUF with other metadata;
- :func:`tensor_bytes_by_layer`: a file's tensor bytes per layer as gguf-py reads them.

Nothing they write is committed: every file is made in the test session.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from support.header_models import HeaderModel, Shape, header_model

__all__ = [
    "ARCHS",
    "DROP",
    "add_kv",
    "gguf_reader",
    "gguf_with_chat_template",
    "tensor_bytes_by_layer",
    "token_text",
    "write_gguf",
    "write_header_gguf",
]


# ------------------------------------------------------------------ small files

# Published configs (Meta / Mistral AI model cards and config.json files).
ARCHS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(n_layers=32, n_heads=32, n_kv_heads=32, n_embd=4096, n_ff=11008,
                       n_ctx=4096, rope_base=10000.0, vocab=32000),
    "llama-2-13b": dict(n_layers=40, n_heads=40, n_kv_heads=40, n_embd=5120, n_ff=13824,
                        n_ctx=4096, rope_base=10000.0, vocab=32000),
    "llama-2-70b": dict(n_layers=80, n_heads=64, n_kv_heads=8, n_embd=8192, n_ff=28672,
                        n_ctx=4096, rope_base=10000.0, vocab=32000),
    "mistral-7b-v0.1": dict(n_layers=32, n_heads=32, n_kv_heads=8, n_embd=4096, n_ff=14336,
                            n_ctx=32768, rope_base=10000.0, vocab=32000, sliding_window=4096),
    "llama-3-8b": dict(n_layers=32, n_heads=32, n_kv_heads=8, n_embd=4096, n_ff=14336,
                       n_ctx=8192, rope_base=500000.0, vocab=128256),
    # A multi-query model (one KV head) and a small multi-head one.
    "mqa-1b": dict(n_layers=24, n_heads=16, n_kv_heads=1, n_embd=2048, n_ff=8192,
                   n_ctx=2048, rope_base=10000.0, vocab=32000),
    "mha-tiny": dict(n_layers=4, n_heads=8, n_kv_heads=8, n_embd=512, n_ff=1024,
                     n_ctx=1024, rope_base=10000.0, vocab=1000),
}  # fmt: skip

DROP = object()  # pass as a value in ``overrides`` to leave that key out


def arch_kv(name: str, arch: str = "llama") -> dict[str, Any]:
    a = ARCHS[name]
    kv: dict[str, Any] = {
        "general.name": name,
        "general.file_type": 15,  # MOSTLY_Q4_K_M
        f"{arch}.block_count": a["n_layers"],
        f"{arch}.context_length": a["n_ctx"],
        f"{arch}.embedding_length": a["n_embd"],
        f"{arch}.feed_forward_length": a["n_ff"],
        f"{arch}.attention.head_count": a["n_heads"],
        f"{arch}.attention.head_count_kv": a["n_kv_heads"],
        f"{arch}.rope.freq_base": a["rope_base"],
        f"{arch}.rope.dimension_count": a["n_embd"] // a["n_heads"],
        f"{arch}.vocab_size": a["vocab"],
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    if a.get("sliding_window"):
        kv[f"{arch}.attention.sliding_window"] = a["sliding_window"]
    return kv


def write_gguf(
    path: Path,
    model: str = "llama-2-7b",
    *,
    arch: str = "llama",
    overrides: dict[str, Any] | None = None,
    tensors: dict[str, np.ndarray] | None = None,
    tokens: list[str] | None = None,
) -> Path:
    """Write a GGUF with ``model``'s header facts and a couple of tiny tensors."""
    kv = arch_kv(model, arch)
    for key, value in (overrides or {}).items():
        if value is DROP:
            kv.pop(key, None)
        else:
            kv[key] = value
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if key != "general.architecture":
            add_kv(writer, key, value)
    if tokens is not None:
        writer.add_token_list(tokens)
    if tensors is None:
        tensors = {
            "token_embd.weight": np.ones((16, 32), dtype=np.float32),
            "output_norm.weight": np.ones((32,), dtype=np.float32),
        }
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------- header-only, at scale


def _tensor_type(shape: Shape, weight_type: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    # Matrices whose rows fill whole blocks take the weight type; vectors (norms, biases)
    # and narrow rows (conv kernels, ssm_a) stay f32, as llama.cpp's quantizer keeps them.
    block, _ = gguf.GGML_QUANT_SIZES[weight_type]
    if len(shape) >= 2 and shape[0] % block == 0:
        return weight_type
    return gguf.GGMLQuantizationType.F32


def _nbytes(shape: Shape, qtype: gguf.GGMLQuantizationType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


def add_kv(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise TypeError(f"cannot write {key}={value!r}")


def write_header_gguf(
    path: str | os.PathLike[str],
    model: str | HeaderModel,
    *,
    weight_type: str = "Q4_0",
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s header to ``path`` and extend the file (sparse) to its full size.

    Returns the path. ``weight_type`` is the ggml type of every matrix (a gguf-py
    GGMLQuantizationType name); ``overrides`` replaces or adds keys.
    """
    spec = header_model(model) if isinstance(model, str) else model
    qtype = gguf.GGMLQuantizationType[weight_type]
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), spec.arch)
    for key, value in {**spec.kv, **(overrides or {})}.items():
        add_kv(writer, key, value)
    data_bytes = 0
    for name, shape in spec.tensors:
        ttype = _tensor_type(shape, qtype)
        nbytes = _nbytes(shape, ttype)
        # gguf-py takes numpy order (slowest dimension first); ggml's ne is the reverse.
        writer.add_tensor_info(name, tuple(reversed(shape)), np.float32, nbytes, ttype)
        data_bytes += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    header_end = writer.fout[0].tell()
    writer.close()
    data_start = gguf.GGUFWriter.ggml_pad(header_end, writer.data_alignment)
    # The data region is never written: truncate() extends the file with a hole.
    os.truncate(path, data_start + data_bytes)
    return path


# --------------------------------------------------------- copies with new metadata


@functools.lru_cache(maxsize=2)
def gguf_reader(path: Path) -> gguf.GGUFReader:
    """One parsed reader per file: gguf-py takes ~3 s to parse SmolLM2's 49k-token vocab."""
    return gguf.GGUFReader(path, "r")


def token_text(path: Path, key: str) -> str:
    """The text of the token a tokenizer key (``tokenizer.ggml.bos_token_id``) names."""
    reader = gguf_reader(path)
    token_id = int(reader.get_field(key).contents())
    return str(reader.get_field(gguf.Keys.Tokenizer.LIST).contents()[token_id])


def gguf_with_chat_template(
    source: Path, dest: Path, template: str | None, **strings: str | None
) -> Path:
    """A copy of ``source`` whose ``tokenizer.chat_template`` is ``template`` (None: removed).

    ``strings`` set (a str) or remove (None) other string keys, dots written as ``__``:
    ``general__name="Llama 2 7B Chat"``. gguf-py's new-metadata approach (GGUFReader +
    GGUFWriter, as gguf_new_metadata.py), except that the tensor data is copied as one block:
    tensor offsets are relative to the data section, so only the header, key/values and
    tensor infos need rewriting.
    """
    overrides = {key.replace("__", "."): value for key, value in strings.items()}
    reader = gguf_reader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dest, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        if field.name.startswith(gguf.Keys.Tokenizer.CHAT_TEMPLATE) or field.name in overrides:
            continue  # the default template and any named ones; keys set below
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for key, value in overrides.items():
        if value is not None:
            writer.add_string(key, value)
    if template is not None:
        writer.add_chat_template(template)
    _copy_tensors(reader, writer, source)
    return dest


def _copy_tensors(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, source: Path) -> None:
    offset = 0
    for tensor in reader.tensors:
        assert tensor.data_offset - reader.data_offset == offset, tensor.name
        offset += gguf.GGUFWriter.ggml_pad(tensor.n_bytes, writer.data_alignment)
        writer.add_tensor_info(
            tensor.name,
            tensor.data.shape,
            tensor.data.dtype,
            tensor.data.nbytes,
            tensor.tensor_type,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    out: Any = writer.fout[0]
    writer.write_padding(out, out.tell())
    with source.open("rb") as src:
        src.seek(reader.data_offset)
        shutil.copyfileobj(src, out, 16 << 20)
    writer.close()


# ---------------------------------------------------------------------- reading


def tensor_bytes_by_layer(path: Path) -> tuple[dict[int, int], dict[str, int]]:
    """Bytes per repeating layer (``blk.N.*``), and of every other tensor by name."""
    from gguf import GGUFReader

    layers: dict[int, int] = {}
    others: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        if tensor.name.startswith("blk."):
            index = int(tensor.name.split(".")[1])
            layers[index] = layers.get(index, 0) + int(tensor.n_bytes)
        else:
            others[tensor.name] = int(tensor.n_bytes)
    return layers, others
