"""Synthetic GGUF files for unit tests: real headers (gguf.GGUFWriter), tiny tensors.

``ARCHS`` holds the published architecture facts of the models localllm's lecture
uses; ``write_gguf`` writes any of them (or a variant with keys removed or changed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

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
        if key == "general.architecture":
            continue
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
