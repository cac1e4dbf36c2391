"""The ``localllm`` command line: parse, call one core function, render.

This is the only module that turns a ``LocalLLMError`` into a message and an exit
code. Each command imports its core and view inside its body, so ``localllm --help``
and ``kv-calc`` never load llama_cpp, numpy or huggingface_hub.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from localllm.errors import InvalidArgument, LocalLLMError
from localllm.options import parse_on_off, parse_repack
from localllm.views.console import err, error, note, out, print_json, spinner, warn

app = typer.Typer(
    name="localllm",
    help="Run quantized LLMs (GGUF) on this machine with llama.cpp, and see what they cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="Catalog alias (smollm2-135m, llama-2-7b-chat:Q4_K_M), a .gguf path, "
        "org/repo:QUANT, or hf://org/repo/file.gguf. Default: $LOCALLLM_MODEL or smollm2-135m.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
RopeOpt = Annotated[
    str | None,
    typer.Option(
        "--rope",
        help="RoPE scaling past the trained context: none, linear, ntk or yarn "
        "(default: yarn when --ctx exceeds the trained length).",
        show_default=False,
    ),
]
OnOffOpt = Annotated[str, typer.Option("--flash-attn", help="Flash attention: on or off.")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", "-t", help="CPU threads (1-512).", show_default="physical cores"),
]
RepackOpt = Annotated[
    str | None,
    typer.Option(
        "--repack",
        help="1: repack weights for faster CPU kernels (llama.cpp's default), 0: don't. "
        "Default: 1, but 0 on AMX CPUs (llama.cpp#20824).",
        show_default=False,
    ),
]
NoMemoryCheckOpt = Annotated[
    bool,
    typer.Option("--no-memory-check", help="Load even when the memory plan does not fit."),
]
# `--resume` alone means the latest session: main() inserts this before the next option.
RESUME_LATEST = "latest"


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import version

        from localllm.runtime.library import llama_cpp_version

        out.print(f"localllm {version('localllm')} (llama-cpp-python {llama_cpp_version()})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show versions."),
    ] = False,
) -> None:
    """localllm: pull, chat with, measure and size GGUF models."""


# ------------------------------------------------------------------------ list / rm


@app.command("list")
def list_cmd(as_json: JsonOpt = False) -> None:
    """List the models in the store (alias, file, size, quant, architecture, context)."""
    from localllm.inventory import list_models
    from localllm.views.models import render_model_list

    rows = list_models()
    if as_json:
        print_json(rows)
        return
    render_model_list(rows)


@app.command("rm")
def rm_cmd(
    model: Annotated[str, typer.Argument(help="The stored model to delete.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove a model file from the store."""
    from localllm.inventory import plan_removal, remove_model
    from localllm.text import format_bytes

    path = plan_removal(model)
    if not yes:
        if not sys.stdin.isatty():
            raise InvalidArgument(
                f"refusing to delete {path.name} without confirmation; pass --yes"
            )
        size = format_bytes(path.stat().st_size)
        if not typer.confirm(f"Delete {path.name} ({size})?", default=False, err=True):
            note("kept")
            raise typer.Exit(1)
    remove_model(path)
    note(f"removed {path}")


# ------------------------------------------------------------------------------ info


@app.command("info")
def info_cmd(model: ModelArg = None, as_json: JsonOpt = False) -> None:
    """Architecture facts from the GGUF header (no weights loaded) and its KV cost."""
    from localllm.inventory import model_info
    from localllm.views.models import render_info

    info = model_info(model)
    if as_json:
        print_json(info.as_json())
    else:
        render_info(info)


# ------------------------------------------------------------------------------ pull


