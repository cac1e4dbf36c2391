"""What ``localllm bench`` is asked to measure: a request and its tests, in llama-bench order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localllm.errors import InvalidArgument
from localllm.flags import (
    MAX_THREADS,
    check_count,
    check_rope_method,
    parse_flash_attn_modes,
    parse_kv_type_list,
    parse_pairs,
    parse_repack,
    parse_sweep,
)
from localllm.machine import physical_cores
from localllm.runtime.params import check_v_cache_attention

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_GEN",
    "DEFAULT_PROMPT",
    "DEFAULT_REPS",
    "DEFAULT_UBATCH",
    "OUTPUT_FORMATS",
    "BenchRequest",
    "BenchTest",
    "expand_tests",
]

OUTPUT_FORMATS = ("md", "csv", "json", "jsonl")
# llama-bench's defaults (cmd_params_defaults).
DEFAULT_PROMPT, DEFAULT_GEN, DEFAULT_REPS = 512, 128, 5
DEFAULT_BATCH, DEFAULT_UBATCH = 2048, 512
MAX_REPETITIONS = 1000


@dataclass(frozen=True)
class _BenchFlags:
    """The bench command line as strings, before parsing."""

    n_prompt: Sequence[str] = ()
    n_gen: Sequence[str] = ()
    pg: Sequence[str] = ()
    depth: Sequence[str] = ()
    ctx: Sequence[str] = ()
    batch: Sequence[str] = ()
    ubatch: Sequence[str] = ()
    kv_type: Sequence[str] = ()
    type_k: Sequence[str] = ()
    type_v: Sequence[str] = ()
    flash_attn: Sequence[str] = ()
    threads: Sequence[str] = ()
    repetitions: int = DEFAULT_REPS
    warmup: bool = True
    rope: str | None = None
    output: str = "md"
    refresh_bandwidth: bool = False
    repack: str | None = None
    no_memory_check: bool = False
    synthetic: bool = False
    quant: str | None = None
    keep_synthetic: str | None = None
    rpc: tuple[str, ...] = ()  # checked endpoints (commands.rpc.parse_rpc)
    gpu_layers: int = -1
    tensor_split: tuple[float, ...] = ()


@dataclass(frozen=True)
class BenchRequest:
    """What to measure: every list is swept, as llama-bench sweeps its comma lists."""

    model: str | None = None
    n_prompt: tuple[int, ...] = (DEFAULT_PROMPT,)
    n_gen: tuple[int, ...] = (DEFAULT_GEN,)
    n_pg: tuple[tuple[int, int], ...] = ()
    n_depth: tuple[int, ...] = (0,)
    n_ctx: tuple[int | None, ...] = (None,)  # None: n_prompt + n_gen + n_depth (llama-bench)
    n_batch: tuple[int, ...] = (DEFAULT_BATCH,)
    n_ubatch: tuple[int, ...] = (DEFAULT_UBATCH,)
    type_k: tuple[str, ...] = ("f16",)
    type_v: tuple[str, ...] = ("f16",)
    flash_attn: tuple[str, ...] = ("auto",)
    n_threads: tuple[int, ...] | None = None  # None: physical cores
    repetitions: int = DEFAULT_REPS
    warmup: bool = True
    rope: str | None = None
    output: str = "md"
    refresh_bandwidth: bool = False
    repack: bool | None = None  # None: llama.cpp's default, except off on AMX CPUs
    memory_check: bool = True
    synthetic: bool = False  # random weights with the model's tensor table (bench/synthetic.py)
    quant: str | None = None  # a preset's quantization, with synthetic
    keep_synthetic: Path | None = None  # keep the synthetic file here
    hash_model: bool = True  # a synthetic file's sha256 says nothing: it is not hashed
    rpc: tuple[str, ...] = ()  # llama.cpp RPC servers whose devices take layers
    n_gpu_layers: int = -1  # with rpc: layers on their devices (-1: all)
    tensor_split: tuple[float, ...] = ()  # with rpc: the devices' shares

    @classmethod
    def from_flags(cls, model: str | None = None, **flags: Any) -> BenchRequest:
        """Parse the command line's strings (comma lists, ranges) into a checked request.

        ``flags`` are the CLI's: n_prompt, n_gen, pg, depth, ctx, batch, ubatch, kv_type,
        type_k, type_v, flash_attn, threads (lists of strings), and repetitions, warmup,
        rope, output, refresh_bandwidth.
        """
        f = _BenchFlags(**flags)
        if f.repetitions < 1:
            raise InvalidArgument(
                f"repetitions {f.repetitions} must be at least 1 (-r 5 is the default)"
            )
        check_count(f.repetitions, "-r", high=MAX_REPETITIONS)
        if f.output not in OUTPUT_FORMATS:
            raise InvalidArgument(
                f"unknown output format {f.output!r}; use one of {', '.join(OUTPUT_FORMATS)}"
            )
        if f.quant is not None and not f.synthetic:
            raise InvalidArgument("--quant picks a preset's quantization with --synthetic")
        kv_names = parse_kv_type_list(f.kv_type, "--kv-type") if f.kv_type else ("f16",)
        request = cls(
            model=model,
            n_prompt=parse_sweep(f.n_prompt, "-p") if f.n_prompt else (DEFAULT_PROMPT,),
            n_gen=parse_sweep(f.n_gen, "-n") if f.n_gen else (DEFAULT_GEN,),
            n_pg=parse_pairs(f.pg),
            n_depth=parse_sweep(f.depth, "-d") if f.depth else (0,),
            n_ctx=parse_sweep(f.ctx, "--ctx", minimum=1) if f.ctx else (None,),
            n_batch=parse_sweep(f.batch, "--batch", minimum=1) if f.batch else (DEFAULT_BATCH,),
            n_ubatch=(
                parse_sweep(f.ubatch, "--ubatch", minimum=1) if f.ubatch else (DEFAULT_UBATCH,)
            ),
            type_k=parse_kv_type_list(f.type_k, "--type-k") if f.type_k else kv_names,
            type_v=parse_kv_type_list(f.type_v, "--type-v") if f.type_v else kv_names,
            flash_attn=parse_flash_attn_modes(f.flash_attn) if f.flash_attn else ("auto",),
            n_threads=(
                parse_sweep(f.threads, "-t", minimum=1, maximum=MAX_THREADS) if f.threads else None
            ),
            repetitions=f.repetitions,
            warmup=f.warmup,
            rope=check_rope_method(f.rope),
            output=f.output,
            refresh_bandwidth=f.refresh_bandwidth,
            repack=parse_repack(f.repack),
            memory_check=not f.no_memory_check,
            synthetic=f.synthetic,
            quant=f.quant,
            keep_synthetic=_keep_path(f.keep_synthetic, f.synthetic),
            rpc=f.rpc,
            n_gpu_layers=f.gpu_layers,
            tensor_split=f.tensor_split,
        )
        request.tests()  # every combination checked before anything loads
        return request

    def threads(self) -> tuple[int, ...]:
        return self.n_threads if self.n_threads is not None else (physical_cores(),)

    def tests(self) -> list[BenchTest]:
        return expand_tests(self)


def _keep_path(value: str | None, synthetic: bool) -> Path | None:
    if value is None:
        return None
    if not synthetic:
        raise InvalidArgument("--keep-synthetic keeps the file --synthetic writes; add --synthetic")
    path = Path(value).expanduser()
    if path.is_dir() or path.exists():
        raise InvalidArgument(f"--keep-synthetic {value!r} exists; name a new file")
    return path


@dataclass(frozen=True)
class BenchTest:
    """One row: a pp, tg or pp+tg test with one value of every swept setting."""

    n_prompt: int
    n_gen: int
    n_depth: int
    n_ctx: int
    n_batch: int
    n_ubatch: int
    type_k: str
    type_v: str
    flash_attn: str  # auto | on | off
    n_threads: int
    ctx_asked: bool = False  # --ctx given (not llama-bench's n_prompt + n_gen + n_depth)

    @property
    def name(self) -> str:
        """llama-bench's test column: pp512, tg128, pp512+tg128, with `` @ d512`` at depth."""
        if self.n_prompt > 0 and self.n_gen == 0:
            text = f"pp{self.n_prompt}"
        elif self.n_gen > 0 and self.n_prompt == 0:
            text = f"tg{self.n_gen}"
        else:
            text = f"pp{self.n_prompt}+tg{self.n_gen}"
        return text + (f" @ d{self.n_depth}" if self.n_depth > 0 else "")

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self.n_gen


