"""The ``ppl`` command: flags -> the perplexity run -> its progress and result."""

from __future__ import annotations

from typing import Annotated

import typer

from localllm.commands.arguments import (
    JsonOpt,
    ModelArg,
    NoMemoryCheckOpt,
    RepackOpt,
    RopeOpt,
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
from localllm.flags import parse_repack, parse_tensor_split
from localllm.views.console import note, print_json


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
    swa_full: SwaFullOpt = False,
    rpc: RpcOpt = None,
    gpu_layers: GpuLayersOpt = -1,
    tensor_split: TensorSplitOpt = None,
    no_memory_check: NoMemoryCheckOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity on a text, computed the way llama-perplexity computes it."""
    from localllm.generation import Notice
    from localllm.plan.rope import RopePlan
    from localllm.ppl.perplexity import PerplexityProgress, PerplexityResult, iter_perplexity
    from localllm.runtime.params import LoadOptions
    from localllm.views.ppl import PplProgress, render_ppl, show_rope_plan

    endpoints = parse_rpc(rpc)
    options = LoadOptions(
        n_threads=threads,
        repack=parse_repack(repack),
        swa_full=swa_full,
        rpc=endpoints,
        n_gpu_layers=gpu_layers,
        tensor_split=parse_tensor_split(tensor_split, endpoints),
    )
    if endpoints:
        install_rpc_abort_report()
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
