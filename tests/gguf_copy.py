"""Test helper: copies of a real GGUF with other metadata (gguf-py's new-metadata approach).

Used to make template-less, renamed or hostile-template copies of SmolLM2 in the test
session; nothing it writes is committed.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import gguf

__all__ = ["gguf_reader", "gguf_with_chat_template", "token_text"]


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
