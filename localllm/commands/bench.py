"""The ``bench`` command: llama-bench's flags -> BenchRequest -> the run -> its view."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import typer

from localllm.commands.arguments import (
    ModelArg,
    NoMemoryCheckOpt,
    RopeOpt,
    SwaFullOpt,
)
from localllm.commands.rpc import (
    GpuLayersOpt,
    RpcOpt,
    TensorSplitOpt,
    install_rpc_abort_report,
    parse_rpc,
)
from localllm.flags import parse_tensor_split

_SweepOpt = list[str] | None


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
    swa_full: SwaFullOpt = False,
    rpc: RpcOpt = None,
    gpu_layers: GpuLayersOpt = -1,
    tensor_split: TensorSplitOpt = None,
    no_memory_check: NoMemoryCheckOpt = False,
    synthetic: Annotated[
        bool,
        typer.Option(
            "--synthetic",
            help="Measure a model that is not downloaded: its tensor table (local, hub "
            "header, or a preset) with random weights, written and deleted here.",
        ),
    ] = False,
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant",
            help="With --synthetic: a preset's quantization, or which files of a hub repo "
            "named without a quant to measure; comma-separated (Q4_K_M,Q5_K_M).",
            show_default="Q4_K_M",
        ),
    ] = None,
    keep_synthetic: Annotated[
        str | None,
        typer.Option(
            "--keep-synthetic", help="Keep the synthetic GGUF at PATH.", show_default=False
        ),
    ] = None,
) -> None:
    """Speed as llama-bench measures it (pp and tg tokens/s), plus memory and roofline."""
    # Long: one Typer parameter per flag (llama-bench's names); the body is one call.
    from localllm.bench.request import BenchRequest
    from localllm.bench.run import run_bench
    from localllm.bench.synthetic import run_synthetic
    from localllm.views.bench import render_bench

    endpoints = parse_rpc(rpc)
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
        synthetic=synthetic,
        quant=quant,
        keep_synthetic=keep_synthetic,
        rpc=endpoints,
        gpu_layers=gpu_layers,
        tensor_split=parse_tensor_split(tensor_split, endpoints),
    )
    if endpoints:
        install_rpc_abort_report()
    run = partial(run_bench, swa_full=swa_full)
    render_bench(request, run_synthetic(request, run) if request.synthetic else run(request))
