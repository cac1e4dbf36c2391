"""``localllm bench``: llama-bench's tests and numbers, with where the time and memory go.

The method is llama-bench's (tools/llama-bench/llama-bench.cpp), so a row here compares
with a row there: random tokens, one warm-up, ``r`` repetitions from a cleared KV cache;
``pp`` times a batched decode of the prompt in ``n_batch`` chunks, ``tg`` times ``n``
single-token decodes with no sampling; tokens/s is the mean and sample standard deviation
over the repetitions. Sweeps expand in llama-bench's order. The loops themselves live in
:mod:`localllm.runtime.decode`.

Every record carries llama-bench's fields (same names, types and order) and ours: peak
RSS, the weights/KV/compute buffers llama.cpp allocated, the roofline fraction of ``tg``
(measured memory read bandwidth over bytes read per generated token), and the machine,
software and model checksum the result was measured with.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from localllm.errors import InvalidArgument, LocalLLMError
from localllm.gguf_meta import ModelSpec, escape_untrusted
from localllm.runtime import (  # cheap: no llama_cpp import
    KV_CACHE_TYPES,
    check_v_cache_attention,
    default_threads,
)

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_UBATCH",
    "FLASH_ATTN_MODES",
    "LLAMA_BENCH_FIELDS",
    "OUTPUT_FORMATS",
    "Bandwidth",
    "BenchPlan",
    "BenchProgress",
    "BenchRequest",
    "BenchResult",
    "BenchRun",
    "BenchTest",
    "Environment",
    "describe_environment",
    "expand_tests",
    "format_csv",
    "format_csv_header",
    "format_csv_row",
    "format_json",
    "format_jsonl_row",
    "format_markdown",
    "measure_bandwidth",
    "memory_bandwidth",
    "parse_int_list",
    "parse_pairs",
    "run_bench",
]

OUTPUT_FORMATS = ("md", "csv", "json", "jsonl")
FLASH_ATTN_MODES = {"auto": -1, "off": 0, "on": 1}
# llama-bench's defaults (cmd_params_defaults).
DEFAULT_PROMPT, DEFAULT_GEN, DEFAULT_REPS = 512, 128, 5
DEFAULT_BATCH, DEFAULT_UBATCH = 2048, 512
KV_TYPES = tuple(KV_CACHE_TYPES)  # what llama.cpp accepts for type_k / type_v

# llama-bench's test::get_fields() of the llama.cpp build we run, in order, with the JSON
# type of each (test::get_field_type): i int, b bool, f float, s string.
LLAMA_BENCH_FIELDS: dict[str, str] = {
    "build_commit": "s",
    "build_number": "i",
    "cpu_info": "s",
    "gpu_info": "s",
    "backends": "s",
    "model_filename": "s",
    "model_type": "s",
    "model_size": "i",
    "model_n_params": "i",
    "n_batch": "i",
    "n_ubatch": "i",
    "n_threads": "i",
    "cpu_mask": "s",
    "cpu_strict": "b",
    "poll": "i",
    "type_k": "s",
    "type_v": "s",
    "n_gpu_layers": "i",
    "n_cpu_moe": "i",
    "split_mode": "s",
    "main_gpu": "i",
    "no_kv_offload": "b",
    "flash_attn": "i",
    "devices": "s",
    "tensor_split": "s",
    "tensor_buft_overrides": "s",
    "load_mode": "s",
    "lazy_mode": "s",
    "embeddings": "b",
    "no_op_offload": "i",
    "no_host": "b",
    "repack": "b",
    "fit_target": "i",
    "fit_min_ctx": "i",
    "n_prompt": "i",
    "n_gen": "i",
    "n_depth": "i",
    "test_time": "s",
    "avg_ns": "i",
    "stddev_ns": "i",
    "avg_ts": "f",
    "stddev_ts": "f",
}
# What llama-bench records for the settings localllm leaves at llama.cpp's defaults
# (the model loads with llama_model_default_params, contexts with the context defaults).
_FIXED_FIELDS: dict[str, Any] = {
    "cpu_mask": "0x0",
    "cpu_strict": False,
    "poll": 50,
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": False,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": False,
    "no_op_offload": 0,
    "no_host": False,
    "repack": True,
    "fit_target": 0,
    "fit_min_ctx": 0,
}
# Ours, after llama-bench's fields and samples (CSV leaves out the samples, as llama-bench).
EXTRA_FIELDS = (
    "tool",
    "localllm_version",
    "n_ctx",
    "n_ctx_cells",
    "flash_attn_used",
    "rope",
    "repetitions",
    "warmup",
    "peak_rss_bytes",
    "weights_bytes",
    "kv_bytes",
    "compute_bytes",
    "output_bytes",
    "bandwidth_bytes_per_s",
    "tg_bytes_per_token",
    "roofline_ts",
    "roofline_fraction",
    "cpu_model",
    "cpu_cores",
    "cpu_threads",
    "ram_bytes",
    "os",
    "python_version",
    "llama_cpp_python_version",
    "llama_cpp_build",
    "ggml_version",
    "model_sha256",
)


# ----------------------------------------------------------------------------- parsing

_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?:([+*])(\d+))?)?$")


def parse_int_list(values: Sequence[str], flag: str, *, minimum: int = 0) -> tuple[int, ...]:
    """llama-bench's number lists: ``128,512``, repeated flags, ``first-last[+step|*mult]``."""
    out: list[int] = []
    for value in values:
        for item in str(value).split(","):
            item = item.strip()
            m = _RANGE.match(item)
            if not m:
                raise InvalidArgument(
                    f"{flag} {item!r} is not a count; give whole numbers >= {minimum}, "
                    f"e.g. {flag} 128,512 or {flag} 128-512*2"
                )
            first = int(m[1])
            if m[2] is None:
                numbers = [first]
            else:
                last, op, step = int(m[2]), m[3] or "+", int(m[4] or 1)
                if (op == "+" and step < 1) or (op == "*" and (step < 2 or first < 1)):
                    raise InvalidArgument(
                        f"{flag} range {item!r} never ends; use +STEP with STEP >= 1, "
                        "or *MULT with MULT >= 2 from a start >= 1"
                    )
                numbers, n = [], first
                while n <= last:
                    numbers.append(n)
                    n = n + step if op == "+" else n * step
                if len(numbers) > 10_000:
                    raise InvalidArgument(f"{flag} range {item!r} expands to too many values")
            for n in numbers:
                if n < minimum:
                    raise InvalidArgument(f"{flag} {n} must be at least {minimum}")
            out.extend(numbers)
    return tuple(out)