@app.command("pull")
def pull_cmd(
    model: Annotated[
        str,
        typer.Argument(
            help="What to download: a catalog alias[:QUANT] (llama-2-7b-chat:Q4_K_M), "
            "org/repo:QUANT (TheBloke/Llama-2-13B-chat-GGUF:Q4_K_M) or hf://org/repo/file.gguf.",
            show_default=False,
        ),
    ],
    list_files: Annotated[
        bool, typer.Option("--list", help="List the repo's GGUF files, quants and sizes.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Download a model into the store: resumable, sha256-verified before it lands."""
    from localllm.errors import DownloadInterrupted
    from localllm.hub import list_repo_files
    from localllm.pull import pull
    from localllm.views.models import download_progress, render_hub_listing, render_pull_result

    if list_files:
        listing = list_repo_files(model)
        if as_json:
            print_json(listing)
        else:
            render_hub_listing(listing)
        return
    try:
        with download_progress(model) as progress:
            result = pull(model, progress=progress)
    except DownloadInterrupted as exc:  # Ctrl-C: a warning, not an error; the partial stays
        warn(str(exc))
        raise typer.Exit(exc.exit_code) from None
    if as_json:
        print_json(result)
    render_pull_result(result)


# ------------------------------------------------------------------------------ chat


@app.command("chat")
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
    from localllm.chat.history import history_enabled
    from localllm.chat.repl import chat_one_shot, chat_repl
    from localllm.chat.session import ChatRequest, check_chat_options, open_session
    from localllm.runtime.params import LoadOptions, SamplingOptions
    from localllm.views.chat import chat_opened

    if template == "list":
        from localllm.templates.formats import template_names

        out.print("\n".join(template_names()))
        return
    if resume is not None:
        _refuse_flags_with_resume(cli)
        request, saved = _resumed_request(resume, no_memory_check)
    else:
        saved = None
        sampling = SamplingOptions(
            temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
            repeat_penalty=repeat_penalty, max_tokens=max_tokens, seed=seed,
        )  # fmt: skip
        options = LoadOptions(
            n_threads=threads,
            type_k=kv_type,
            type_v=kv_type,
            flash_attn=parse_on_off(flash_attn, "--flash-attn"),
            repack=parse_repack(repack),
        )
        request = ChatRequest(
            model, sampling, options, ctx, rope, system, not no_memory_check, template, raw
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
        if prompt is not None:
            chat_one_shot(session, prompt, as_json=as_json)
        else:
            chat_repl(session, keep_history=history_enabled(no_history))
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


# Flags that go with --resume; every other one would be silently overridden by the session.
_RESUME_FLAGS = {"resume", "no_history", "no_memory_check", "prompt", "as_json"}


def _refuse_flags_with_resume(cli: typer.Context) -> None:
    given = [
        name
        for name in cli.params
        if name not in _RESUME_FLAGS and cli.get_parameter_source(name).name == "COMMANDLINE"
    ]
    if given:
        flag = "MODEL" if given[0] == "model" else "--" + given[0].replace("_", "-")
        raise InvalidArgument(
            f"--resume continues a session with its own model and settings; drop {flag} "
            "(or start a new chat without --resume)"
        )


def _resumed_request(resume: str, no_memory_check: bool) -> tuple[Any, Any]:
    from localllm.chat.history import load_session
    from localllm.chat.session import request_from_saved

    saved = load_session(None if resume == RESUME_LATEST else resume)
    return request_from_saved(saved, memory_check=not no_memory_check), saved


# --------------------------------------------------------------------------- kv-calc
# (the kv-calc command lives below this line)


@app.command("kv-calc")
def kv_calc_cmd(
    model: Annotated[
        str | None,
        typer.Argument(
            help="A preset (llama-2-7b, llama-2-13b, llama-2-70b, mistral-7b, llama-3-8b, "
            "llama-3-70b), a catalog alias, a .gguf path or a hub ref. Default: the default "
            "model, or the architecture flags alone.",
            show_default=False,
        ),
    ] = None,
    ctx: Annotated[
        str | None, typer.Option("--ctx", help="Tokens per sequence, comma-separated.")
    ] = None,
    batch: Annotated[
        str, typer.Option("--batch", help="Parallel sequences (each of ctx tokens), e.g. 1,16.")
    ] = "1",
    kv_type: Annotated[
        str | None,
        typer.Option(
            "--kv-type",
            help="K and V cache type(s): f16 bf16 f32 q8_0 q4_0 q4_1 "
            "q5_0 q5_1 iq4_nl, comma-separated.",
        ),
    ] = None,
    type_k: Annotated[str | None, typer.Option("--type-k", help="K cache type alone.")] = None,
    type_v: Annotated[str | None, typer.Option("--type-v", help="V cache type alone.")] = None,
    flash_attn: OnOffOpt = "on",
    ubatch: Annotated[
        int, typer.Option("--ubatch", help="Micro-batch size (sizes the compute buffer).")
    ] = 512,
    layers: Annotated[int | None, typer.Option("--layers", help="Transformer layers.")] = None,
    heads: Annotated[int | None, typer.Option("--heads", help="Query heads.")] = None,
    kv_heads: Annotated[int | None, typer.Option("--kv-heads", help="KV heads.")] = None,
    head_dim: Annotated[int | None, typer.Option("--head-dim", help="Head dimension.")] = None,
    budget: Annotated[
        str | None,
        typer.Option("--budget", help="Solve the other way: the largest context in e.g. 8GiB."),
    ] = None,
    rope: RopeOpt = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Load the model in llama.cpp and compare.")
    ] = False,
    repack: RepackOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """KV cache, GQA savings and the memory plan of a model, before anything loads."""
    # Long: one Typer parameter per flag; the body builds one request and renders it.
    from localllm.kvcalc import KVCalcRequest, kv_calc
    from localllm.kvverify import verify_kv_calc
    from localllm.model_facts import ArchFlags
    from localllm.options import MAX_SEQUENCES, check_count, parse_count_list, parse_kv_types
    from localllm.text import parse_size
    from localllm.views.kvcalc import render_kv_calc, render_kv_verify

    check_count(ubatch, "--ubatch")
    for value, flag in ((layers, "--layers"), (heads, "--heads"), (kv_heads, "--kv-heads"),
                        (head_dim, "--head-dim")):  # fmt: skip
        check_count(value, flag, high=1 << 16)
    request = KVCalcRequest(
        model=model,
        ctx=parse_count_list(ctx, "--ctx") if ctx else (),
        batch=parse_count_list(batch, "--batch", maximum=MAX_SEQUENCES),
        kv_types=parse_kv_types(kv_type) if kv_type else (),
        type_k=parse_kv_types(type_k, "--type-k")[0] if type_k else None,
        type_v=parse_kv_types(type_v, "--type-v")[0] if type_v else None,
        flash_attn=parse_on_off(flash_attn, "--flash-attn"),
        ubatch=ubatch,
        arch=ArchFlags(layers, heads, kv_heads, head_dim),
        budget_bytes=parse_size(budget) if budget else None,
        rope=rope,
    )
    result = kv_calc(request)
    report = None
    if verify:
        with spinner("creating the contexts in llama.cpp"):
            report = verify_kv_calc(result, parse_repack(repack))
        for message in report.notes:
            note(message)
    if as_json:
        data = result.as_json()
        if report is not None:
            data["verify"] = report.as_json()
        print_json(data)
        for message in result.warnings:
            warn(message)
        return
    render_kv_calc(result)
    if report is not None:
        out.print()
        render_kv_verify(report)


# --------------------------------------------------------------------------- ppl
# (the ppl command lives below this line)


@app.command("ppl")
def ppl_cmd(
    model: ModelArg = None,
    file: Annotated[
        str | None,
        typer.Option(
            "--file",
            "-f",
            help="Text file to score. Default (or 'pydoc'): Python's pydoc topics "
            "(English that ships with CPython; 113k SmolLM2 tokens).",
            show_default=False,
        ),
    ] = None,
    ctx: Annotated[int, typer.Option("--ctx", "-c", help="Tokens per chunk.")] = 512,
    rope: RopeOpt = None,
    chunks: Annotated[
        int | None,
        typer.Option("--chunks", help="Score at most this many chunks.", show_default="all"),
    ] = None,
    threads: ThreadsOpt = None,
    repack: RepackOpt = None,
    no_memory_check: NoMemoryCheckOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity on a text, computed the way llama-perplexity computes it."""
    from localllm.generation import Notice
    from localllm.ppl import PerplexityProgress, PerplexityResult, iter_perplexity
    from localllm.rope import RopePlan
    from localllm.runtime.params import LoadOptions
    from localllm.views.ppl import PplProgress, render_ppl, show_rope_plan

    options = LoadOptions(n_threads=threads, repack=parse_repack(repack))
    run = iter_perplexity(model, file, ctx, rope, chunks, options, not no_memory_check)
    with PplProgress() as progress:
        for item in run:
            if isinstance(item, RopePlan):
                show_rope_plan(item)
            elif isinstance(item, Notice):
                note(item.text)
            elif isinstance(item, PerplexityProgress):
                progress.update(item)
            elif isinstance(item, PerplexityResult):
                result = item
    if as_json:
        print_json(result.as_json())
    else:
        render_ppl(result)


# --------------------------------------------------------------------------- bench
# (the bench command lives below this line)

_SweepOpt = list[str] | None


@app.command(
    "bench",
    epilog="Comma lists and ranges sweep as in llama-bench: -t 1,2 -p 128,512, -p 128-512*2.",
)
def bench_cmd(
    model: ModelArg = None,
    n_prompt: Annotated[
        _SweepOpt,
        typer.Option("-p", "--n-prompt", help="Prompt tokens (pp test).", show_default="512"),
    ] = None,
    n_gen: Annotated[
        _SweepOpt,
        typer.Option("-n", "--n-gen", help="Generated tokens (tg test).", show_default="128"),
    ] = None,
    repetitions: Annotated[int, typer.Option("-r", "--repetitions", help="Runs per test.")] = 5,
    threads: Annotated[
        _SweepOpt,
        typer.Option("-t", "--threads", help="CPU threads.", show_default="physical cores"),
    ] = None,
    pg: Annotated[
        _SweepOpt,
        typer.Option("-pg", "--pg", help="A prompt,generation pair timed together: 512,128."),
    ] = None,
    depth: Annotated[
        _SweepOpt,
        typer.Option("-d", "--n-depth", help="Tokens already in the KV cache.", show_default="0"),
    ] = None,
    ctx: Annotated[
        _SweepOpt, typer.Option("--ctx", "-c", help="Context size.", show_default="p + n + d")
    ] = None,
    rope: RopeOpt = None,
    batch: Annotated[
        _SweepOpt,
        typer.Option("-b", "--batch", help="Logical batch (n_batch).", show_default="2048"),
    ] = None,
    ubatch: Annotated[
        _SweepOpt,
        typer.Option("-ub", "--ubatch", help="Physical batch (n_ubatch).", show_default="512"),
    ] = None,
    kv_type: Annotated[
        _SweepOpt,
        typer.Option(
            "--kv-type", help="KV cache type for K and V: f16, q8_0, q4_0, ...", show_default="f16"
        ),
    ] = None,
    type_k: Annotated[
        _SweepOpt, typer.Option("-ctk", "--type-k", help="K cache type alone.")
    ] = None,
    type_v: Annotated[
        _SweepOpt, typer.Option("-ctv", "--type-v", help="V cache type alone.")
    ] = None,
    flash_attn: Annotated[
        _SweepOpt, typer.Option("-fa", "--flash-attn", help="on, off or auto.", show_default="auto")
    ] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="md, csv, json or jsonl.")] = "md",
    no_warmup: Annotated[bool, typer.Option("--no-warmup", help="Skip the warm-up run.")] = False,
    refresh_bandwidth: Annotated[
        bool, typer.Option("--refresh-bandwidth", help="Measure memory bandwidth again.")
    ] = False,
    repack: Annotated[
        str | None,
        typer.Option(
            "--repack",
            help="0 or 1, as llama-bench (default 1; 0 on AMX CPUs).",
            show_default=False,
        ),
    ] = None,
    no_memory_check: NoMemoryCheckOpt = False,
) -> None:
    """Speed as llama-bench measures it (pp and tg tokens/s), plus memory and roofline."""
    # Long: one Typer parameter per flag (llama-bench's names); the body is one call.
    from localllm.bench.request import BenchRequest
    from localllm.bench.run import run_bench
    from localllm.views.bench import render_bench

    request = BenchRequest.from_flags(
        model,
        n_prompt=n_prompt or (),
        n_gen=n_gen or (),
        pg=pg or (),
        depth=depth or (),
        ctx=ctx or (),
        batch=batch or (),
        ubatch=ubatch or (),
        kv_type=kv_type or (),
        type_k=type_k or (),
        type_v=type_v or (),
        flash_attn=flash_attn or (),
        threads=threads or (),
        repetitions=repetitions,
        warmup=not no_warmup,
        rope=rope,
        output=output,
        refresh_bandwidth=refresh_bandwidth,
        repack=repack,
        no_memory_check=no_memory_check,
    )
    render_bench(request, run_bench(request))


# ------------------------------------------------------------------------ entry point


def _resume_without_id(argv: list[str]) -> list[str]:
    """``--resume`` with no ID means the latest session (Typer options need a value)."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(RESUME_LATEST)
    return out


def main() -> None:
    """Console-script entry: run the app; domain errors become one red line."""
    try:
        app(args=_resume_without_id(sys.argv[1:]))
    except LocalLLMError as exc:
        error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print()
        sys.exit(130)


if __name__ == "__main__":
    main()
