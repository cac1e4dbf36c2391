"""What the store holds and what a model is: the cores of ``list``, ``info`` and ``rm``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localllm.errors import InvalidArgument, InvalidModelFile
from localllm.gguf.spec import ModelSpec, read_model_spec
from localllm.plan.facts import facts_of
from localllm.plan.kvcalc import KVCalcRequest, KVRow, kv_calc
from localllm.plan.memory import layout_bytes_per_token
from localllm.store.catalog import load_catalog
from localllm.store.model_store import ModelStore
from localllm.store.resolver import ResolvedModel, resolve_model

if TYPE_CHECKING:
    from localllm.templates import TemplateCaps

__all__ = [
    "ModelInfo",
    "ModelListing",
    "list_models",
    "model_info",
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


# info's plan: chat's default context (min(trained, 4096)), f16 cache, as chat loads.
_INFO_CTX = 4096


@dataclass(frozen=True)
class ModelInfo:
    model: ResolvedModel
    spec: ModelSpec
    kv_per_token_bytes: int
    kv_at_train_bytes: int
    plans: tuple[KVRow, ...] = ()  # chat's default context, then the trained one
    plan_source: str | None = None
    weights_bytes: int | None = None
    template: TemplateCaps | None = None  # None: the GGUF has no chat template

    def as_json(self) -> dict[str, object]:
        s = self.spec
        caps = self.template
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
            "weights_bytes": self.weights_bytes,
            "file_bytes": s.file_bytes,
            "memory": {
                "source": self.plan_source,
                "plans": [_plan_json(r) for r in self.plans],
            },
            "chat_template_status": _caps_json(caps) if caps is not None else None,
        }


def _plan_json(row: KVRow) -> dict[str, object]:
    keys = ("ctx", "cells", "kv_bytes", "compute_bytes", "output_bytes", "weights_bytes",
            "total_bytes", "caches", "source", "swa_cells", "other_swa_kv_bytes")  # fmt: skip
    data = row.as_json()
    return {k: data[k] for k in keys if k in data}


def _caps_json(caps: TemplateCaps) -> dict[str, object]:
    return {
        "parses": caps.parses,
        "error": caps.error,
        "system_role": caps.system_role,
        "tools": caps.tools,
        "tool_calls": caps.tool_calls,
        "typed_content": caps.typed_content,
        "generation_prompt": caps.generation_prompt,
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
    """Architecture facts of a model (header only), its memory plan and its chat template.

    The plan is llama.cpp's dry run of the file (or the hub file's header) at chat's
    default context and at the trained one, f16 cache, flash attention on, the SWA cache
    sized to the window; an estimate when there is no GGUF (a catalog entry).
    """
    model = resolve_model(ref, store)
    facts = facts_of(model)
    spec = facts.spec
    contexts = tuple(sorted({min(spec.n_ctx_train, _INFO_CTX), spec.n_ctx_train}))
    result = kv_calc(KVCalcRequest(ctx=contexts), facts)
    per_token = layout_bytes_per_token(facts.memory_layout)
    at_train = next(r.kv_bytes for r in result.rows if r.ctx == spec.n_ctx_train)
    template = None
    if spec.chat_template is not None:
        from localllm.templates import template_caps  # lazy: jinja2 is slow to import

        template = template_caps(spec.chat_template, "the GGUF's chat template")
    return ModelInfo(
        model, spec, per_token, at_train, result.rows, result.plan_source,
        result.weights_bytes, template,
    )  # fmt: skip


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
