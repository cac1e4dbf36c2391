"""Opening a chat session: the flags checked, the model resolved, its template chosen, its
memory plan checked, then one load. Also the request that reopens a saved session."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

from localllm.chat.history import SavedSession
from localllm.chat.session import (
    DEFAULT_CONTEXT,
    DEFAULT_MAX_TOKENS,
    ChatSession,
)
from localllm.errors import InvalidArgument
from localllm.flags import check_count, check_rope_method, check_threads, threads_warning
from localllm.gguf.spec import read_model_spec
from localllm.plan.need import check_with_draft
from localllm.plan.need_cache import check_load_need
from localllm.runtime.devices import split_applies
from localllm.runtime.engine_model import load_engine_model
from localllm.runtime.params import LoadOptions, SamplingOptions
from localllm.runtime.speculation import check_spec_mode
from localllm.store.catalog import load_catalog
from localllm.store.model_store import ModelStore
from localllm.store.resolver import ResolvedModel, require_local_file, resolve_model
from localllm.templates.selection import choose_format

__all__ = [
    "ChatRequest",
    "budget_message",
    "check_chat_options",
    "open_session",
    "plan_settings",
    "request_from_saved",
]


@dataclass(frozen=True)
class ChatRequest:
    """What ``chat`` was asked for, before anything is resolved or loaded."""

    model: str | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    options: LoadOptions = field(default_factory=LoadOptions)
    n_ctx: int | None = None  # None: min(trained context, 4096)
    rope_method: str | None = None
    system: str | None = None
    memory_check: bool = True
    template: str | None = None  # --template NAME|FILE
    raw: bool = False  # --raw: no template, the text is continued
    spec: str = "auto"  # --spec auto|off|ngram
    draft: str | None = None  # --draft MODEL: a draft model for speculative decoding


def check_chat_options(request: ChatRequest) -> None:
    """Reject bad flag values before anything is resolved or loaded (InvalidArgument)."""
    sampling, n_ctx, options = request.sampling, request.n_ctx, request.options
    sampling.validate()
    replace(options, n_ctx=n_ctx if n_ctx is not None else options.n_ctx).validate()
    check_count(n_ctx, "--ctx")
    check_count(sampling.max_tokens, "--max-tokens")
    check_threads(options.n_threads)
    if sampling.max_tokens is not None and n_ctx is not None and sampling.max_tokens >= n_ctx:
        raise InvalidArgument(budget_message(sampling.max_tokens, n_ctx))
    check_rope_method(request.rope_method)
    if request.raw and request.system:
        raise InvalidArgument("--raw continues the text as it is; drop --system")
    check_spec_mode(request.spec, request.draft)


# Long: the steps of opening in the order they must run (check, resolve, choose the
# template, plan RoPE and memory, load, validate); each is a line or two.
def open_session(request: ChatRequest) -> ChatSession:
    """Check the flags, resolve the model, check its memory plan, load it once.

    Past the trained context the RoPE plan (``rope_method`` or the default) stretches
    it. ``sampling.max_tokens`` None means 512 or half the context, whichever is smaller.
    """
    check_chat_options(request)
    model = resolve_model(request.model)
    path = require_local_file(model)
    spec = read_model_spec(path)
    chat_format = choose_format(
        spec,
        path.name,
        template=request.template,
        raw=request.raw,
        catalog_template=_catalog_template(model),
    )
    options, sampling = request.options, request.sampling
    ctx = request.n_ctx if request.n_ctx is not None else min(spec.n_ctx_train, DEFAULT_CONTEXT)
    plan = None
    if ctx > spec.n_ctx_train or request.rope_method is not None:
        from localllm.plan.rope import plan_rope  # past the trained context only

        plan = plan_rope(spec, ctx, request.rope_method)
        options = replace(options, rope=plan.params)
    max_tokens = sampling.max_tokens or min(DEFAULT_MAX_TOKENS, ctx // 2)
    if max_tokens >= ctx:
        raise InvalidArgument(budget_message(max_tokens, ctx))
    sampling = replace(sampling, max_tokens=max_tokens)
    seed = sampling.seed if sampling.seed is not None else options.seed
    options = replace(options, n_ctx=ctx, seed=seed)
    draft = require_local_file(resolve_model(request.draft)) if request.draft else None
    memory = None
    if request.memory_check and split_applies(options):
        # The weights live on several devices: each one's share against its own memory.
        from localllm.plan.split import check_split_load  # its dry runs: not for one CPU

        check_split_load(model.alias or path.name, path, options)
    elif request.memory_check:
        label = model.alias or path.name
        settings = plan_settings(options, plan.method if plan else None)
        memory = check_load_need(label, spec, **settings)
        if draft is not None:  # its own weights, KV and compute, beside the model's
            draft_settings = plan_settings(options, None)
            draft_need = check_load_need(draft.name, read_model_spec(draft), **draft_settings)
            check_with_draft(memory, draft_need)
    started = time.perf_counter()
    loaded = load_engine_model(path, options, spec=request.spec, draft=draft)
    try:
        chat_format.validate(bos_token=loaded.bos_text, eos_token=loaded.eos_text)
    except BaseException:
        loaded.close()
        raise
    return ChatSession(
        resolved=model,
        spec=spec,
        loaded=loaded,
        sampling=sampling,
        chat_format=chat_format,
        system=request.system or None,
        rope_plan=plan,
        load_seconds=time.perf_counter() - started,
        model_sha256=_recorded_sha256(model),
        memory=memory,
        spec_mode=request.spec,
        draft=request.draft,
        notes=tuple(
            n
            for n in (
                threads_warning(options.n_threads),
                loaded.repack.note,
                loaded.spec_note,
                # The GGUF's own template goes without saying; any other choice is said.
                None
                if chat_format.source == "gguf"
                else f"chat template: {chat_format.describe()}",
            )
            if n
        ),
    )


def _catalog_template(model: ResolvedModel) -> str | None:
    """The template the catalog names for this file: by alias, file name or store record."""
    if model.entry is not None:
        return model.entry.template
    if model.path is None:
        return None
    catalog = load_catalog()
    known = catalog.by_file(model.path.name)
    if known is not None:
        return known[0].template
    stored = ModelStore().record(model.path)
    entry = catalog.lookup(stored.alias) if stored is not None and stored.alias else None
    return entry.template if entry is not None else None


def request_from_saved(saved: SavedSession, *, memory_check: bool = True) -> ChatRequest:
    """The request that reopens a saved session: same model, same settings."""
    settings = saved.settings
    runtime = settings.get("runtime") or {}
    sampling_fields = {f.name for f in fields(SamplingOptions)}
    sampling = SamplingOptions(
        **{k: v for k, v in (settings.get("sampling") or {}).items() if k in sampling_fields}
    )
    rope = runtime.get("rope") or {}
    options = LoadOptions(
        n_threads=runtime.get("n_threads"),
        type_k=runtime.get("type_k", "f16"),
        type_v=runtime.get("type_v", "f16"),
        flash_attn=bool(runtime.get("flash_attn", True)),
        repack=runtime.get("repack"),
        swa_full=bool(runtime.get("swa_full", False)),
    )
    template = settings.get("template") or {}
    return ChatRequest(
        model=saved.model_ref or saved.model_path,
        sampling=sampling,
        options=options,
        n_ctx=runtime.get("n_ctx"),
        rope_method=rope.get("method") if rope else None,
        system=saved.system,
        memory_check=memory_check,
        # Only a template the user named is asked for again; the GGUF's own, the catalog's
        # and the recognized one are found again the same way (and keep their source).
        template=template.get("name") if template.get("source") == "--template" else None,
        raw=template.get("source") == "--raw",
        spec=runtime.get("spec") or "auto",
        draft=runtime.get("draft"),
    )


def plan_settings(options: LoadOptions, rope: str | None) -> dict[str, Any]:
    """kv-calc's settings (``plan_load``'s keywords) for a model loaded with ``options``, one
    sequence: the same context size, batch, KV types, flash attention, SWA and repacking."""
    return {
        "n_ctx": options.n_ctx,
        "type_k": options.type_k,
        "type_v": options.type_v,
        "flash_attn": options.flash_attn,
        "ubatch": min(options.n_ubatch, options.n_batch),
        "rope": rope,
        "swa_full": options.swa_full,
        "n_batch": options.n_batch,
        "repack": options.repack,
    }


def _recorded_sha256(model: ResolvedModel) -> str | None:
    """The sha256 the store verified the file against (never a re-hash)."""
    if model.path is None:
        return None
    stored = ModelStore().record(model.path)
    return stored.sha256 if stored is not None else None


def budget_message(max_tokens: int, n_ctx: int) -> str:
    return (
        f"a reply budget of {max_tokens} tokens leaves no room for the prompt in a "
        f"{n_ctx}-token context; lower --max-tokens or raise --ctx"
    )
