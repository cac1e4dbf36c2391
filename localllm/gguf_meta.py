"""GGUF header -> ModelSpec: the architecture facts of a model, no weights loaded.

The reader memory-maps the file and reads only the key/value header and the
tensor table, the way gguf-py's ``GGUFReader`` does, but without decoding the
vocabulary (see :class:`_HeaderWalker`); type sizes mirror gguf-py's tables.
A model file is untrusted input: every string that comes out of it goes through
:func:`escape_untrusted` before display.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from localllm.errors import InvalidModelFile

__all__ = [
    "GGUF_MAGIC",
    "HeaderIncomplete",
    "ModelSpec",
    "QuantShare",
    "escape_untrusted",
    "read_model_spec",
    "read_model_spec_from_prefix",
]

GGUF_MAGIC = b"GGUF"

# Key templates, as gguf-py's constants spell them ({arch} is general.architecture).
KEY_ARCHITECTURE = "general.architecture"
KEY_NAME = "general.name"
KEY_FILE_TYPE = "general.file_type"
KEY_CONTEXT_LENGTH = "{arch}.context_length"
KEY_EMBEDDING_LENGTH = "{arch}.embedding_length"
KEY_BLOCK_COUNT = "{arch}.block_count"
KEY_FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
KEY_VOCAB_SIZE = "{arch}.vocab_size"
KEY_HEAD_COUNT = "{arch}.attention.head_count"
KEY_HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
KEY_KEY_LENGTH = "{arch}.attention.key_length"
KEY_VALUE_LENGTH = "{arch}.attention.value_length"
KEY_SLIDING_WINDOW = "{arch}.attention.sliding_window"
KEY_ROPE_DIMENSION_COUNT = "{arch}.rope.dimension_count"
KEY_ROPE_FREQ_BASE = "{arch}.rope.freq_base"
KEY_ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
KEY_ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
KEY_ROPE_SCALING_ORIG_CTX = "{arch}.rope.scaling.original_context_length"
KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"

# ggml tensor types: id -> (name, elements per block, bytes per block), and the
# general.file_type names. Mirrors gguf-py's GGML_QUANT_SIZES and LlamaFileType
# (tests/test_gguf_meta.py holds them equal): importing gguf costs ~0.1 s and numpy,
# which `info` and `kv-calc` on a GGUF must not pay for.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
    1024: "GUESSED",
}

# llama.cpp's default when a Llama-family GGUF carries no rope.freq_base.
DEFAULT_ROPE_FREQ_BASE = 10000.0


@dataclass(frozen=True)
class QuantShare:
    """How many tensors, elements and bytes of the weights use one ggml type."""

    type_name: str
    n_tensors: int
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts of a model, from a GGUF header, the catalog or flags."""

    name: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_embd: int
    n_ctx_train: int
    head_dim_v: int | None = None
    n_ff: int | None = None
    vocab_size: int | None = None
    rope_freq_base: float = DEFAULT_ROPE_FREQ_BASE
    rope_dim: int | None = None
    rope_scaling_type: str | None = None
    rope_scaling_factor: float | None = None
    rope_orig_ctx: int | None = None
    sliding_window: int = 0
    n_params: int | None = None
    file_type: str | None = None
    quant_mix: tuple[QuantShare, ...] = ()
    weights_bytes: int | None = None
    file_bytes: int | None = None
    has_chat_template: bool = False
    chat_template: str | None = field(default=None, repr=False)
    n_kv_heads_per_layer: tuple[int, ...] | None = None
    source: str = "gguf"
    path: str | None = None

    @property
    def value_dim(self) -> int:
        """Per-head width of V (equals the K width on every Llama-family model)."""
        return self.head_dim_v if self.head_dim_v is not None else self.head_dim

    @property
    def gqa_group(self) -> float:
        """Query heads that share one KV head: 1 is MHA, n_heads is MQA."""
        return self.n_heads / self.n_kv_heads

    @property
    def attention_kind(self) -> str:
        if self.n_kv_heads == self.n_heads:
            return "MHA"
        if self.n_kv_heads == 1:
            return "MQA"
        return "GQA"

    def with_source(self, source: str) -> ModelSpec:
        return replace(self, source=source)