def parse_pairs(values: Sequence[str], flag: str = "--pg") -> tuple[tuple[int, int], ...]:
    """llama-bench's ``-pg 512,128``: one prompt,generation pair per flag."""
    pairs = []
    for value in values:
        parts = [p.strip() for p in str(value).split(",")]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise InvalidArgument(
                f"{flag} {value!r} must be two token counts, prompt and generation: {flag} 512,128"
            )
        pairs.append((int(parts[0]), int(parts[1])))
    return tuple(pairs)


def _parse_names(
    values: Sequence[str], flag: str, known: Sequence[str], what: str
) -> tuple[str, ...]:
    out = []
    for value in values:
        for item in str(value).split(","):
            name = item.strip().lower()
            if name not in known:
                raise InvalidArgument(
                    f"unknown {what} {item.strip()!r} ({flag}); use one of {', '.join(known)}"
                )
            out.append(name)
    return tuple(out)


def _parse_flash_attn(values: Sequence[str]) -> tuple[str, ...]:
    aliases = {"1": "on", "0": "off", "-1": "auto", "true": "on", "false": "off"}
    items = [aliases.get(v.strip().lower(), v) for value in values for v in str(value).split(",")]
    return _parse_names(items, "--flash-attn", tuple(FLASH_ATTN_MODES), "flash attention mode")