def expand_tests(request: BenchRequest) -> list[BenchTest]:
    """All combinations, in llama-bench's loop order (get_cmd_params_instances)."""
    tests: list[BenchTest] = []
    for n_batch in request.n_batch:
        for n_ubatch in request.n_ubatch:
            for type_k in request.type_k:
                for type_v in request.type_v:
                    for fa in request.flash_attn:
                        for n_threads in request.threads():
                            for n_depth in request.n_depth:
                                for n_ctx in request.n_ctx:
                                    shapes = [(p, 0) for p in request.n_prompt if p > 0]
                                    shapes += [(0, n) for n in request.n_gen if n > 0]
                                    shapes += [pg for pg in request.n_pg if pg != (0, 0)]
                                    for p, n in shapes:
                                        tests.append(
                                            _make_test(p, n, n_depth, n_ctx, n_batch, n_ubatch,
                                                       type_k, type_v, fa, n_threads)
                                        )  # fmt: skip
    if not tests:
        raise InvalidArgument(
            "nothing to measure: -p and -n are all 0 and no --pg pair was given; try -p 512 -n 128"
        )
    return tests


def _make_test(
    p: int, n: int, d: int, ctx: int | None, nb: int, nub: int, tk: str, tv: str, fa: str, nt: int
) -> BenchTest:
    needed = p + n + d
    if ctx is not None and ctx < needed:
        raise InvalidArgument(
            f"--ctx {ctx} is too small for {p} prompt + {n} generated + {d} depth tokens; "
            f"use --ctx {needed} or more"
        )
    check_v_cache_attention(tv, flash_attn=fa != "off")  # "auto" is left to llama.cpp
    return BenchTest(p, n, d, ctx if ctx is not None else needed, nb, nub, tk, tv, fa, nt,
                     ctx_asked=ctx is not None)  # fmt: skip