def escape_untrusted(text: str, limit: int | None = None) -> str:
    """Make a string from a model file safe for a terminal: no control characters."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in "\n\t":
            out.append(ch)
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069":
            # Bidirectional overrides can disguise what a string says (trojan source).
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    escaped = "".join(out)
    if limit is not None and len(escaped) > limit:
        escaped = escaped[: limit - 1] + "…"
    return escaped


def _check_magic(path: Path) -> int:
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            magic = fh.read(4)
    except IsADirectoryError:
        raise InvalidModelFile(f"{path} is a directory, not a .gguf file") from None
    except OSError as exc:
        raise InvalidModelFile(f"cannot read {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        shown = magic.hex() if magic else "an empty file"
        raise InvalidModelFile(
            f"{path} is not a GGUF file (starts with {shown}, expected 'GGUF'); "
            "localllm runs llama.cpp's GGUF format: convert or download a .gguf"
        )
    return size


class _Truncated(Exception):
    """Raised inside the header walk when a read runs past the end of the file."""


@dataclass(frozen=True)
class _LongArray:
    """A big array in the header (token lists, merges): only its length is kept."""

    length: int


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    type_id: int
    n_elements: int
    offset: int


# GGUF value type ids (gguf-py's GGUFValueType) -> struct format for scalars.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
                   7: "<?", 10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_TYPE_STRING, _TYPE_ARRAY = 8, 9
# Arrays longer than this are skipped, not decoded: they are vocabularies, never facts.
_MAX_DECODED_ARRAY = 4096


class _HeaderWalker:
    """A lean GGUF header reader.

    gguf-py's GGUFReader decodes every token and merge string into numpy views:
    1.9 s for SmolLM2's 49k-token vocabulary, several seconds for Llama-3's 128k.
    This walker follows the same format but hops over long arrays by their length
    prefixes, so reading the facts of any model takes milliseconds.
    """

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        end = self.pos + length
        if end > len(self.buf):
            raise _Truncated
        raw = bytes(self.buf[self.pos : end])
        self.pos = end
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.take("<Q")
        self.pos += length
        if self.pos > len(self.buf):
            raise _Truncated

    def value(self, type_id: int) -> Any:
        if type_id == _TYPE_STRING:
            return self.string()
        if type_id == _TYPE_ARRAY:
            item_type = self.take("<I")
            count = self.take("<Q")
            if count > _MAX_DECODED_ARRAY:
                self.skip_array(item_type, count)
                return _LongArray(count)
            return [self.value(item_type) for _ in range(count)]
        fmt = _SCALAR_FORMATS.get(type_id)
        if fmt is None:
            raise ValueError(f"unknown GGUF value type {type_id}")
        return self.take(fmt)

    def skip_array(self, item_type: int, count: int) -> None:
        if item_type == _TYPE_STRING:
            for _ in range(count):
                self.skip_string()
        elif item_type in _SCALAR_FORMATS:
            self.pos += struct.calcsize(_SCALAR_FORMATS[item_type]) * count
            if self.pos > len(self.buf):
                raise _Truncated
        else:
            for _ in range(count):  # nested arrays: rare, walk them
                self.value(item_type)


def _walk_header(buf: memoryview, label: str) -> tuple[dict[str, Any], list[_TensorInfo], int]:
    """Key/values, tensor table and data offset from the bytes of a GGUF file's start.

    Raises ``_Truncated`` when ``buf`` ends before the header does: the caller decides
    whether that means a truncated file or that more bytes must be fetched.
    """
    walker = _HeaderWalker(buf)
    try:
        walker.take("<I")  # magic, checked already
        version = walker.take("<I")
        if version & 0xFFFF == 0:
            raise InvalidModelFile(f"{label} is a big-endian GGUF; llama.cpp needs little-endian")
        if version not in (2, 3):
            raise InvalidModelFile(f"{label} is GGUF version {version}; localllm reads 2 and 3")
        n_tensors = walker.take("<Q")
        n_kv = walker.take("<Q")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise InvalidModelFile(
                f"{label} has an implausible header ({n_kv} keys, {n_tensors} tensors)"
            )
        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = walker.string()
            kv[key] = walker.value(walker.take("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = walker.string()
            n_dims = walker.take("<I")
            if n_dims > 8:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            n_elements = 1
            for _ in range(n_dims):
                n_elements *= walker.take("<Q")
            type_id = walker.take("<I")
            tensors.append(_TensorInfo(name, type_id, n_elements, walker.take("<Q")))
        alignment = kv.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment!r} is not a power of two")
        data_offset = -(-walker.pos // alignment) * alignment
    except (ValueError, struct.error) as exc:
        raise InvalidModelFile(f"{label} is malformed: {exc}") from None
    return kv, tensors, data_offset


def _read_header(path: Path) -> tuple[dict[str, Any], list[_TensorInfo], int]:
    """Key/values, tensor table and data offset of a GGUF file (mmap, weights untouched)."""
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        buf = memoryview(mapped)
        try:
            return _walk_header(buf, str(path))
        except _Truncated:
            raise InvalidModelFile(
                f"{path} is truncated (the header ends early); download it again"
            ) from None
        finally:
            buf.release()


class HeaderIncomplete(Exception):
    """The bytes given end before the GGUF header does: fetch more and try again."""


def read_model_spec_from_prefix(prefix: bytes, file_bytes: int, label: str) -> ModelSpec:
    """Architecture facts from the first bytes of a GGUF file of ``file_bytes`` bytes.

    For files that are not here (a hub file read with HTTP range requests): raises
    :class:`HeaderIncomplete` until ``prefix`` holds the whole header and tensor table.
    """
    if len(prefix) < len(GGUF_MAGIC):
        raise HeaderIncomplete
    if prefix[: len(GGUF_MAGIC)] != GGUF_MAGIC:
        raise InvalidModelFile(
            f"{label} is not a GGUF file (starts with {bytes(prefix[:4]).hex()}, expected 'GGUF')"
        )
    buf = memoryview(prefix)
    try:
        kv, tensors, data_offset = _walk_header(buf, label)
    except _Truncated:
        raise HeaderIncomplete from None
    finally:
        buf.release()
    name_fallback = label.rsplit("/", 1)[-1].removesuffix(".gguf")
    return _spec_from_header(kv, tensors, data_offset, file_bytes, label, name_fallback)


def read_model_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """Read the architecture facts of a GGUF file from its header (weights untouched)."""
    path = Path(path)
    if not path.exists():
        raise InvalidModelFile(f"no such file: {path}")
    file_bytes = _check_magic(path)
    kv, tensors, data_offset = _read_header(path)
    return _spec_from_header(kv, tensors, data_offset, file_bytes, str(path), path.stem)


def _spec_from_header(
    kv: dict[str, Any],
    tensors: list[_TensorInfo],
    data_offset: int,
    file_bytes: int,
    path: str,
    name_fallback: str,
) -> ModelSpec:
    """A ModelSpec from a parsed header; ``path`` names the file in messages."""
    arch = kv.get(KEY_ARCHITECTURE)
    if not isinstance(arch, str) or not arch:
        raise InvalidModelFile(f"{path} has no {KEY_ARCHITECTURE} key; it is not a model GGUF")

    def get(template: str) -> Any:
        return kv.get(template.format(arch=arch))

    def required_int(template: str) -> int:
        value = get(template)
        if isinstance(value, list) and value:
            value = max(value)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InvalidModelFile(
                f"{path} lacks the key {template.format(arch=arch)} that localllm needs; "
                "the file is incomplete or from an unsupported converter"
            )
        return int(value)

    n_layers = required_int(KEY_BLOCK_COUNT)
    n_embd = required_int(KEY_EMBEDDING_LENGTH)
    n_ctx_train = required_int(KEY_CONTEXT_LENGTH)
    n_heads = required_int(KEY_HEAD_COUNT)
    if min(n_layers, n_embd, n_heads, n_ctx_train) <= 0:
        raise InvalidModelFile(
            f"{path} has non-positive sizes (layers {n_layers}, embd {n_embd}, "
            f"heads {n_heads}, context {n_ctx_train})"
        )

    kv_raw = get(KEY_HEAD_COUNT_KV)
    kv_per_layer: tuple[int, ...] | None = None
    if kv_raw is None:
        n_kv_heads = n_heads  # llama.cpp's rule: no head_count_kv means MHA
    elif isinstance(kv_raw, list):
        kv_per_layer = tuple(int(v) for v in kv_raw)
        n_kv_heads = max(kv_per_layer) if kv_per_layer else n_heads
    else:
        n_kv_heads = int(kv_raw)
    if n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise InvalidModelFile(
            f"{path}: {n_heads} attention heads cannot share {n_kv_heads} KV heads evenly"
        )

    head_dim = get(KEY_KEY_LENGTH)
    head_dim = int(head_dim) if head_dim is not None else n_embd // n_heads
    head_dim_v = get(KEY_VALUE_LENGTH)
    n_ff = get(KEY_FEED_FORWARD_LENGTH)
    if isinstance(n_ff, list):
        n_ff = max(n_ff) if n_ff else None
    vocab_size = get(KEY_VOCAB_SIZE)
    if vocab_size is None:
        tokens = kv.get(KEY_TOKENS)
        vocab_size = (
            tokens.length
            if isinstance(tokens, _LongArray)
            else (len(tokens) if isinstance(tokens, list) else None)
        )
    rope_base = get(KEY_ROPE_FREQ_BASE)
    rope_dim = get(KEY_ROPE_DIMENSION_COUNT)
    scaling_type = get(KEY_ROPE_SCALING_TYPE)
    scaling_factor = get(KEY_ROPE_SCALING_FACTOR)
    scaling_orig = get(KEY_ROPE_SCALING_ORIG_CTX)
    sliding_window = get(KEY_SLIDING_WINDOW)
    chat_template = kv.get(KEY_CHAT_TEMPLATE)
    name = kv.get(KEY_NAME)

    counts: Counter[str] = Counter()
    elements: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    data_end = data_offset
    for tensor in tensors:
        ggml_type = GGML_TYPES.get(tensor.type_id)
        if ggml_type is None:
            raise InvalidModelFile(
                f"{path}: tensor {escape_untrusted(tensor.name, 60)!r} has unknown "
                f"type id {tensor.type_id}; a newer llama.cpp may read it"
            )
        type_name, block, type_bytes = ggml_type
        n_bytes = tensor.n_elements * type_bytes // block
        counts[type_name] += 1
        elements[type_name] += tensor.n_elements
        sizes[type_name] += n_bytes
        data_end = max(data_end, data_offset + tensor.offset + n_bytes)
    if data_end > file_bytes:
        raise InvalidModelFile(
            f"{path} is truncated: its tensors need {data_end} bytes, the file has "
            f"{file_bytes}; download it again"
        )
    quant_mix = tuple(
        QuantShare(t, counts[t], elements[t], sizes[t])
        for t in sorted(sizes, key=lambda t: -sizes[t])
    )

    return ModelSpec(
        name=str(name) if name else name_fallback,
        architecture=arch,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        head_dim_v=int(head_dim_v) if head_dim_v is not None else None,
        n_embd=n_embd,
        n_ff=int(n_ff) if n_ff is not None else None,
        vocab_size=int(vocab_size) if vocab_size is not None else None,
        n_ctx_train=n_ctx_train,
        rope_freq_base=float(rope_base) if rope_base is not None else DEFAULT_ROPE_FREQ_BASE,
        rope_dim=int(rope_dim) if rope_dim is not None else None,
        rope_scaling_type=str(scaling_type) if scaling_type else None,
        rope_scaling_factor=float(scaling_factor) if scaling_factor else None,
        rope_orig_ctx=int(scaling_orig) if scaling_orig else None,
        sliding_window=int(sliding_window) if sliding_window else 0,
        n_params=sum(elements.values()) if elements else None,
        file_type=_file_type_name(kv.get(KEY_FILE_TYPE)),
        quant_mix=quant_mix,
        weights_bytes=sum(sizes.values()) if sizes else None,
        file_bytes=file_bytes,
        has_chat_template=bool(chat_template),
        chat_template=chat_template if isinstance(chat_template, str) else None,
        n_kv_heads_per_layer=kv_per_layer,
        source="gguf",
        path=path,
    )


def _file_type_name(value: Any) -> str | None:
    """general.file_type's integer as llama.cpp names it (MOSTLY_Q4_1 -> Q4_1)."""
    if value is None:
        return None
    return FILE_TYPES.get(int(value), f"type {int(value)}")