def _online_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------- requests


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
    n_threads: tuple[int, ...] | None = None  # None: default_threads()
    repetitions: int = DEFAULT_REPS
    warmup: bool = True
    rope: str | None = None
    output: str = "md"
    refresh_bandwidth: bool = False

    @classmethod
    def from_flags(
        cls,
        model: str | None = None,
        *,
        n_prompt: Sequence[str] = (),
        n_gen: Sequence[str] = (),
        pg: Sequence[str] = (),
        depth: Sequence[str] = (),
        ctx: Sequence[str] = (),
        batch: Sequence[str] = (),
        ubatch: Sequence[str] = (),
        kv_type: Sequence[str] = (),
        type_k: Sequence[str] = (),
        type_v: Sequence[str] = (),
        flash_attn: Sequence[str] = (),
        threads: Sequence[str] = (),
        repetitions: int = DEFAULT_REPS,
        warmup: bool = True,
        rope: str | None = None,
        output: str = "md",
        refresh_bandwidth: bool = False,
    ) -> BenchRequest:
        """Parse the command line's strings (comma lists, ranges) into a checked request."""
        if repetitions < 1:
            raise InvalidArgument(
                f"repetitions {repetitions} must be at least 1 (-r 5 is the default)"
            )
        if output not in OUTPUT_FORMATS:
            raise InvalidArgument(
                f"unknown output format {output!r}; use one of {', '.join(OUTPUT_FORMATS)}"
            )
        kv_names = ("f16",)
        if kv_type:
            kv_names = _parse_names(kv_type, "--kv-type", KV_TYPES, "KV cache type")
        request = cls(
            model=model,
            n_prompt=parse_int_list(n_prompt, "-p") if n_prompt else (DEFAULT_PROMPT,),
            n_gen=parse_int_list(n_gen, "-n") if n_gen else (DEFAULT_GEN,),
            n_pg=parse_pairs(pg),
            n_depth=parse_int_list(depth, "-d") if depth else (0,),
            n_ctx=parse_int_list(ctx, "--ctx", minimum=1) if ctx else (None,),
            n_batch=parse_int_list(batch, "--batch", minimum=1) if batch else (DEFAULT_BATCH,),
            n_ubatch=(
                parse_int_list(ubatch, "--ubatch", minimum=1) if ubatch else (DEFAULT_UBATCH,)
            ),
            type_k=(
                _parse_names(type_k, "--type-k", KV_TYPES, "KV cache type") if type_k else kv_names
            ),
            type_v=(
                _parse_names(type_v, "--type-v", KV_TYPES, "KV cache type") if type_v else kv_names
            ),
            flash_attn=_parse_flash_attn(flash_attn) if flash_attn else ("auto",),
            n_threads=parse_int_list(threads, "-t", minimum=1) if threads else None,
            repetitions=repetitions,
            warmup=warmup,
            rope=rope,
            output=output,
            refresh_bandwidth=refresh_bandwidth,
        )
        request.tests()  # every combination checked before anything loads
        return request

    def threads(self) -> tuple[int, ...]:
        return self.n_threads if self.n_threads is not None else (default_threads(),)

    def tests(self) -> list[BenchTest]:
        return expand_tests(self)


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


# --------------------------------------------------------------------------- machine


@dataclass(frozen=True)
class Bandwidth:
    """This machine's memory read bandwidth, measured once and cached."""

    bytes_per_s: float
    method: str
    measured_at: str
    cached: bool


@dataclass(frozen=True)
class Environment:
    """What a result was measured on and with."""

    cpu_model: str
    cpu_info: str  # llama.cpp's CPU device description (llama-bench's cpu_info)
    gpu_info: str
    backends: str
    cpu_cores: int  # physical
    cpu_threads: int  # logical CPUs this process may use
    ram_bytes: int
    os: str
    python_version: str
    llama_cpp_python_version: str
    llama_cpp_build: str  # ggml_commit() of the loaded library
    ggml_version: str
    system_info: str
    localllm_version: str
    model_path: str
    model_sha256: str


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _machine_key() -> str:
    raw = f"{platform.node()}|{_cpu_model()}|{_online_cpus()}|{_ram_bytes()}|{platform.machine()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a temp file renamed over the old one, never a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


