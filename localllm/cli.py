"""The ``localllm`` command line: parse, call one core function, render.

This is the only module that turns a ``LocalLLMError`` into a message and an exit
code. A run registers only the command it names (:func:`build_app`), and each command
imports its core and view inside its body, so ``localllm --help`` and ``kv-calc`` of a
preset never load llama_cpp, numpy or huggingface_hub.
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import typer

from localllm.commands.arguments import RESUME_LATEST, JsonOpt, ModelArg
from localllm.errors import InvalidArgument, LocalLLMError
from localllm.views.console import err, error, note, out, print_json, warn


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import version

        from localllm.runtime.library import llama_cpp_version

        out.print(f"localllm {version('localllm')} (llama-cpp-python {llama_cpp_version()})")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show versions."),
    ] = False,
) -> None:
    """localllm: pull, chat with, measure and size GGUF models."""


# ------------------------------------------------------------------------ list / rm


def list_cmd(as_json: JsonOpt = False) -> None:
    """List the models in the store (alias, file, size, quant, architecture, context)."""
    from localllm.inventory.listing import list_models
    from localllm.views.models import render_model_list

    rows = list_models()
    if as_json:
        print_json(rows)
        return
    render_model_list(rows)


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


# ---------------------------------------------------------------------- the app
# The larger commands live in localllm/commands/ (long flags, a one-call body). A run
# imports and registers only the command it names: a one-shot `chat -p` then pays for
# neither the other commands' modules nor Typer building their parameters.

# name -> the command, or "module:function" imported only when a run names it; in the
# order --help lists them
COMMANDS: dict[str, Callable[..., None] | str] = {
    "list": list_cmd,
    "rm": rm_cmd,
    "info": info_cmd,
    "pull": pull_cmd,
    "chat": "localllm.commands.chat:chat_cmd",
    "embed": "localllm.commands.embed:embed_cmd",
    "kv-calc": "localllm.commands.kvcalc:kv_calc_cmd",
    "ppl": "localllm.commands.ppl:ppl_cmd",
    "rpc-server": "localllm.commands.rpc:rpc_server_cmd",
    "serve": "localllm.commands.serve:serve_cmd",
    "ps": "localllm.commands.serve:ps_cmd",
    "stop": "localllm.commands.serve:stop_cmd",
    "system": "localllm.commands.system:system_cmd",
    "bench": "localllm.commands.bench:bench_cmd",
}
_SETTINGS: dict[str, dict[str, Any]] = {
    "bench": {
        "epilog": "Comma lists and ranges sweep as in llama-bench: -t 1,2 -p 128,512, -p 128-512*2."
    },
}


def _command(name: str) -> Callable[..., None]:
    target = COMMANDS[name]
    if callable(target):
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return]


def build_app(only: str | None = None) -> typer.Typer:
    """The Typer app with every command, or with just ``only`` (the one a run names)."""
    app = typer.Typer(
        name="localllm",
        help="Run quantized LLMs (GGUF) on this machine with llama.cpp, and see what they cost.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    for name in COMMANDS:
        if only is None or name == only:
            app.command(name, **_SETTINGS.get(name, {}))(_command(name))
    return app


def _named_command(argv: list[str]) -> str | None:
    """The command a command line starts with, or None: then every command is
    registered, for the root's --help and --version and for Typer's "No such command"
    with its suggestions."""
    return argv[0] if argv and argv[0] in COMMANDS else None


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
    argv = _resume_without_id(sys.argv[1:])
    try:
        build_app(_named_command(argv))(args=argv)
    except LocalLLMError as exc:
        error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print()
        sys.exit(130)


def run() -> NoReturn:
    """The console script (and ``python -m localllm``): :func:`main`, then the process
    ends without tearing the interpreter down.

    A finished run has nothing left to release that the OS does not take back, yet
    Python's teardown (clearing ~450 modules, a last collection of every object the run
    made) cost a 0.7 s ``chat -p`` here 30 ms (median of interleaved pairs, run() against
    main(); 30-100 ms in single runs' phase marks: benchmarks/chat_oneshot.md).
    Instagram's services skip it the same way. What a
    normal exit would still do is done first: atexit handlers (temp files, weakref
    finalizers), flushing stdout and stderr. A run that leaves a non-daemon thread
    running (a download pool) exits the normal way, which waits for it.
    """
    try:
        main()
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    if any(t.is_alive() and not t.daemon for t in _other_threads()):
        sys.exit(code)
    status = _exit_status(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): as Python's own exit
            status = status or 120
    os._exit(status)


def _other_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t is not threading.main_thread()]


def _exit_status(code: int | str | None) -> int:
    """``sys.exit``'s rules: None is 0, an int is itself, anything else is printed, 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1


if __name__ == "__main__":
    run()
