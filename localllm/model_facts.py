"""Where a model's architecture facts come from: a GGUF, the catalog, a preset or flags.

kv-calc sizes a model from whatever is at hand: a stored or local GGUF (its header), a
catalog alias whose file is not here, a hub reference (header preview), a preset with the
published shapes, or ``--layers/--heads/--kv-heads/--head-dim`` alone; flags given with a
model override its facts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from localllm.catalog import load_catalog
from localllm.errors import InvalidArgument
from localllm.gguf_meta import ModelSpec
from localllm.inventory import model_spec
from localllm.presets import PRESETS, lookup_preset
from localllm.resolver import resolve_model

__all__ = ["ArchFlags", "ModelFacts", "resolve_architecture"]


@dataclass(frozen=True)
class ArchFlags:
    """Architecture given on the command line (each overrides the model's own fact)."""

    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None

    def given(self) -> bool:
        return any(v is not None for v in (self.layers, self.heads, self.kv_heads, self.head_dim))


@dataclass(frozen=True)
class ModelFacts:
    """A model's architecture and weights, and where each came from."""

    label: str  # what the user called it
    spec: ModelSpec
    source: str  # gguf | catalog | preset | flags, "+flags" when flags changed it
    weights_bytes: int | None
    weights_note: str
    path: str | None = None  # the local GGUF, when there is one (for --verify)


def _flags_spec(flags: ArchFlags) -> ModelSpec:
    missing = [
        f"--{n.replace('_', '-')}"
        for n in ("layers", "heads", "head_dim")
        if getattr(flags, n) is None
    ]
    if missing:
        raise InvalidArgument(
            f"without a model, kv-calc needs --layers, --heads and --head-dim "
            f"(--kv-heads defaults to --heads); missing {', '.join(missing)}"
        )
    assert flags.layers and flags.heads and flags.head_dim
    kv_heads = flags.kv_heads if flags.kv_heads is not None else flags.heads
    name = f"custom {flags.layers}L/{flags.heads}H/{kv_heads}KV/d{flags.head_dim}"
    return ModelSpec(
        name=name,
        architecture="llama",
        n_layers=flags.layers,
        n_heads=flags.heads,
        n_kv_heads=kv_heads,
        head_dim=flags.head_dim,
        n_embd=flags.heads * flags.head_dim,
        n_ctx_train=0,  # unknown: no trained-length check
        source="flags",
    )


def _apply_flags(spec: ModelSpec, flags: ArchFlags) -> ModelSpec:
    changes: dict[str, object] = {}
    if flags.layers is not None:
        changes["n_layers"] = flags.layers
    if flags.heads is not None:
        changes["n_heads"] = flags.heads
    if flags.kv_heads is not None:
        changes["n_kv_heads"] = flags.kv_heads
    if flags.head_dim is not None:
        changes["head_dim"] = flags.head_dim
        changes["head_dim_v"] = None
    if changes:
        changes["n_kv_heads_per_layer"] = None
    return replace(spec, **changes)  # type: ignore[arg-type]


def _check_arch(spec: ModelSpec) -> None:
    for label, value in (
        ("--layers", spec.n_layers),
        ("--heads", spec.n_heads),
        ("--kv-heads", spec.n_kv_heads),
        ("--head-dim", spec.head_dim),
    ):
        if value <= 0:
            raise InvalidArgument(f"{label} {value} must be at least 1")
    if spec.n_kv_heads > spec.n_heads or spec.n_heads % spec.n_kv_heads:
        raise InvalidArgument(
            f"--kv-heads {spec.n_kv_heads} must divide --heads {spec.n_heads} "
            f"(each KV head serves a whole group of query heads; 1 is MQA, {spec.n_heads} MHA)"
        )


def _preset_weights(name: str, spec: ModelSpec) -> tuple[int | None, str]:
    preset = PRESETS[name]
    catalog = load_catalog()
    if preset.catalog_twin:
        entry = catalog.lookup(preset.catalog_twin)
        quant = entry.quant(None) if entry else None
        if quant and quant.size_bytes:
            exact = "" if quant.size_exact else "about "
            return quant.size_bytes, f"{exact}the {quant.quant} file of {preset.catalog_twin}"
    # No catalog twin: the parameter count at the bits per weight of the nearest twin.
    ref = PRESETS["llama-2-70b"]
    ref_entry = catalog.lookup(ref.catalog_twin or "")
    ref_quant = ref_entry.quant(None) if ref_entry else None
    if ref_quant is None or not ref_quant.size_bytes or not ref.spec.n_params or not spec.n_params:
        return None, "unknown"
    bits = ref_quant.size_bytes * 8 / ref.spec.n_params
    weights = round(spec.n_params * bits / 8)
    return weights, (
        f"estimated: {spec.n_params / 1e9:.2f}B params at {bits:.2f} bits/weight "
        f"({ref.catalog_twin} {ref_quant.quant})"
    )


def resolve_architecture(ref: str | None, flags: ArchFlags | None = None) -> ModelFacts:
    """Facts for ``ref`` (preset, catalog alias, GGUF path, hub ref) and any flag overrides."""
    flags = flags or ArchFlags()
    if ref is None and flags.given():
        spec = _flags_spec(flags)
        _check_arch(spec)
        return ModelFacts(spec.name, spec, "flags", None, "not given (architecture from flags)")
    preset = lookup_preset(ref)
    if preset is not None:
        spec = preset.spec
        weights, note = _preset_weights(spec.name, spec)
        facts = ModelFacts(spec.name, spec, "preset", weights, note)
    else:
        model = resolve_model(ref)
        spec = model_spec(model)
        label = model.alias or (model.path.name if model.path else model.ref)
        if spec.source == "gguf":
            note = "GGUF tensor table"
        else:
            note = f"{model.quant or 'default'} file size from the {spec.source}"
        facts = ModelFacts(
            label,
            spec,
            spec.source,
            spec.weights_bytes,
            note if spec.weights_bytes is not None else "unknown",
            path=str(model.path) if model.present and model.path else None,
        )
    if flags.given():
        spec = _apply_flags(facts.spec, flags)
        facts = replace(facts, spec=spec, source=f"{facts.source}+flags")
    _check_arch(facts.spec)
    return facts
