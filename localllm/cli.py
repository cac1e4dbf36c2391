"""The ``localllm`` command line: parse, call one core function, render.

This is the only module that turns a ``LocalLLMError`` into a message and an exit
code. Each command imports its core and view inside its body, so ``localllm --help``
and ``kv-calc`` of a preset never load llama_cpp, numpy or huggingface_hub.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from localllm.commands.arguments import RESUME_LATEST, JsonOpt, ModelArg
from localllm.commands.bench import bench_cmd
from localllm.commands.chat import chat_cmd
from localllm.commands.embed import embed_cmd
from localllm.commands.kvcalc import kv_calc_cmd
from localllm.commands.ppl import ppl_cmd
from localllm.commands.rpc import rpc_server_cmd
from localllm.commands.serve import ps_cmd, serve_cmd, stop_cmd
from localllm.commands.system import system_cmd
from localllm.errors import InvalidArgument, LocalLLMError
from localllm.views.console import err, error, note, out, print_json, warn

app = typer.Typer(
    name="localllm",
    help="Run quantized LLMs (GGUF) on this machine with llama.cpp, and see what they cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


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
    from localllm.inventory.listing import list_models
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
    from localllm.inventory.listing import plan_removal, remove_model
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
    from localllm.inventory.listing import model_info
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
            "org/repo:QUANT (TheBloke/Llama-2-13B-chat-GGUF:Q4_K_M), hf://org/repo/file.gguf, "
            "or org/repo alone: the largest file that fits this machine (see kv-calc org/repo).",
            show_default=False,
        ),
    ],
    list_files: Annotated[
        bool, typer.Option("--list", help="List the repo's GGUF files, quants and sizes.")
    ] = False,
    ctx: Annotated[
        str | None,
        typer.Option(
            "--ctx",
            help="With org/repo alone: choose the largest file that fits this context "
            "(default 4096 or the trained length).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a model into the store: resumable, sha256-verified before it lands."""
    from localllm.errors import DownloadInterrupted
    from localllm.flags import parse_count_list
    from localllm.plan.quant_choice import choice_label, pull_choice
    from localllm.store.hub import list_repo_files
    from localllm.store.pull import pull
    from localllm.views.kvcalc import choice_progress
    from localllm.views.models import download_progress, render_hub_listing, render_pull_result

    if list_files:
        listing = list_repo_files(model)
        if as_json:
            print_json(listing)
        else:
            render_hub_listing(listing)
        return
    n_ctx = parse_count_list(ctx, "--ctx") if ctx else None
    if n_ctx is not None and len(n_ctx) != 1:
        raise InvalidArgument(f"--ctx {ctx}: pull chooses a file for one context, e.g. --ctx 8192")
    with choice_progress(model) as planning:
        choice = pull_choice(model, n_ctx[0] if n_ctx else None, planning)
    refs = [model]
    if choice is not None and choice.choice is not None:
        row = choice.choice
        note(f"pulling {choice_label(row)}: {choice.reason}")
        refs = [f"hf://{choice.repo}/{path}" for path in row.part_files]
    for ref in refs:
        try:
            with download_progress(ref.rsplit("/", 1)[-1] if choice else model) as progress:
                result = pull(ref, progress=progress)
        except DownloadInterrupted as exc:  # Ctrl-C: a warning, not an error; the partial stays
            warn(str(exc))
            raise typer.Exit(exc.exit_code) from None
        if as_json:
            print_json(result)
        render_pull_result(result)


# ------------------------------------------------------------------ larger commands
# Each lives in localllm/commands/: its flags are long, its body is one core call.

app.command("chat")(chat_cmd)
app.command("embed")(embed_cmd)
app.command("kv-calc")(kv_calc_cmd)
app.command("ppl")(ppl_cmd)
app.command("rpc-server")(rpc_server_cmd)
app.command("serve")(serve_cmd)
app.command("ps")(ps_cmd)
app.command("stop")(stop_cmd)
app.command("system")(system_cmd)
app.command(
    "bench",
    epilog="Comma lists and ranges sweep as in llama-bench: -t 1,2 -p 128,512, -p 128-512*2.",
)(bench_cmd)


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