BANDWIDTH_METHOD = "numpy int64 add.reduce over 256 MiB, one slice per CPU thread, best of 7"


def measure_bandwidth(size_bytes: int = 256 << 20, passes: int = 7) -> float:
    """Read bandwidth in bytes/s: every CPU sums its slice of a buffer far larger than cache.

    numpy releases the GIL in reductions, so threads read in parallel the way llama.cpp's
    threads stream the weights; the best pass is the least disturbed one.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.ones(size_bytes // 8, dtype=np.int64)
    workers = max(_online_cpus(), 1)
    slices = np.array_split(data, workers)
    best = float("inf")
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(np.add.reduce, slices))  # fault the pages in, warm the threads
        for _ in range(passes):
            start = time.perf_counter()
            list(pool.map(np.add.reduce, slices))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def memory_bandwidth(refresh: bool = False) -> Bandwidth:
    """The cached bandwidth of this machine, measured (in a child process) when missing.

    The child keeps the 256 MiB buffer out of this process's peak RSS, which bench reports.
    """
    from localllm.store import cache_root

    path = cache_root() / "bandwidth.json"
    key = _machine_key()
    cache = _read_json(path)
    entry = cache.get(key)
    if not refresh and isinstance(entry, dict) and isinstance(entry.get("bytes_per_s"), float):
        return Bandwidth(
            entry["bytes_per_s"], entry.get("method", ""), entry.get("measured_at", ""), True
        )
    code = "from localllm.bench import measure_bandwidth; print(repr(measure_bandwidth()))"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
        )
        value = float(proc.stdout.strip())
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        raise LocalLLMError(f"could not measure memory bandwidth: {exc}") from None
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cache[key] = {"bytes_per_s": value, "method": BANDWIDTH_METHOD, "measured_at": now,
                  "cpu_model": _cpu_model(), "cpu_threads": _online_cpus()}  # fmt: skip
    _write_json(path, cache)
    return Bandwidth(value, BANDWIDTH_METHOD, now, False)


def _model_sha256(path: Path) -> str:
    """The file's sha256, remembered by path, size and mtime (a 4 GB hash takes a while)."""
    from localllm.store import cache_root, sha256_file

    cache_path = cache_root() / "sha256.json"
    stat = path.stat()
    key = str(path.resolve())
    cache = _read_json(cache_path)
    entry = cache.get(key)
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return str(entry["sha256"])
    digest = sha256_file(path)
    cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    _write_json(cache_path, cache)
    return digest


def _environment(build: Any, path: Path) -> Environment:
    from localllm import __version__

    return Environment(
        cpu_model=_cpu_model(),
        cpu_info=build.cpu_info,
        gpu_info=build.gpu_info,
        backends=build.backends,
        cpu_cores=default_threads(),
        cpu_threads=_online_cpus(),
        ram_bytes=_ram_bytes(),
        os=platform.platform(),
        python_version=platform.python_version(),
        llama_cpp_python_version=build.llama_cpp_python,
        llama_cpp_build=build.commit,
        ggml_version=build.ggml_version,
        system_info=build.system_info,
        localllm_version=__version__,
        model_path=str(path),
        model_sha256=_model_sha256(path),
    )


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


# --------------------------------------------------------------------------- roofline


