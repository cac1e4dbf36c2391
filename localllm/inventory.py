"""What the store holds and what a model is: the cores of ``list``, ``info`` and ``rm``,
and :func:`model_spec`, the architecture facts of any resolved model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from localllm.catalog import load_catalog
from localllm.errors import InvalidArgument, InvalidModelFile, ModelNotFound
from localllm.gguf_meta import ModelSpec, read_model_spec
from localllm.memory import kv_bytes_per_token, kv_cache_bytes
from localllm.resolver import ResolvedModel, require_local_file, resolve_model
from localllm.store import ModelStore

__all__ = [
    "ModelInfo",
    "ModelListing",
    "list_models",
    "model_info",
    "model_spec",
    "plan_removal",
    "remove_model",
]


@dataclass(frozen=True)
class ModelListing:
    alias: str | None
    file: str
    path: str
    size_bytes: int
    quant: str | None
    architecture: str | None
    n_ctx_train: int | None
    repo: str | None
    sha256: str | None
    problem: str | None = None  # set when the header cannot be read


@dataclass(frozen=True)
class ModelInfo:
    model: ResolvedModel
    spec: ModelSpec
    kv_per_token_bytes: int
    kv_at_train_bytes: int

    def as_json(self) -> dict[str, object]:
        s = self.spec
        return {
            "ref": self.model.ref,
            "path": s.path,
            "source": s.source,
            "name": s.name,
            "architecture": s.architecture,
            "n_params": s.n_params,
            "file_type": s.file_type,
            "quant_mix": [asdict(q) for q in s.quant_mix],
            "n_layers": s.n_layers,
            "n_heads": s.n_heads,
            "n_kv_heads": s.n_kv_heads,
            "attention": s.attention_kind,
            "head_dim": s.head_dim,
            "n_embd": s.n_embd,
            "n_ff": s.n_ff,
            "vocab_size": s.vocab_size,
            "n_ctx_train": s.n_ctx_train,
            "rope_freq_base": s.rope_freq_base,
            "rope_dim": s.rope_dim,
            "rope_scaling": {
                "type": s.rope_scaling_type,
                "factor": s.rope_scaling_factor,
                "original_context": s.rope_orig_ctx,
            },
            "sliding_window": s.sliding_window,
            "has_chat_template": s.has_chat_template,
            "kv_bytes_per_token_f16": self.kv_per_token_bytes,
            "kv_bytes_at_trained_context_f16": self.kv_at_train_bytes,
            "weights_bytes": s.weights_bytes,
            "file_bytes": s.file_bytes,
        }


def list_models(store: ModelStore | None = None) -> list[ModelListing]:
    """Every .gguf in the store with the facts its header gives (unreadable ones flagged)."""
    store = store or ModelStore()
    catalog = load_catalog()
    rows = []
    for stored in store.models():
        known = catalog.by_file(stored.filename)
        alias = stored.alias or (known[0].alias if known else None)
        quant = stored.quant or (known[1].quant if known else None)
        try:
            spec = read_model_spec(stored.path)
        except InvalidModelFile as exc:
            rows.append(
                ModelListing(alias, stored.filename, str(stored.path), stored.size_bytes, quant,
                             None, None, stored.repo, stored.sha256, problem=str(exc))
            )  # fmt: skip
            continue
        rows.append(
            ModelListing(
                alias=alias,
                file=stored.filename,
                path=str(stored.path),
                size_bytes=stored.size_bytes,
                quant=quant or spec.file_type,
                architecture=spec.architecture,
                n_ctx_train=spec.n_ctx_train,
                repo=stored.repo,
                sha256=stored.sha256,
            )
        )
    return rows


def model_info(ref: str | None, store: ModelStore | None = None) -> ModelInfo:
    """Architecture facts of a model (header only) and what its KV cache costs."""
    model = resolve_model(ref, store)
    spec = model_spec(model)
    per_token = kv_bytes_per_token(spec)
    at_train = kv_cache_bytes(spec, spec.n_ctx_train).total_bytes
    return ModelInfo(model, spec, per_token, at_train)


def plan_removal(ref: str, store: ModelStore | None = None) -> Path:
    """The stored file ``ref`` names; an error when it is not in the store."""
    store = store or ModelStore()
    model = resolve_model(ref, store)
    if not model.present or model.path is None:
        raise InvalidArgument(f"{ref} is not in the store ({store.root}); nothing to remove")
    if model.path.resolve().parent != store.root.resolve():
        raise InvalidArgument(
            f"{model.path} is not in the store ({store.root}); localllm only removes its own files"
        )
    return model.path


def remove_model(path: Path, store: ModelStore | None = None) -> Path:
    store = store or ModelStore()
    return store.remove(path.name)


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
        from localllm.hub_preview import remote_spec  # lazy: huggingface_hub is slow to import

        return remote_spec(model)  # the GGUF header alone, over HTTP range requests
    require_local_file(model)  # raises with the right hint
    raise ModelNotFound(f"no architecture facts for {model.ref}")
