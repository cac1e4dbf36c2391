"""A GGUF's tensor bytes per layer, read by gguf-py (an independent reader)."""

from __future__ import annotations

from pathlib import Path


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