def weights_read_per_token(path: Path, model_size: int) -> int:
    """Weight bytes one generated token reads: all of them, except the token embedding
    table when a separate output matrix exists (then only one embedding row is read)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from localllm.gguf_meta import _read_header  # the lean header walk (no vocabulary decode)

    _, tensors, _ = _read_header(path)
    names = {t.name: t for t in tensors}
    embd = names.get("token_embd.weight")
    if embd is None or "output.weight" not in names:
        return model_size  # tied embeddings: the output matmul reads the whole table
    block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(embd.type_id)]
    return max(model_size - embd.n_elements * type_bytes // block, 0)


def _tg_bytes_per_token(test: BenchTest, weights_read: int, spec: ModelSpec | None) -> int | None:
    """Bytes a tg step reads on average: weights plus the K and V of the cells attended."""
    if test.n_prompt > 0 or test.n_gen == 0:
        return None  # only tg rows time generation alone
    from localllm.memory import kv_bytes_per_token

    kv = 0
    if spec is not None:
        try:
            per_token = kv_bytes_per_token(spec, type_k=test.type_k, type_v=test.type_v)
        except InvalidArgument:
            per_token = 0
        # Step i attends to n_depth + i + 1 cells; the mean over n_gen steps:
        kv = round(per_token * (test.n_depth + (test.n_gen + 1) / 2))
    return weights_read + kv


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class BenchResult:
    """One finished test: its samples and everything needed to make its record."""

    test: BenchTest
    samples_ns: tuple[int, ...]
    test_time: str
    model_filename: str
    model_type: str
    model_size: int
    model_n_params: int
    n_ctx_cells: int
    flash_attn_used: bool | None
    rope: str
    peak_rss_bytes: int
    weights_bytes: int | None
    kv_bytes: int | None
    compute_bytes: int | None
    output_bytes: int | None
    tg_bytes_per_token: int | None
    bandwidth: Bandwidth | None
    environment: Environment
    repetitions: int
    warmup: bool

    # -- llama-bench's statistics (avg and stdev in llama-bench.cpp)
    @property
    def samples_ts(self) -> list[float]:
        return [1e9 * self.test.n_tokens / ns for ns in self.samples_ns]

    @property
    def avg_ns(self) -> int:
        return int(sum(self.samples_ns) // len(self.samples_ns))

    @property
    def stddev_ns(self) -> int:
        return int(_stdev([float(x) for x in self.samples_ns]))

    @property
    def avg_ts(self) -> float:
        ts = self.samples_ts
        return sum(ts) / len(ts)

    @property
    def stddev_ts(self) -> float:
        return _stdev(self.samples_ts)

    @property
    def roofline_ts(self) -> float | None:
        if self.tg_bytes_per_token is None or self.bandwidth is None:
            return None
        return self.bandwidth.bytes_per_s / self.tg_bytes_per_token

    @property
    def roofline_fraction(self) -> float | None:
        roof = self.roofline_ts
        return self.avg_ts / roof if roof else None

    def record(self) -> dict[str, Any]:
        """llama-bench's fields (names, order, types), its samples, then ours."""
        t, env = self.test, self.environment
        values: dict[str, Any] = {
            "build_commit": env.llama_cpp_build,
            "build_number": 0,  # llama-cpp-python does not carry llama.cpp's build count
            "cpu_info": env.cpu_info,
            "gpu_info": env.gpu_info,
            "backends": env.backends,
            "model_filename": self.model_filename,
            "model_type": self.model_type,
            "model_size": self.model_size,
            "model_n_params": self.model_n_params,
            "n_batch": t.n_batch,
            "n_ubatch": t.n_ubatch,
            "n_threads": t.n_threads,
            "type_k": t.type_k,
            "type_v": t.type_v,
            "flash_attn": FLASH_ATTN_MODES[t.flash_attn],
            "n_prompt": t.n_prompt,
            "n_gen": t.n_gen,
            "n_depth": t.n_depth,
            "test_time": self.test_time,
            "avg_ns": self.avg_ns,
            "stddev_ns": self.stddev_ns,
            "avg_ts": round(self.avg_ts, 6),
            "stddev_ts": round(self.stddev_ts, 6),
            **_FIXED_FIELDS,
        }
        record = {name: values[name] for name in LLAMA_BENCH_FIELDS}
        record["samples_ns"] = list(self.samples_ns)
        record["samples_ts"] = [round(x, 6) for x in self.samples_ts]
        bw = self.bandwidth
        ours: dict[str, Any] = {
            "tool": "localllm",
            "localllm_version": env.localllm_version,
            "n_ctx": t.n_ctx,
            "n_ctx_cells": self.n_ctx_cells,
            "flash_attn_used": self.flash_attn_used,
            "rope": self.rope,
            "repetitions": self.repetitions,
            "warmup": self.warmup,
            "peak_rss_bytes": self.peak_rss_bytes,
            "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes,
            "compute_bytes": self.compute_bytes,
            "output_bytes": self.output_bytes,
            "bandwidth_bytes_per_s": round(bw.bytes_per_s) if bw else None,
            "tg_bytes_per_token": self.tg_bytes_per_token,
            "roofline_ts": _round(self.roofline_ts, 3),
            "roofline_fraction": _round(self.roofline_fraction, 4),
            "cpu_model": env.cpu_model,
            "cpu_cores": env.cpu_cores,
            "cpu_threads": env.cpu_threads,
            "ram_bytes": env.ram_bytes,
            "os": env.os,
            "python_version": env.python_version,
            "llama_cpp_python_version": env.llama_cpp_python_version,
            "llama_cpp_build": env.llama_cpp_build,
            "ggml_version": env.ggml_version,
            "model_sha256": env.model_sha256,
        }
        record.update((name, ours[name]) for name in EXTRA_FIELDS)
        return record


