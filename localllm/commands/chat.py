"""The ``chat`` command: flags -> ChatRequest -> one session -> the REPL or one reply."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from localllm.commands.arguments import (
    RESUME_LATEST,
    DraftOpt,
    ModelArg,
    NoMemoryCheckOpt,
    OnOffOpt,
    RepackOpt,
    RopeOpt,
    SpecOpt,
    SwaFullOpt,
    ThreadsOpt,
)
from localllm.commands.rpc import (
    GpuLayersOpt,
    RpcOpt,
    TensorSplitOpt,
    install_rpc_abort_report,
    parse_rpc,
)
from localllm.errors import InvalidArgument
from localllm.flags import parse_on_off, parse_repack, parse_tensor_split
from localllm.views.console import note, out, spinner


def chat_cmd(
    cli: typer.Context,
    model: ModelArg = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", "-p", help="Ask once: only the reply on stdout, stats on stderr."),
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    temp: Annotated[float, typer.Option("--temp", help="Temperature; 0 is greedy.")] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 0.95,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample from the k likeliest.")] = 40,
    min_p: Annotated[float, typer.Option("--min-p", help="Drop tokens below p x the top.")] = 0.05,
    repeat_penalty: Annotated[
        float, typer.Option("--repeat-penalty", help="Penalty for repeats; 1 is none.")
    ] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed.")] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", help="Reply budget in tokens (default: 512 or ctx/2)."),
    ] = None,
    ctx: Annotated[
        int | None,
        typer.Option("--ctx", help="Context in tokens (default: min(trained, 4096))."),
    ] = None,
    threads: ThreadsOpt = None,
    kv_type: Annotated[
        str, typer.Option("--kv-type", help="KV cache type for K and V: f16, q8_0, q4_0, ...")
    ] = "f16",
    flash_attn: OnOffOpt = "on",
    rope: RopeOpt = None,
    repack: RepackOpt = None,
    rpc: RpcOpt = None,
    gpu_layers: GpuLayersOpt = -1,
    tensor_split: TensorSplitOpt = None,
    swa_full: SwaFullOpt = False,
    spec: SpecOpt = "auto",
    draft: DraftOpt = None,
    no_memory_check: NoMemoryCheckOpt = False,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="Continue the latest saved session, or the one named: --resume ID.",
            show_default=False,
        ),
    ] = None,
    no_history: Annotated[
        bool,
        typer.Option("--no-history", help="Do not save this session (also LOCALLLM_NO_HISTORY=1)."),
    ] = False,
    kv_state_max: Annotated[
        str | None,
        typer.Option(
            "--kv-state-max",
            help="Disk for saved KV states (--resume loads them), oldest dropped; 0: none. "
            "Also LOCALLLM_KV_STATE_MAX.",
            show_default="4GiB",
        ),
    ] = None,
    sessions: Annotated[
        bool, typer.Option("--sessions", help="List the saved sessions and their KV states.")
    ] = False,
    template: Annotated[
        str | None,
        typer.Option(
            "--template",
            help="Chat template: a NAME (list: --template list) or a Jinja FILE. "
            "Default: the GGUF's own, else the catalog's, else localllm's rules.",
            show_default=False,
        ),
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="No template: continue the text (base models).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One-shot: print reply and stats as one JSON object.")
    ] = False,
) -> None:
    """Chat with a model: a streaming REPL, or one reply with -p / piped stdin."""
    # Long: one Typer parameter per flag; the body parses, opens one session, hands it over.
    from localllm.chat.history import history_enabled, list_sessions
    from localllm.chat.opening import ChatRequest, check_chat_options, open_session
    from localllm.chat.repl import chat_one_shot, chat_repl
    from localllm.chat.saved_state import restore_state, state_max
    from localllm.runtime.params import LoadOptions, SamplingOptions
    from localllm.views.chat import chat_opened, render_sessions, state_restored

    if template == "list":
        from localllm.templates.selection import template_names

        out.print("\n".join(template_names()))
        return
    if sessions:
        render_sessions(list_sessions())
        return
    max_state = state_max(kv_state_max)
    sampling = SamplingOptions(
        temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
        repeat_penalty=repeat_penalty, max_tokens=max_tokens, seed=seed,
    )  # fmt: skip
    if resume is not None:
        _refuse_flags_with_resume(cli)
        request, saved = _resumed_request(resume, no_memory_check)
        request = _with_given_sampling(cli, request, sampling)
    else:
        saved = None
        endpoints = parse_rpc(rpc)
        options = LoadOptions(
            n_threads=threads,
            type_k=kv_type,
            type_v=kv_type,
            flash_attn=parse_on_off(flash_attn, "--flash-attn"),
            repack=parse_repack(repack),
            swa_full=swa_full,
            rpc=endpoints,
            n_gpu_layers=gpu_layers,
            tensor_split=parse_tensor_split(tensor_split, endpoints),
        )
        request = ChatRequest(
            model, sampling, options, ctx, rope, system, not no_memory_check, template, raw,
            spec, draft,
        )  # fmt: skip
        if options.rpc:
            note("--rpc: layers go to the RPC servers (each host's share is checked first)")
            install_rpc_abort_report(
                "completed turns are saved: `localllm chat --resume` continues"
            )
    check_chat_options(request)
    prompt = _one_shot_prompt(prompt, as_json)
    with spinner(f"loading {request.model or 'the default model'}"):
        session = open_session(request)
    try:
        if saved is not None:
            session.restore(saved.messages, saved.dropped_messages)
            session.session_id = saved.id
        chat_opened(session)
        if saved is not None:
            state_restored(restore_state(session), saved.id)
        if prompt is not None:
            chat_one_shot(session, prompt, as_json=as_json)
        else:
            chat_repl(session, keep_history=history_enabled(no_history), state_max=max_state)
    finally:
        session.close()


def _one_shot_prompt(prompt: str | None, as_json: bool) -> str | None:
    """The one question of -p or piped stdin; None in a terminal (the REPL)."""
    one_shot = prompt is not None or not sys.stdin.isatty()
    if as_json and not one_shot:
        raise InvalidArgument("--json needs a prompt: pass -p TEXT or pipe it on stdin")
    if prompt is None and one_shot:
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise InvalidArgument(
                "stdin is empty; pipe a question in, pass -p TEXT, or run in a terminal to chat"
            )
    if prompt is not None and not prompt.strip():
        raise InvalidArgument("the prompt given with -p is empty")
    return prompt


# Sampling is not part of a conversation: these change how the resumed session answers.
_SAMPLING_FLAGS = {
    "temp": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "seed": "seed",
    "max_tokens": "max_tokens",
}
# Flags that go with --resume; every other one (model, context, RoPE, template, KV cache,
# load options) would change the conversation itself or the cache it was held in.
_RESUME_FLAGS = {
    "resume", "no_history", "no_memory_check", "prompt", "as_json", "kv_state_max",
    *_SAMPLING_FLAGS,
}  # fmt: skip


def _given(cli: typer.Context) -> list[str]:
    return [name for name in cli.params if cli.get_parameter_source(name).name == "COMMANDLINE"]


def _refuse_flags_with_resume(cli: typer.Context) -> None:
    given = [name for name in _given(cli) if name not in _RESUME_FLAGS]
    if given:
        flag = "MODEL" if given[0] == "model" else "--" + given[0].replace("_", "-")
        raise InvalidArgument(
            f"--resume continues a session with its own model, context, template and KV "
            f"cache settings; drop {flag} (or start a new chat without --resume). Sampling "
            "flags (--temp, --top-p, --top-k, --min-p, --repeat-penalty, --seed, "
            "--max-tokens) may change"
        )


def _with_given_sampling(cli: typer.Context, request: Any, sampling: Any) -> Any:
    """The resumed request with the sampling flags given on this command line in force."""
    from dataclasses import replace

    changed = {
        _SAMPLING_FLAGS[name]: getattr(sampling, _SAMPLING_FLAGS[name])
        for name in _given(cli)
        if name in _SAMPLING_FLAGS
    }
    return replace(request, sampling=replace(request.sampling, **changed)) if changed else request


def _resumed_request(resume: str, no_memory_check: bool) -> tuple[Any, Any]:
    from localllm.chat.history import load_session
    from localllm.chat.opening import request_from_saved

    saved = load_session(None if resume == RESUME_LATEST else resume)
    return request_from_saved(saved, memory_check=not no_memory_check), saved
