"""Where a model's architecture facts come from: a GGUF, the catalog, a preset or flags.

kv-calc sizes a model from whatever is at hand: a stored or local GGUF (its header), a
catalog alias whose file is not here, a hub reference (header preview), a preset with the
published shapes, or ``--layers/--heads/--kv-heads/--head-dim`` alone; flags given with a
model override its facts. When a GGUF or its header is at hand, llama.cpp's dry run of it
(:func:`dry_run_file`) is the plan's source; otherwise the plan is an estimate.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from localllm.errors import InvalidArgument, ModelNotFound
from localllm.gguf.header import parse_header_prefix, read_header
from localllm.gguf.kv_layout import MemoryLayout, layout_from_header, layout_from_spec
from localllm.gguf.spec import ModelSpec, read_model_spec
from localllm.store.catalog import load_catalog
from localllm.store.presets import PRESETS, lookup_preset
from localllm.store.resolver import ResolvedModel, require_local_file, resolve_model

__all__ = [
    "ArchFlags",
    "ModelFacts",
    "dry_run_file",
    "facts_of",
    "file_facts",
    "model_spec",
    "resolve_architecture",
]


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
    layout: MemoryLayout | None = None  # None: every layer alike (presets, flags)
    header: bytes | None = field(default=None, repr=False)  # a hub file's header bytes
    # A split hub model: each shard's (file name, header bytes, size), the first first.
    shards: tuple[tuple[str, bytes, int], ...] = field(default=(), repr=False)

    @property
    def memory_layout(self) -> MemoryLayout:
        """Which layers keep what: the GGUF's own layout, else every layer alike."""
        return self.layout if self.layout is not None else layout_from_spec(self.spec)

    @property
    def has_gguf(self) -> bool:
        """A GGUF (or its header) describes exactly this model: llama.cpp can dry-run it."""
        return "+flags" not in self.source and (self.path is not None or self.header is not None)


@contextmanager
def dry_run_file(facts: ModelFacts) -> Iterator[Path | None]:
    """The GGUF llama.cpp can dry-run for ``facts``: the file, or the hub header (each
    shard's, for a split model) in a temporary sparse file of the model's full size;
    None when there is none."""
    if not facts.has_gguf:
        yield None
    elif facts.path is not None:
        yield Path(facts.path)
    elif facts.shards:
        from localllm.store.preview import header_files

        with header_files(facts.shards) as path:
            yield path
    else:
        from localllm.store.preview import header_file

        assert facts.header is not None
        with header_file(facts.header, facts.spec.file_bytes or len(facts.header)) as path:
            yield path


def file_facts(label: str, spec: ModelSpec) -> ModelFacts:
    """Facts of a local GGUF whose header was read into ``spec`` (chat, bench, ppl)."""
    layout = layout_from_header(read_header(Path(spec.path)).kv) if spec.path else None
    return ModelFacts(
        label, spec, spec.source, spec.weights_bytes, "GGUF tensor table", spec.path, layout
    )


def model_spec(model: ResolvedModel) -> ModelSpec:
    """Architecture facts: the file's header if present, else the catalog, else the hub."""
    if model.present:
        assert model.path is not None
        return read_model_spec(model.path)
    if model.entry is not None and model.entry.spec is not None:
        spec = model.entry.spec
        size = model.quant_file.size_bytes if model.quant_file else None
        return replace(spec, file_bytes=size, weights_bytes=size, file_type=model.quant)
    if model.kind == "hub" and model.repo is not None:
        from localllm.store.preview import remote_spec  # lazy: huggingface_hub is slow to import

        return remote_spec(model)  # the GGUF header alone, over HTTP range requests
    require_local_file(model)  # raises with the right hint
    raise ModelNotFound(f"no architecture facts for {model.ref}")


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
    checks = [("--layers", spec.n_layers)]
    # A recurrent GGUF (no heads) passes; flags that add heads to it are checked.
    if spec.has_attention or spec.n_kv_heads or spec.source == "flags":
        checks += [("--heads", spec.n_heads), ("--kv-heads", spec.n_kv_heads),
                   ("--head-dim", spec.head_dim)]  # fmt: skip
    for label, value in checks:
        if value <= 0:
            raise InvalidArgument(f"{label} {value} must be at least 1")
    if spec.n_kv_heads and (spec.n_kv_heads > spec.n_heads or spec.n_heads % spec.n_kv_heads):
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


def facts_of(model: ResolvedModel) -> ModelFacts:
    """Facts of a resolved model: its GGUF header (local or on the hub), else the catalog."""
    layout = header = None
    if model.present and model.path is not None:
        spec = model_spec(model)
        layout = layout_from_header(read_header(model.path).kv)
    elif model.kind == "hub" and model.repo is not None and not (model.entry and model.entry.spec):
        from localllm.store.preview import remote_header  # lazy: huggingface_hub is slow

        preview = remote_header(model)
        spec, header = preview.spec, preview.prefix
        layout = layout_from_header(parse_header_prefix(header, model.ref).kv)
    else:
        spec = model_spec(model)
    label = model.alias or (model.path.name if model.path else model.ref)
    if spec.source in ("gguf", "hub header"):
        note = "GGUF tensor table"
    else:
        note = f"{model.quant or 'default'} file size from the {spec.source}"
    return ModelFacts(
        label,
        spec,
        spec.source,
        spec.weights_bytes,
        note if spec.weights_bytes is not None else "unknown",
        path=str(model.path) if model.present and model.path else None,
        layout=layout,
        header=header,
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
        facts = facts_of(resolve_model(ref))
    if flags.given():
        spec = _apply_flags(facts.spec, flags)
        facts = replace(facts, spec=spec, source=f"{facts.source}+flags")
    _check_arch(facts.spec)
    return facts