def _stdev(values: Sequence[float]) -> float:
    """llama-bench's stdev: the sample standard deviation, 0 for a single sample."""
    n = len(values)
    if n <= 1:
        return 0.0
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# ------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class BenchPlan:
    """The first event of a run: what will be measured, and what to tell the user first."""

    model_path: Path
    tests: tuple[BenchTest, ...]
    repetitions: int
    warmup: bool
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class BenchProgress:
    """Where a run is: ``stage`` is bandwidth, hashing, loading, warmup, depth or rep."""

    stage: str
    index: int = 0  # 1-based test number, 0 before the tests
    total: int = 0
    test: str = ""
    rep: int = 0
    reps: int = 0


@dataclass(frozen=True)
class BenchRun:
    """The last event: every result, and the machine they were measured on."""

    results: tuple[BenchResult, ...]
    environment: Environment
    bandwidth: Bandwidth | None


BenchEvent = BenchPlan | BenchProgress | BenchResult | BenchRun


def run_bench(request: BenchRequest) -> Iterator[BenchEvent]:
    """Run a benchmark: yields the plan, progress, one result per test, then the run.

    Everything is checked before anything heavy happens; the model is loaded once and
    each test gets its own context, as in llama-bench.
    """
    from localllm.resolver import require_local_file, resolve_model
    from localllm.rope import plan_rope

    tests = request.tests()
    path = require_local_file(resolve_model(request.model))
    from localllm.gguf_meta import read_model_spec

    spec = read_model_spec(path)
    warnings: list[str] = []
    notes: list[str] = []
    cpus = _online_cpus()
    for n in sorted({t.n_threads for t in tests}):
        if n > cpus:
            warnings.append(
                f"-t {n} is more threads than the {cpus} CPU cores this process may use; "
                "they will share cores and measure slower than -t "
                f"{cpus}"
            )
    ropes = {}
    for n_ctx in sorted({t.n_ctx for t in tests}):
        plan = plan_rope(spec, n_ctx, request.rope)
        ropes[n_ctx] = plan
        if plan.extended:
            notes.append(plan.description)
        if plan.warning:
            warnings.append(plan.warning)
    yield BenchPlan(
        path, tuple(tests), request.repetitions, request.warmup, tuple(warnings), tuple(notes)
    )

    yield BenchProgress("bandwidth")
    bandwidth = memory_bandwidth(refresh=request.refresh_bandwidth)

    from localllm.runtime.decode import BenchModel, ContextConfig, llama_build

    yield BenchProgress("loading")
    results: list[BenchResult] = []
    with BenchModel(path) as model:
        yield BenchProgress("hashing")
        environment = _environment(llama_build(), path)
        weights_read = weights_read_per_token(path, model.size_bytes)
        for index, test in enumerate(tests, start=1):
            rope = ropes[test.n_ctx]
            progress = BenchProgress("warmup", index, len(tests), test.name, 0, request.repetitions)
            yield progress
            config = ContextConfig(
                n_ctx=test.n_ctx,
                n_batch=test.n_batch,
                n_ubatch=test.n_ubatch,
                type_k=test.type_k,
                type_v=test.type_v,
                flash_attn=test.flash_attn,
                n_threads=test.n_threads,
                rope=rope.params,
            )
            with model.new_context(config) as ctx:
                test_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                ctx.clear()
                if request.warmup:
                    ctx.warmup(test.n_prompt, test.n_gen)
                samples = []
                for rep in range(1, request.repetitions + 1):
                    ctx.clear()
                    if test.n_depth > 0:
                        yield replace(progress, stage="depth", rep=rep)
                        ctx.prefill_depth(test.n_depth)
                    yield replace(progress, stage="rep", rep=rep)
                    samples.append(ctx.timed_run(test.n_prompt, test.n_gen))
                buffers = ctx.buffers
                result = BenchResult(
                    test=test,
                    samples_ns=tuple(samples),
                    test_time=test_time,
                    model_filename=str(path),
                    model_type=model.desc,
                    model_size=model.size_bytes,
                    model_n_params=model.n_params,
                    n_ctx_cells=ctx.n_ctx,
                    flash_attn_used=ctx.flash_attn_used,
                    rope=rope.method,
                    peak_rss_bytes=_peak_rss_bytes(),
                    weights_bytes=model.weights_bytes,
                    kv_bytes=buffers.kv_bytes,
                    compute_bytes=buffers.compute_bytes,
                    output_bytes=buffers.output_bytes,
                    tg_bytes_per_token=_tg_bytes_per_token(test, weights_read, spec),
                    bandwidth=bandwidth,
                    environment=environment,
                    repetitions=request.repetitions,
                    warmup=request.warmup,
                )
            results.append(result)
            yield result
    yield BenchRun(tuple(results), environment, bandwidth)


