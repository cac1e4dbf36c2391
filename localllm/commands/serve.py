"""The ``serve`` command: flags -> ServeOptions and a chat format -> the OpenAI API server."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Any

import typer

from localllm.commands.arguments import (
    DraftOpt,
    JsonOpt,
    OnOffOpt,
    RepackOpt,
    RopeOpt,
    SpecOpt,
    ThreadsOpt,
)
from localllm.flags import check_count, check_threads, parse_duration, parse_on_off, parse_repack
from localllm.views.console import note, print_json

__all__ = ["ps_cmd", "serve_cmd", "stop_cmd"]

# Per slot when --ctx is not given: chat's default, min(trained, 4096).
_DEFAULT_SLOT_CTX = 4096
_GIB = 1 << 30


ModelsArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Models to serve (references as chat's); a request's \"model\" picks one. "
        "None: every model in the store, the default first.",
        show_default=False,
    ),
]


def serve_cmd(
    models: ModelsArg = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8080,
    ctx: Annotated[
        int | None,
        typer.Option(
            "--ctx",
            help="Total context, split over the slots (llama-server's rule).",
            show_default="min(trained, 4096) per slot",
        ),
    ] = None,
    parallel: Annotated[
        int, typer.Option("--parallel", help="Requests served at once (slots); more queue.")
    ] = 1,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="LOCALLLM_API_KEY",
            show_default=False,
            help="Require 'Authorization: Bearer KEY' (also $LOCALLLM_API_KEY).",
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Serve a non-loopback address without a key.")
    ] = False,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option("--allowed-host", help="Another Host name to accept (DNS rebinding guard)."),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", help="Default reply budget.", show_default="min(512, slot/2)"),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(
            "--template", help="Chat template NAME or FILE, as chat's.", show_default=False
        ),
    ] = None,
    threads: ThreadsOpt = None,
    kv_type: Annotated[str, typer.Option("--kv-type", help="KV cache type for K and V.")] = "f16",
    flash_attn: OnOffOpt = "on",
    rope: RopeOpt = None,
    repack: RepackOpt = None,
    keep_alive: Annotated[
        str,
        typer.Option(
            "--keep-alive",
            help="Unload a model idle this long (300, 30s, 5m, 1h); 0 after each request, "
            "-1 never. Another model needing the memory unloads it sooner.",
        ),
    ] = "5m",
    spec: SpecOpt = "auto",
    draft: DraftOpt = None,
) -> None:
    """Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions) and a chat page."""
    # Long: one Typer parameter per flag; the body maps them onto ServeOptions and one call.
    from localllm.machine import available_memory_bytes
    from localllm.plan.need import check_with_draft
    from localllm.plan.preload import check_load_fits
    from localllm.runtime.speculation import check_spec_mode
    from localllm.serve.config import ServeOptions
    from localllm.serve.server import run_server
    from localllm.store.resolver import require_local_file, resolve_model

    check_count(parallel, "--parallel", high=256)
    check_count(ctx, "--ctx")
    check_threads(threads)
    alive = parse_duration(keep_alive, "--keep-alive")
    check_spec_mode(spec, draft)
    settings = _Settings(ctx, parallel, threads, kv_type, parse_on_off(flash_attn, "--flash-attn"),
                         parse_repack(repack), rope, template)  # fmt: skip
    refs = list(models) if models else _stored_models()
    draft_path = require_local_file(resolve_model(draft)) if draft else None
    served = []
    for ref in refs:
        model, plan = _served_model(ref, settings)
        if draft_path is not None:  # each loaded model has its own draft context
            draft_model, draft_plan = _served_model(str(draft_path), settings)
            if not served:
                check_with_draft(plan.need, draft_plan.need)
            model = replace(
                model,
                plan_bytes=(model.plan_bytes or 0) + (draft_model.plan_bytes or 0),
                plan_summary=f"{model.plan_summary}, and the draft model's "
                f"{draft_model.plan_summary}",
            )
        elif not served:
            check_load_fits(plan)  # the first model loads at start; the others on demand
        served.append(model)
    first = served[0]
    options = ServeOptions(
        model_path=first.path,
        model_id=first.model_id,
        model_aliases=first.aliases,
        host=host,
        port=port,
        parallel=parallel,
        load=first.load,
        api_key=api_key,
        insecure=insecure,
        allowed_hosts=tuple(allowed_host or ()),
        max_tokens=max_tokens,
        more_models=tuple(served[1:]),
        keep_alive=alive,
        memory_budget=available_memory_bytes(),
        first_plan_bytes=first.plan_bytes,
        first_plan_summary=first.plan_summary,
        first_chat_format=first.chat_format,
        spec=spec,
        draft_path=draft_path,
    )
    try:
        run_server(options, on_event=_report)
    except KeyboardInterrupt:
        note("stopped")
        raise typer.Exit(0) from None


@dataclass(frozen=True)
class _Settings:
    """The load settings every served model shares."""

    ctx: int | None
    parallel: int
    threads: int | None
    kv_type: str
    flash_attn: bool
    repack: bool | None
    rope: str | None
    template: str | None


def _stored_models() -> list[str]:
    """Every model file in the store, the default model first (none stored: the default,
    which then says how to get it)."""
    from localllm.store.model_store import ModelStore
    from localllm.store.resolver import resolve_model

    default = resolve_model(None)
    paths = [str(m.path) for m in ModelStore().models()]
    if not paths:
        return [default.ref]
    first = str(default.path) if default.present and default.path is not None else None
    if first in paths:
        return [first, *(p for p in paths if p != first)]
    return paths


def _served_model(ref: str, s: _Settings) -> tuple[Any, Any]:
    """One model reference as a ServedModel, with its plan at the server's settings."""
    from localllm.gguf.spec import read_model_spec
    from localllm.plan.preload import plan_load
    from localllm.plan.rope import plan_rope
    from localllm.runtime.params import LoadOptions
    from localllm.serve.config import ServedModel
    from localllm.store.catalog import load_catalog
    from localllm.store.resolver import require_local_file, resolve_model

    resolved = resolve_model(ref)
    path = require_local_file(resolved)
    spec = read_model_spec(path)
    slot = (s.ctx // s.parallel) if s.ctx else min(spec.n_ctx_train, _DEFAULT_SLOT_CTX)
    load = LoadOptions(n_ctx=slot * s.parallel, n_threads=s.threads, type_k=s.kv_type,
                       type_v=s.kv_type, flash_attn=s.flash_attn, repack=s.repack)  # fmt: skip
    if slot > spec.n_ctx_train or s.rope is not None:
        load = replace(load, rope=plan_rope(spec, slot, s.rope).params)
    known = load_catalog().by_file(path.name)
    alias = resolved.alias or (known[0].alias if known else None)
    label = alias or path.name
    plan = plan_load(label, spec, n_ctx=slot, n_seq=s.parallel, type_k=s.kv_type,
                     type_v=s.kv_type, flash_attn=load.flash_attn)  # fmt: skip
    row = plan.row
    parts = [f"weights {(row.weights_bytes or 0) / _GIB:.2f}", f"KV {row.kv_bytes / _GIB:.2f}"]
    if row.compute_bytes:
        parts.append(f"compute {(row.compute_bytes + (row.output_bytes or 0)) / _GIB:.2f}")
    model_id = alias or path.stem
    served = ServedModel(
        model_id=model_id,
        path=path,
        aliases=tuple(sorted({path.name, resolved.ref} - {model_id})),
        load=load,
        parallel=s.parallel,
        chat_format=_chat_format(resolved, spec, path.name, s.template),
        plan_bytes=row.total_bytes,
        plan_summary=" + ".join(parts) + " GiB",
    )
    return served, plan


def _chat_format(resolved: Any, spec: Any, file_name: str, template: str | None) -> Any:
    """Chat's template choice; None for a base model (then /v1/completions only)."""
    from localllm.store.catalog import load_catalog
    from localllm.templates.selection import choose_format

    entry = resolved.entry or (load_catalog().by_file(file_name) or (None, None))[0]
    catalog_template = entry.template if entry is not None else None
    if template is None and not spec.chat_template and not catalog_template:
        return None
    return choose_format(spec, file_name, template=template, catalog_template=catalog_template)


def _report(event: object) -> None:
    from localllm.serve.config import ModelEvent, RequestLogged, ServerReady

    if isinstance(event, ModelEvent):
        verb = {"loaded": "loaded", "unloaded": "unloaded", "load_failed": "failed to load"}
        note(f"{event.model_id} {verb.get(event.action, event.action)} in "
             f"{event.seconds:.1f} s ({event.reason})")  # fmt: skip
        return

    if isinstance(event, ServerReady):
        key = "API key required" if event.api_key_required else "no API key (loopback)"
        note(
            f"serving {event.model_id} on {event.url} · ctx {event.n_ctx} = {event.n_parallel} "
            f"slots x {event.n_ctx_slot} · {key} · loaded in {event.load_seconds:.1f} s"
        )
        if event.spec_note:
            note(event.spec_note)
    elif isinstance(event, RequestLogged):
        tokens = (
            f" · {event.prompt_tokens} in, {event.completion_tokens} out ({event.finish_reason})"
            if event.completion_tokens is not None
            else ""
        )
        note(f"{event.method} {event.path} {event.status} {event.seconds * 1000:.0f} ms{tokens}")


KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="LOCALLLM_API_KEY",
        show_default=False,
        help="The servers' key, when they require one (also $LOCALLLM_API_KEY).",
    ),
]


def ps_cmd(api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """List the models running `localllm serve` processes hold: status, context, memory."""
    from localllm.serve.registry import loaded_models
    from localllm.views.servers import render_ps

    rows = loaded_models(api_key)
    if as_json:
        print_json(rows)
        return
    render_ps(rows)


def stop_cmd(
    model: Annotated[str, typer.Argument(help="The served model to unload (its id or alias).")],
    api_key: KeyOpt = None,
) -> None:
    """Unload a model from the running servers that hold it (it loads again on demand)."""
    from localllm.serve.registry import stop_model
    from localllm.views.servers import render_stop

    results = stop_model(model, api_key)
    render_stop(results)
    if not any(r.unloaded for r in results):
        raise typer.Exit(1)
