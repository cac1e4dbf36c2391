"""The ``kv-calc`` command: flags -> KVCalcRequest -> the plan (and --verify) -> its view."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from localllm.commands.arguments import (
    JsonOpt,
    OnOffOpt,
    RepackOpt,
    RopeOpt,
    SwaFullOpt,
)
from localllm.commands.rpc import (
    GpuLayersOpt,
    RpcOpt,
    TensorSplitOpt,
    parse_rpc,
)
from localllm.errors import InvalidArgument
from localllm.flags import check_count, parse_on_off, parse_repack, parse_tensor_split
from localllm.views.console import note, out, print_json, spinner, warn


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
    swa_full: SwaFullOpt = False,
    rpc: RpcOpt = None,
    gpu_layers: GpuLayersOpt = -1,
    tensor_split: TensorSplitOpt = None,
    estimate: Annotated[
        bool,
        typer.Option("--estimate", help="Arithmetic only: skip llama.cpp's dry run of the GGUF."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """KV cache, GQA savings and the memory plan of a model, before anything loads."""
    # Long: one Typer parameter per flag; the body builds one request and renders it.
    from localllm.flags import MAX_SEQUENCES, check_count, parse_count_list, parse_kv_types
    from localllm.plan.facts import ArchFlags
    from localllm.plan.kvcalc import KVCalcRequest, kv_calc
    from localllm.plan.verify import verify_kv_calc
    from localllm.text import parse_size
    from localllm.views.kvcalc import render_kv_calc, render_kv_verify

    if model is not None and not rpc and _repo_to_choose_in(model):
        _choose_cmd(
            model, ctx=ctx, batch=batch, kv_type=kv_type, type_k=type_k, type_v=type_v,
            flash_attn=flash_attn, ubatch=ubatch, repack=repack, swa_full=swa_full,
            estimate=estimate, as_json=as_json,
            other=(layers, heads, kv_heads, head_dim, budget, rope, verify, tensor_split,
                   gpu_layers != -1),
        )  # fmt: skip
        return
    check_count(ubatch, "--ubatch")
    for value, flag in ((layers, "--layers"), (heads, "--heads"), (kv_heads, "--kv-heads"),
                        (head_dim, "--head-dim")):  # fmt: skip
        check_count(value, flag, high=1 << 16)
    arch_only = any(v is not None for v in (layers, heads, kv_heads, head_dim))
    if rpc or (not (arch_only or estimate or verify or rope) and _gpu_here(model, gpu_layers)):
        # Layers on RPC servers or this machine's GPUs: each device's share on its memory.
        endpoints = parse_rpc(rpc)
        _split_cmd(
            model, endpoints, ctx=ctx, batch=batch, kv_type=kv_type, type_k=type_k,
            type_v=type_v, flash_attn=flash_attn, ubatch=ubatch, budget=budget,
            swa_full=swa_full, gpu_layers=gpu_layers, repack=repack, as_json=as_json,
            tensor_split=parse_tensor_split(tensor_split, endpoints),
            other=(layers, heads, kv_heads, head_dim, rope, verify, estimate),
        )  # fmt: skip
        return
    parse_tensor_split(tensor_split, ())  # refused without --rpc
    if gpu_layers != -1:
        raise InvalidArgument(
            f"-ngl {gpu_layers} places layers on a GPU or --rpc devices, and llama.cpp sees "
            "no GPU here (`localllm system`); add --rpc"
        )
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
        swa_full=swa_full,
        estimate=estimate,
        repack=parse_repack(repack),
    )
    with spinner("planning the memory"):
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


def _gpu_here(model: str | None, gpu_layers: int) -> bool:
    """Whether this machine's GPUs take a GGUF's layers (-ngl not 0, a GPU llama.cpp sees).

    Asked only of a file on disk: a preset stays arithmetic, without llama_cpp.
    """
    from localllm.errors import LocalLLMError
    from localllm.runtime.devices import split_applies
    from localllm.runtime.params import LoadOptions
    from localllm.store.resolver import resolve_model

    try:
        if not resolve_model(model).present:
            return False
    except LocalLLMError:  # kv-calc's own path says what is wrong with the reference
        return False
    return split_applies(LoadOptions(n_gpu_layers=gpu_layers))


def _split_cmd(model: str | None, endpoints: tuple[str, ...], **flags: Any) -> None:
    """kv-calc --rpc: each host's share from llama.cpp's dry run with the servers attached."""
    from localllm.flags import MAX_SEQUENCES, parse_count_list, parse_kv_types
    from localllm.plan.split import SplitRequest, plan_split
    from localllm.text import parse_size
    from localllm.views.split import render_split

    if any(flags["other"]):
        raise InvalidArgument(
            "--rpc plans a GGUF's split as llama.cpp makes it; drop --layers/--heads/"
            "--kv-heads/--head-dim/--rope/--verify/--estimate"
        )
    batch = parse_count_list(flags["batch"], "--batch", maximum=MAX_SEQUENCES)
    kv_types = parse_kv_types(flags["kv_type"]) if flags["kv_type"] else ("f16",)
    if len(batch) > 1 or len(kv_types) > 1:
        raise InvalidArgument("--rpc plans one --batch and one --kv-type at a time")
    check_count(flags["ubatch"], "--ubatch")
    request = SplitRequest(
        model=model,
        endpoints=endpoints,
        ctx=parse_count_list(flags["ctx"], "--ctx") if flags["ctx"] else (),
        n_seq=batch[0],
        type_k=parse_kv_types(flags["type_k"], "--type-k")[0] if flags["type_k"] else kv_types[0],
        type_v=parse_kv_types(flags["type_v"], "--type-v")[0] if flags["type_v"] else kv_types[0],
        flash_attn="on" if parse_on_off(flags["flash_attn"], "--flash-attn") else "off",
        ubatch=flags["ubatch"],
        swa_full=flags["swa_full"],
        n_gpu_layers=flags["gpu_layers"],
        tensor_split=flags["tensor_split"],
        budget_bytes=parse_size(flags["budget"]) if flags["budget"] else None,
        repack=parse_repack(flags["repack"]) is not False,
    )
    with spinner("planning the split with llama.cpp"):
        result = plan_split(request)
    if flags["as_json"]:
        print_json(result.as_json())
    else:
        render_split(result)


def _repo_to_choose_in(model: str) -> str | None:
    from localllm.store.hub import repo_to_choose_in

    return repo_to_choose_in(model)


def _choose_cmd(model: str, **flags: Any) -> None:
    """kv-calc ORG/REPO (no quant): every file of the repo against this machine."""
    from localllm.flags import MAX_SEQUENCES, parse_count_list, parse_kv_types
    from localllm.plan.kvcalc import KVCalcRequest
    from localllm.plan.quant_choice import QuantChoiceRequest, choose_quant
    from localllm.views.kvcalc import choice_progress, render_quant_choice

    if any(flags["other"]):
        raise InvalidArgument(
            f"{model} names a repo: kv-calc plans each of its files at one --ctx; drop "
            "--layers/--heads/--kv-heads/--head-dim/--budget/--rope/--verify/--tensor-split/"
            f"-ngl, or name one file ({model}:QUANT)"
        )
    ctx = parse_count_list(flags["ctx"], "--ctx") if flags["ctx"] else ()
    batch = parse_count_list(flags["batch"], "--batch", maximum=MAX_SEQUENCES)
    kv_types = parse_kv_types(flags["kv_type"]) if flags["kv_type"] else ()
    if len(ctx) > 1 or len(batch) > 1 or len(kv_types) > 1:
        raise InvalidArgument(
            f"{model} names a repo: its files are planned at one --ctx, one --batch and one "
            f"--kv-type; sweep one file with {model}:QUANT"
        )
    check_count(flags["ubatch"], "--ubatch")
    plan = KVCalcRequest(
        batch=batch,
        kv_types=kv_types,
        type_k=parse_kv_types(flags["type_k"], "--type-k")[0] if flags["type_k"] else None,
        type_v=parse_kv_types(flags["type_v"], "--type-v")[0] if flags["type_v"] else None,
        flash_attn=parse_on_off(flags["flash_attn"], "--flash-attn"),
        ubatch=flags["ubatch"],
        swa_full=flags["swa_full"],
        estimate=flags["estimate"],
        repack=parse_repack(flags["repack"]),
    )
    repo = _repo_to_choose_in(model)
    assert repo is not None
    with choice_progress(repo) as progress:
        choice = choose_quant(QuantChoiceRequest(repo, ctx[0] if ctx else None, plan), progress)
    if flags["as_json"]:
        print_json(choice.as_json())
        for message in choice.warnings:
            warn(message)
        return
    render_quant_choice(choice)