# ---------------------------------------------------------------------------- formats


def _csv_value(name: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"  # std::to_string(bool), as llama-bench writes it
    if name in ("avg_ts", "stddev_ts") or isinstance(value, float):
        return f"{value:f}"
    return str(value)


def _csv_line(values: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n").writerow(values)
    return buf.getvalue()


def _csv_fields() -> list[str]:
    return [*LLAMA_BENCH_FIELDS, *EXTRA_FIELDS]


def format_csv_header() -> str:
    """llama-bench's CSV header line, then our columns."""
    return ",".join(_csv_fields()) + "\n"


def format_csv_row(result: BenchResult) -> str:
    record = result.record()
    return _csv_line([_csv_value(name, record[name]) for name in _csv_fields()])


def format_csv(results: Sequence[BenchResult]) -> str:
    return format_csv_header() + "".join(format_csv_row(r) for r in results)


def format_json(results: Sequence[BenchResult]) -> str:
    """A JSON array of records, as llama-bench's ``-o json``."""
    return json.dumps([r.record() for r in results], indent=2) + "\n"


def format_jsonl_row(result: BenchResult) -> str:
    return json.dumps(result.record()) + "\n"


# Markdown columns as llama-bench's markdown_printer lays them out (width < 0: left-aligned).
_MD_WIDTHS = {"model": -30, "size": 10, "params": 10, "backend": -10, "n_threads": 7,
              "n_batch": 7, "n_ubatch": 8, "type_k": 6, "type_v": 6, "flash_attn": 3,
              "n_ctx": 7, "test": 15, "t/s": 20, "roofline": 8}  # fmt: skip
_MD_NAMES = {"n_threads": "threads", "flash_attn": "fa", "n_ctx": "ctx"}


def _md_fields(request: BenchRequest, results: Sequence[BenchResult]) -> list[str]:
    fields = ["model", "size", "params", "backend", "n_threads"]  # threads: always on CPU
    for name, default in (("n_batch", (DEFAULT_BATCH,)), ("n_ubatch", (DEFAULT_UBATCH,)),
                          ("type_k", ("f16",)), ("type_v", ("f16",)),
                          ("flash_attn", ("auto",))):  # fmt: skip
        if getattr(request, name) != default:
            fields.append(name)
    if any(r.test.ctx_asked for r in results):
        fields.append("n_ctx")
    fields += ["test", "t/s"]
    if any(r.roofline_fraction is not None for r in results):
        fields.append("roofline")
    return fields


def format_markdown(
    request: BenchRequest, results: Sequence[BenchResult], run: BenchRun | None = None
) -> str:
    """llama-bench's markdown table (same columns and widths), a roofline column, the build."""
    fields = _md_fields(request, results)
    header, rule = "|", "|"
    for f in fields:
        width = _MD_WIDTHS[f]
        header += f" {_MD_NAMES.get(f, f):{'<' if width < 0 else '>'}{abs(width)}} |"
        rule += f" {'-' * (abs(width) - 1)}{':' if width > 0 else '-'} |"
    lines = [header, rule]
    for r in results:
        size = r.model_size
        cells = {
            "model": escape_untrusted(r.model_type),
            "size": f"{size / 2**20:.2f} MiB" if size < 2**30 else f"{size / 2**30:.2f} GiB",
            "params": f"{r.model_n_params / 1e6:.2f} M"
            if r.model_n_params < 1e9
            else f"{r.model_n_params / 1e9:.2f} B",
            "backend": r.environment.backends,
            "n_threads": str(r.test.n_threads),
            "n_batch": str(r.test.n_batch),
            "n_ubatch": str(r.test.n_ubatch),
            "type_k": r.test.type_k,
            "type_v": r.test.type_v,
            "flash_attn": str(FLASH_ATTN_MODES[r.test.flash_attn]),
            "n_ctx": str(r.test.n_ctx),
            "test": r.test.name,
            "t/s": f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}",
            "roofline": f"{r.roofline_fraction:.1%}" if r.roofline_fraction is not None else "",
        }
        line = "|"
        for f in fields:
            width = _MD_WIDTHS[f]
            line += f" {cells[f]:{'<' if width < 0 else '>'}{abs(width)}} |"
        lines.append(line)
    env = run.environment if run else (results[0].environment if results else None)
    if env is not None:
        lines += ["", f"build: {env.llama_cpp_build} (0)", *describe_environment(env)]
        bandwidth = run.bandwidth if run else results[0].bandwidth
        if bandwidth is not None and any(r.roofline_fraction is not None for r in results):
            lines.append(
                f"roofline: tg t/s as a share of {bandwidth.bytes_per_s / 1e9:.1f} GB/s memory "
                "read bandwidth / bytes read per generated token (weights + KV)"
            )
    return "\n".join(lines) + "\n"


def describe_environment(env: Environment) -> list[str]:
    """The machine and software behind a result, in a few human lines."""
    return [
        f"localllm {env.localllm_version}, llama-cpp-python {env.llama_cpp_python_version}, "
        f"ggml {env.ggml_version}; Python {env.python_version}; {env.os}",
        f"{env.cpu_model}: {env.cpu_cores} cores, {env.cpu_threads} threads, "
        f"{env.ram_bytes / 2**30:.1f} GiB RAM",
        f"model: {escape_untrusted(Path(env.model_path).name)} sha256 {env.model_sha256}",
    ]
