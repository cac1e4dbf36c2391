"""The tensor table a model reference names, without its weights.

From a local GGUF (or a header-only file), a hub file's header preview (a catalog alias
with a quant, org/repo:QUANT, hf://...), or a preset with llama.cpp's own quantizer
choosing each tensor's type. ``bench --synthetic`` writes random weights behind it;
``kv-calc --rpc`` dry-runs it across hosts.
"""

from __future__ import annotations

from pathlib import Path

from localllm.errors import InvalidArgument
from localllm.presets import lookup_preset
from localllm.resolver import resolve_model
from localllm.synthetic import TensorTable, preset_table, table_from_gguf, table_from_prefix

__all__ = ["DEFAULT_PRESET_QUANT", "tensor_table_of"]

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
    from localllm.hub_preview import remote_header  # lazy: huggingface_hub is slow to import

    preview = remote_header(model)
    return table_from_prefix(preview.prefix, preview.file_bytes, label), label
