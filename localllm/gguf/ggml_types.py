"""The one table of ggml tensor types: names, block sizes, file types, KV cache types.

Mirrors gguf-py's GGML_QUANT_SIZES and LlamaFileType (tests/test_gguf_meta.py holds them
equal) without importing gguf: that costs ~0.1 s and numpy, which `info` and `kv-calc`
on a GGUF must not pay for. Every KV-cache type list in localllm derives from here.
"""

from __future__ import annotations

from localllm.errors import InvalidArgument

__all__ = [
    "FILE_TYPES",
    "GGML_TYPES",
    "KV_CACHE_TYPES",
    "check_kv_type",
    "file_type_name",
    "ggml_type_id",
    "kv_type_block",
    "kv_type_is_quantized",
    "tensor_bytes",
]

# ggml tensor types: id -> (name, elements per block, bytes per block).
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


# The cache types llama.cpp accepts for type_k / type_v (common/arg.cpp kv_cache_types),
# in the order localllm lists and sweeps them: floats first, then the quantized ones.
KV_CACHE_TYPES: tuple[str, ...] = (
    "f16", "bf16", "f32", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl",
)  # fmt: skip
_ID_BY_NAME = {name.lower(): type_id for type_id, (name, _, _) in GGML_TYPES.items()}


def ggml_type_id(name: str) -> int:
    """``"q8_0"`` -> 8: the ggml_type id (llama.cpp's type_k / type_v values)."""
    return _ID_BY_NAME[name.lower()]


def check_kv_type(name: str, flag: str | None = None) -> str:
    """``name`` if llama.cpp accepts it as a KV cache type, else the one error for it."""
    if name not in KV_CACHE_TYPES:
        given = f" ({flag})" if flag else ""
        raise InvalidArgument(
            f"unknown KV cache type {name!r}{given}; use one of {', '.join(KV_CACHE_TYPES)}"
        )
    return name


def kv_type_block(name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a KV cache type."""
    _, block, nbytes = GGML_TYPES[ggml_type_id(check_kv_type(name))]
    return block, nbytes


def kv_type_is_quantized(name: str) -> bool:
    """Whether a KV cache type is block-quantized (q8_0, q4_0, ...), not a float type."""
    return kv_type_block(name)[0] > 1


def tensor_bytes(type_id: int, n_elements: int) -> int:
    """Bytes of a tensor of ``n_elements`` of ggml type ``type_id`` (KeyError if unknown)."""
    _, block, nbytes = GGML_TYPES[type_id]
    return n_elements * nbytes // block


def file_type_name(value: object) -> str | None:
    """general.file_type's integer as llama.cpp names it (MOSTLY_Q4_1 -> Q4_1)."""
    if value is None or not isinstance(value, int | float):
        return None
    return FILE_TYPES.get(int(value), f"type {int(value)}")
