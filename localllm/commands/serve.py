"""The ``serve`` command: flags -> ServeOptions and a chat format -> the OpenAI API server."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

import typer

from localllm.commands.arguments import (
    DraftOpt,
    ModelArg,
    OnOffOpt,
    RepackOpt,
    RopeOpt,
    SpecOpt,
    ThreadsOpt,
)
from localllm.flags import check_count, check_threads, parse_on_off, parse_repack
from localllm.views.console import note

__all__ = ["serve_cmd"]

# Per slot when --ctx is not given: chat's default, min(trained, 4096).
_DEFAULT_SLOT_CTX = 4096


def serve_cmd(
    model: ModelArg = None,
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
    spec: SpecOpt = "auto",
    draft: DraftOpt = None,
) -> None:
    """Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions) and a chat page."""
    # Long: one Typer parameter per flag; the body maps them onto ServeOptions and one call.
    from localllm.gguf.spec import read_model_spec
    from localllm.plan.preload import check_load_fits, check_with_draft, plan_load
    from localllm.plan.rope import plan_rope
    from localllm.runtime.params import LoadOptions
    from localllm.runtime.speculation import check_spec_mode
    from localllm.serve.config import ServeOptions
    from localllm.serve.server import run_server
    from localllm.store.resolver import require_local_file, resolve_model

    check_count(parallel, "--parallel", high=256)
    check_count(ctx, "--ctx")
    check_threads(threads)
    check_spec_mode(spec, draft)
    resolved = resolve_model(model)
    path = require_local_file(resolved)
    spec = read_model_spec(path)
    chat_format = _chat_format(resolved, spec, path.name, template)
    slot = (ctx // parallel) if ctx else min(spec.n_ctx_train, _DEFAULT_SLOT_CTX)
    load = LoadOptions(
        n_ctx=slot * parallel,
        n_threads=threads,
        type_k=kv_type,
        type_v=kv_type,
        flash_attn=parse_on_off(flash_attn, "--flash-attn"),
        repack=parse_repack(repack),
    )
    if slot > spec.n_ctx_train or rope is not None:
        load = replace(load, rope=plan_rope(spec, slot, rope).params)
    label = resolved.alias or path.name
    memory = plan_load(label, spec, n_ctx=slot, n_seq=parallel, type_k=kv_type,
                       type_v=kv_type, flash_attn=load.flash_attn)  # fmt: skip
    check_load_fits(memory)
    draft_path = require_local_file(resolve_model(draft)) if draft else None
    if draft_path is not None:  # the draft model's own weights, KV and compute
        check_with_draft(memory, plan_load(draft_path.name, read_model_spec(draft_path),
                         n_ctx=slot, n_seq=parallel, type_k=kv_type, type_v=kv_type,
                         flash_attn=load.flash_attn))  # fmt: skip
    options = ServeOptions(
        model_path=path,
        model_id=resolved.alias or path.stem,
        model_aliases=tuple({path.name, resolved.ref} - {resolved.alias or path.stem}),
        host=host,
        port=port,
        parallel=parallel,
        load=load,
        api_key=api_key,
        insecure=insecure,
        allowed_hosts=tuple(allowed_host or ()),
        max_tokens=max_tokens,
        spec=spec,
        draft_path=draft_path,
    )
    try:
        run_server(options, chat_format=chat_format, on_event=_report)
    except KeyboardInterrupt:
        note("stopped")
        raise typer.Exit(0) from None


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
    from localllm.serve.config import RequestLogged, ServerReady

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
