"""The ``rpc-server`` command, and the ``--rpc`` flags of the commands that load models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from localllm.views.console import note, warn

__all__ = [
    "GpuLayersOpt",
    "RpcOpt",
    "TensorSplitOpt",
    "install_rpc_abort_report",
    "parse_rpc",
    "rpc_server_cmd",
]

RpcOpt = Annotated[
    str | None,
    typer.Option(
        "--rpc",
        help="llama.cpp RPC servers HOST:PORT[,HOST:PORT...] (see `localllm rpc-server`); "
        "their devices take the model's layers.",
        show_default=False,
    ),
]
GpuLayersOpt = Annotated[
    int,
    typer.Option(
        "--gpu-layers",
        "-ngl",
        help="Layers on this machine's GPUs and the --rpc devices (-1: all; the rest on the CPU).",
    ),
]
TensorSplitOpt = Annotated[
    str | None,
    typer.Option(
        "--tensor-split",
        "-ts",
        help="How --rpc devices share the layers, llama.cpp's proportions: 3,1 or 3/1.",
        show_default="by their memory",
    ),
]


def parse_rpc(value: str | None) -> tuple[str, ...]:
    """--rpc's endpoints as host:port strings, each reachable and speaking the protocol."""
    if not value:
        return ()
    from localllm.rpc.hosts import hosts_memory, parse_endpoints

    endpoints = parse_endpoints(value)
    hosts_memory(endpoints)  # one line naming a dead, refused or mismatched server, in seconds
    return tuple(str(e) for e in endpoints)


def install_rpc_abort_report(way_out: str = "check the RPC servers and run again") -> None:
    """A server lost mid-run makes ggml abort the process: say so in one line first.

    ggml calls abort() after the handler returns, so the handler ends the process itself
    (exit 1). Chat's REPL writes the conversation after every turn, so its ``way_out``
    is `chat --resume`.
    """
    from localllm.runtime.rpc_server import install_abort_handler

    def report(message: str) -> None:
        line = (
            f"error: an RPC server stopped answering ({message.strip() or 'ggml abort'}); "
            f"{way_out}\n"
        )
        os.write(2, line.encode(errors="replace"))
        os._exit(1)

    install_abort_handler(report)


def rpc_server_cmd(
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (loopback unless you say so).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 50052,
    threads: Annotated[
        int | None, typer.Option("--threads", "-t", help="CPU threads.", show_default=False)
    ] = None,
    cache: Annotated[
        str | None,
        typer.Option(
            "--cache",
            help="llama.cpp's local tensor cache (much faster reloads).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve this machine's CPU to other localllm/llama.cpp hosts (llama.cpp's RPC server)."""
    from localllm.rpc.hosts import RpcServerOptions, non_loopback_warning, serve

    options = RpcServerOptions(
        host=host, port=port, threads=threads, cache_dir=Path(cache) if cache else None
    )
    options.validate()
    if message := non_loopback_warning(options):
        warn(message)
    try:
        # Clients (and Ctrl-C) may arrive as soon as the socket listens, before serve() returns.
        server = serve(options)
        note(f"RPC server listening on {server.endpoint}; Ctrl-C stops it")
        server.wait()
    except KeyboardInterrupt:
        note("stopped")
        raise typer.Exit(0) from None
