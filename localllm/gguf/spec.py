"""GGUF header -> ModelSpec: the architecture facts of a model, no weights loaded.

The header walk is :mod:`localllm.gguf.header`'s; the type table :mod:`localllm.gguf.ggml_types`'.
A model file is untrusted input: every string that comes out of it goes through
:func:`localllm.text.escape_untrusted` before display.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from localllm.errors import InvalidModelFile
from localllm.gguf.ggml_types import GGML_TYPES, file_type_name
from localllm.gguf.header import (
    GgufHeader,
    LongArray,
    check_magic,
    parse_header_prefix,
    read_header,
)
from localllm.text import escape_untrusted

__all__ = [
    "RECURRENT_ARCHITECTURES",
    "ModelSpec",
    "QuantShare",
    "read_model_spec",
    "read_model_spec_from_prefix",
]

# Key templates, as gguf-py's constants spell them ({arch} is general.architecture).
KEY_ARCHITECTURE = "general.architecture"
KEY_NAME = "general.name"
KEY_BASENAME = "general.basename"
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

# llama.cpp's llm_arch_is_recurrent: no attention at all, one state per sequence. Their
# converters write head_count 0 ("required by llama.cpp, unused").
RECURRENT_ARCHITECTURES = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})

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
    basename: str | None = None  # general.basename: the model family as its converter named it
    n_kv_heads_per_layer: tuple[int, ...] | None = None
    source: str = "gguf"
    path: str | None = None

    @property
    def value_dim(self) -> int:
        """Per-head width of V (equals the K width on every Llama-family model)."""
        return self.head_dim_v if self.head_dim_v is not None else self.head_dim

    @property
    def has_attention(self) -> bool:
        """False for a recurrent model (Mamba, RWKV): no heads, no KV cache."""
        return self.n_heads > 0

    @property
    def gqa_group(self) -> float:
        """Query heads that share one KV head: 1 is MHA, n_heads is MQA (0: no attention)."""
        return self.n_heads / self.n_kv_heads if self.n_kv_heads else 0.0

    @property
    def attention_kind(self) -> str:
        if not self.has_attention:
            return "none"
        if self.n_kv_heads == self.n_heads:
            return "MHA"
        if self.n_kv_heads == 1:
            return "MQA"
        return "GQA"

    def with_source(self, source: str) -> ModelSpec:
        return replace(self, source=source)


def read_model_spec_from_prefix(prefix: bytes, file_bytes: int, label: str) -> ModelSpec:
    """Architecture facts from the first bytes of a GGUF file of ``file_bytes`` bytes.

    For files that are not here (a hub file read with HTTP range requests): raises
    :class:`localllm.gguf.header.HeaderIncomplete` until ``prefix`` holds the whole header.
    """
    header = parse_header_prefix(prefix, label)
    name_fallback = label.rsplit("/", 1)[-1].removesuffix(".gguf")
    return spec_from_header(header, file_bytes, label, name_fallback)


def read_model_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """Read the architecture facts of a GGUF file from its header (weights untouched)."""
    path = Path(path)
    if not path.exists():
        raise InvalidModelFile(f"no such file: {path}")
    file_bytes = check_magic(path)
    return spec_from_header(read_header(path), file_bytes, str(path), path.stem)


class _Keys:
    """The header's key/values, read through gguf-py's ``{arch}`` key templates."""

    def __init__(self, kv: dict[str, Any], path: str) -> None:
        arch = kv.get(KEY_ARCHITECTURE)
        if not isinstance(arch, str) or not arch:
            raise InvalidModelFile(f"{path} has no {KEY_ARCHITECTURE} key; it is not a model GGUF")
        self.kv, self.arch, self.path = kv, arch, path

    def get(self, template: str) -> Any:
        return self.kv.get(template.format(arch=self.arch))

    def required_int(self, template: str) -> int:
        value = self.get(template)
        if isinstance(value, list) and value:
            value = max(value)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InvalidModelFile(
                f"{self.path} lacks the key {template.format(arch=self.arch)} that localllm "
                "needs; the file is incomplete or from an unsupported converter"
            )
        return int(value)


def _kv_heads(keys: _Keys, n_heads: int) -> tuple[int, tuple[int, ...] | None]:
    """KV heads (the largest layer's) and, when they vary by layer, each layer's count."""
    raw = keys.get(KEY_HEAD_COUNT_KV)
    per_layer: tuple[int, ...] | None = None
    if raw is None:
        n_kv_heads = n_heads  # llama.cpp's rule: no head_count_kv means MHA
    elif isinstance(raw, list):
        per_layer = tuple(int(v) for v in raw)
        n_kv_heads = max(per_layer) if per_layer else n_heads
    else:
        n_kv_heads = int(raw)
    if n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise InvalidModelFile(
            f"{keys.path}: {n_heads} attention heads cannot share {n_kv_heads} KV heads evenly"
        )
    return n_kv_heads, per_layer


def _vocab_size(keys: _Keys) -> int | None:
    vocab_size = keys.get(KEY_VOCAB_SIZE)
    if vocab_size is not None:
        return int(vocab_size)
    tokens = keys.kv.get(KEY_TOKENS)
    if isinstance(tokens, LongArray):
        return tokens.length
    return len(tokens) if isinstance(tokens, list) else None


def _quant_mix(
    header: GgufHeader, file_bytes: int, path: str
) -> tuple[tuple[QuantShare, ...], int | None, int | None]:
    """Bytes per tensor type (largest first), the parameter count and the weights' bytes."""
    counts: Counter[str] = Counter()
    elements: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    data_end = header.data_offset
    for tensor in header.tensors:
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
        data_end = max(data_end, header.data_offset + tensor.offset + n_bytes)
    if data_end > file_bytes:
        raise InvalidModelFile(
            f"{path} is truncated: its tensors need {data_end} bytes, the file has "
            f"{file_bytes}; download it again"
        )
    mix = tuple(
        QuantShare(t, counts[t], elements[t], sizes[t])
        for t in sorted(sizes, key=lambda t: -sizes[t])
    )
    n_params = sum(elements.values()) if elements else None
    return mix, n_params, (sum(sizes.values()) if sizes else None)


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _optional_int(value: Any) -> int | None:
    return int(value) if value is not None else None


def spec_from_header(
    header: GgufHeader, file_bytes: int, path: str, name_fallback: str
) -> ModelSpec:
    """A ModelSpec from a parsed header; ``path`` names the file in messages."""
    keys = _Keys(header.kv, path)
    n_layers = keys.required_int(KEY_BLOCK_COUNT)
    n_embd = keys.required_int(KEY_EMBEDDING_LENGTH)
    n_ctx_train = keys.required_int(KEY_CONTEXT_LENGTH)
    n_heads = keys.required_int(KEY_HEAD_COUNT)
    # Recurrent models (Mamba, RWKV) have no attention: their converters write 0 heads.
    attention_free = n_heads == 0 and keys.arch in RECURRENT_ARCHITECTURES
    if min(n_layers, n_embd, n_ctx_train) <= 0 or (n_heads <= 0 and not attention_free):
        raise InvalidModelFile(
            f"{path} has non-positive sizes (layers {n_layers}, embd {n_embd}, "
            f"heads {n_heads}, context {n_ctx_train})"
        )
    # No heads: no KV heads either (RWKV6-Qwen2 writes some, its state does not use them).
    n_kv_heads, kv_per_layer = _kv_heads(keys, n_heads) if n_heads else (0, None)
    head_dim = keys.get(KEY_KEY_LENGTH) if n_heads else 0
    n_ff = keys.get(KEY_FEED_FORWARD_LENGTH)
    if isinstance(n_ff, list):
        n_ff = max(n_ff) if n_ff else None
    rope_base = keys.get(KEY_ROPE_FREQ_BASE)
    scaling_type = keys.get(KEY_ROPE_SCALING_TYPE)
    scaling_factor = keys.get(KEY_ROPE_SCALING_FACTOR)
    scaling_orig = keys.get(KEY_ROPE_SCALING_ORIG_CTX)
    sliding_window = keys.get(KEY_SLIDING_WINDOW)
    chat_template = header.kv.get(KEY_CHAT_TEMPLATE)
    name = header.kv.get(KEY_NAME)
    quant_mix, n_params, weights_bytes = _quant_mix(header, file_bytes, path)
    return ModelSpec(
        name=str(name) if name else name_fallback,
        architecture=keys.arch,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=int(head_dim) if head_dim is not None else n_embd // n_heads,
        head_dim_v=_optional_int(keys.get(KEY_VALUE_LENGTH)) if n_heads else None,
        n_embd=n_embd,
        n_ff=_optional_int(n_ff),
        vocab_size=_vocab_size(keys),
        n_ctx_train=n_ctx_train,
        rope_freq_base=float(rope_base) if rope_base is not None else DEFAULT_ROPE_FREQ_BASE,
        rope_dim=_optional_int(keys.get(KEY_ROPE_DIMENSION_COUNT)),
        rope_scaling_type=str(scaling_type) if scaling_type else None,
        rope_scaling_factor=float(scaling_factor) if scaling_factor else None,
        rope_orig_ctx=int(scaling_orig) if scaling_orig else None,
        sliding_window=int(sliding_window) if sliding_window else 0,
        n_params=n_params,
        file_type=file_type_name(header.kv.get(KEY_FILE_TYPE)),
        quant_mix=quant_mix,
        weights_bytes=weights_bytes,
        file_bytes=file_bytes,
        has_chat_template=bool(chat_template),
        chat_template=chat_template if isinstance(chat_template, str) else None,
        basename=_optional_str(header.kv.get(KEY_BASENAME)),
        n_kv_heads_per_layer=kv_per_layer,
        source="gguf",
        path=path,
    )
