"""The ``system`` command: what llama.cpp sees on this machine (backends, devices, memory)."""

from __future__ import annotations

from typing import Annotated

import typer

from localllm.commands.arguments import JsonOpt
from localllm.commands.rpc import RpcOpt, parse_rpc
from localllm.views.console import print_json

__all__ = ["system_cmd"]


def system_cmd(
    rpc: RpcOpt = None,
    no_bandwidth: Annotated[
        bool,
        typer.Option(
            "--no-bandwidth", help="Skip the memory bandwidth figure (measured once, then cached)."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Compiled backends, every ggml device and its memory, CPU features and defaults."""
    from localllm.inventory.system import system_report

    report = system_report(parse_rpc(rpc), bandwidth=not no_bandwidth)
    if as_json:
        print_json(report.as_json())
        return
    from localllm.views.system import render_system

    render_system(report)
