"""The one place that imports llama_cpp: load a model, stream a chat, read what it reports.

``import localllm.runtime`` is cheap; ``llama_cpp`` (and its shared library) is imported
only when a model is loaded, so ``localllm --help`` and ``kv-calc`` never pay for it.
Everything llama.cpp logs is captured instead of printed (``verbose=True`` prints it
too), and the buffer sizes it reports are parsed into :class:`BufferReport`.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localllm.errors import ContextOverflow, InvalidArgument, ModelLoadError
from localllm.memory import is_quantized

__all__ = [
    "KV_CACHE_TYPES",
    "BufferReport",
    "ChatMessage",
    "GenerationStats",
    "LoadedModel",
    "RopeParams",
    "RuntimeOptions",
    "SamplingOptions",
    "TextChunk",
    "check_v_cache_attention",
    "default_threads",
    "llama_cpp_version",
    "load_model",
]

# KV cache element types llama.cpp accepts for type_k / type_v, with their ggml ids.
KV_CACHE_TYPES: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "iq4_nl": 20,
    "bf16": 30,
}
ROPE_SCALING_TYPES = {"none": 0, "linear": 1, "yarn": 2}


@dataclass(frozen=True)
class RopeParams:
    """RoPE settings handed to llama.cpp; zeros mean "what the GGUF says"."""

    scaling: str | None = None  # none | linear | yarn; None keeps the model's own
    freq_base: float = 0.0
    freq_scale: float = 0.0
    yarn_orig_ctx: int = 0
    yarn_ext_factor: float = -1.0
    yarn_attn_factor: float = 1.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0


@dataclass(frozen=True)
class RuntimeOptions:
    """How to load a model: the few llama.cpp settings localllm exposes."""

    n_ctx: int = 4096
    n_threads: int | None = None  # None: default_threads(), physical cores as llama.cpp
    n_threads_batch: int | None = None
    n_batch: int = 512
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True  # llama.cpp's "auto" resolves to on for CPU and Metal
    n_gpu_layers: int = -1  # all layers where the build has a GPU backend
    seed: int = 0xFFFFFFFF  # llama.cpp's "random"
    rope: RopeParams = field(default_factory=RopeParams)
    logits_all: bool = False
    verbose: bool = False

    def validate(self) -> None:
        if self.n_ctx <= 0:
            raise InvalidArgument(f"context size {self.n_ctx} must be a positive token count")
        for name in ("n_batch", "n_ubatch"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name} {getattr(self, name)} must be positive")
        if self.n_threads is not None and self.n_threads <= 0:
            raise InvalidArgument(f"threads {self.n_threads} must be at least 1")
        for name in ("type_k", "type_v"):
            value = getattr(self, name)
            if value not in KV_CACHE_TYPES:
                raise InvalidArgument(
                    f"unknown KV cache type {value!r}; use one of {', '.join(KV_CACHE_TYPES)}"
                )
        check_v_cache_attention(self.type_v, self.flash_attn)
        if self.rope.scaling is not None and self.rope.scaling not in ROPE_SCALING_TYPES:
            raise InvalidArgument(
                f"unknown RoPE scaling {self.rope.scaling!r}; use none, linear or yarn"
            )


def check_v_cache_attention(type_v: str, flash_attn: bool) -> None:
    """llama.cpp cannot create a context with a quantized V cache and no flash attention."""
    if is_quantized(type_v) and not flash_attn:
        raise InvalidArgument(
            f"a quantized V cache ({type_v}) needs flash attention; "
            "drop --flash-attn off or keep the V cache in f16"
        )


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int | None = 512
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise InvalidArgument(f"temperature {self.temperature} must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top-p {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidArgument(f"top-k {self.top_k} must be >= 0 (0 disables it)")
        if self.repeat_penalty <= 0:
            raise InvalidArgument(f"repeat penalty {self.repeat_penalty} must be > 0")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise InvalidArgument(f"max tokens {self.max_tokens} must be positive")


@dataclass(frozen=True)
class BufferReport:
    """Buffer sizes as llama.cpp logged them at load (MiB with 2 decimals, as bytes)."""

    weights_bytes: int | None
    kv_bytes: int | None
    k_bytes: int | None
    v_bytes: int | None
    compute_bytes: int | None
    output_bytes: int | None
    kv_cells: int | None
    flash_attn: bool | None


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class TextChunk:
    """A piece of streamed reply text."""

    text: str


@dataclass(frozen=True)
class GenerationStats:
    """The last record of a stream: what was generated, why it stopped, how fast."""

    text: str
    finish_reason: str  # stop | length | interrupted
    prompt_tokens: int  # tokens of the whole formatted prompt
    prompt_evaluated: int  # of those, evaluated this turn (the rest reused from the KV cache)
    generated_tokens: int
    prompt_seconds: float
    generation_seconds: float
    ttft_seconds: float
    kv_used: int
    kv_cells: int
    stream_seconds: float = 0.0  # wall time from the first to the last streamed chunk

    @property
    def prompt_tps(self) -> float:
        return self.prompt_evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        if self.generation_seconds <= 0:
            return 0.0
        return self.generated_tokens / self.generation_seconds


# ------------------------------------------------------------------------ llama.cpp log

_MIB = 1024 * 1024
# ggml_log_level (ggml.h): 1 debug, 2 info, 3 warn, 4 error, 5 continues the last line.
_LOG_KEEP_LEVELS = {2, 3, 4}  # debug lines (thousands per load) are dropped
_log_lock = threading.Lock()
_log_lines: list[str] = []
_log_dropped = 0  # lines trimmed off the front, so marks stay valid after a trim
_log_partial: list[str] = []
_log_echo = False
_log_callback: Any = None  # the ctypes callback must stay referenced while installed
_last_level = 2


def import_llama_cpp() -> Any:
    """Import llama_cpp (and load its shared library) on first need, as a domain error."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelLoadError(
            f"llama-cpp-python is not importable ({exc}); run `make setup`"
        ) from None
    return llama_cpp


def _install_log_capture() -> None:
    global _log_callback
    if _log_callback is not None:
        return
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, _user: Any) -> None:
        global _last_level, _log_dropped
        if level != 5:  # 5 continues the previous message at its level
            _last_level = level
        if _last_level not in _LOG_KEEP_LEVELS:
            return
        piece = text.decode("utf-8", errors="replace")
        with _log_lock:
            _log_partial.append(piece)
            if piece.endswith("\n"):
                line = "".join(_log_partial)
                _log_partial.clear()
                _log_lines.append(line.rstrip("\n"))
                if len(_log_lines) > 5000:
                    del _log_lines[:1000]
                    _log_dropped += 1000
        if _log_echo:
            os.write(2, text)

    _log_callback = capture
    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))


def _log_mark() -> int:
    with _log_lock:
        return _log_dropped + len(_log_lines)


def _log_since(mark: int) -> list[str]:
    with _log_lock:
        return list(_log_lines[max(mark - _log_dropped, 0) :])


def _mib(text: str) -> int:
    return round(float(text) * _MIB)


def parse_buffer_report(lines: Sequence[str]) -> BufferReport:
    """Pick the buffer sizes out of llama.cpp's load log (summed over devices)."""
    weights = kv = k = v = compute = output = cells = None
    flash = None

    def add(total: int | None, value: int) -> int:
        return value if total is None else total + value

    for line in lines:
        if m := re.search(r"model buffer size\s*=\s*([\d.]+) MiB", line):
            weights = add(weights, _mib(m[1]))
        elif m := re.search(r"KV buffer size\s*=\s*([\d.]+) MiB", line):
            kv = add(kv, _mib(m[1]))
        elif m := re.search(r"compute buffer size\s*=\s*([\d.]+) MiB", line):
            compute = add(compute, _mib(m[1]))
        elif m := re.search(r"output buffer size\s*=\s*([\d.]+) MiB", line):
            output = add(output, _mib(m[1]))
        if m := re.search(
            r"\(\s*(\d+) cells,.*K \(\w+\):\s*([\d.]+) MiB, V \(\w+\):\s*([\d.]+)", line
        ):
            cells = int(m[1])
            k, v = add(k, _mib(m[2])), add(v, _mib(m[3]))
        if m := re.search(r"flash_attn\s*=\s*(\w+)", line):
            flash = m[1] in ("enabled", "1", "true")
    return BufferReport(weights, kv, k, v, compute, output, cells, flash)


def default_threads() -> int:
    """Physical cores, one per sibling set: llama.cpp's own default (cpu_get_num_math).

    llama-cpp-python would otherwise generate on cpu_count // 2 threads, half of what
    llama-cli and llama-bench use.
    """
    siblings = set()
    cpu = 0
    while True:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings")
        try:
            siblings.add(path.read_text().strip())
        except OSError:
            break
        cpu += 1
    return len(siblings) if siblings else (os.cpu_count() or 1)


def llama_cpp_version() -> str:
    """llama-cpp-python's version, read without importing (and loading) the library."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return "not installed"


# ------------------------------------------------------------------------------ models


class LoadedModel:
    """A model with its context, kept loaded for a whole session.

    Keeping one ``Llama`` alive is what lets llama-cpp-python reuse the KV prefix of
    the previous chat turn; callers should load once and stream many times.
    """

    def __init__(self, llama: Any, path: Path, options: RuntimeOptions, log: list[str]):
        self.llama = llama
        self.path = path
        self.options = options
        self.load_log = log
        self.buffers = parse_buffer_report(log)

    # -- facts
    @property
    def n_ctx(self) -> int:
        return int(self.llama.n_ctx())

    @property
    def kv_used(self) -> int:
        """Cells of the KV cache that hold tokens of the current conversation."""
        return int(self.llama.n_tokens)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return list(self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llama.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def format_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text the model's own chat template makes of ``messages``.

        Built the way llama-cpp-python builds its handler for the GGUF template, so
        the count matches what ``chat_stream`` will evaluate.
        """
        from llama_cpp import llama_chat_format

        template = self.llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelLoadError(f"{self.path.name} has no chat template in its GGUF")
        model = self.llama._model
        eos, bos = self.llama.token_eos(), self.llama.token_bos()
        formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )
        result = formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
        return str(result.prompt)

    def count_chat_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return len(self.tokenize(self.format_chat(messages), add_bos=False, special=True))

    # -- generation
    def chat_stream(
        self,
        messages: Sequence[ChatMessage],
        sampling: SamplingOptions,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[TextChunk | GenerationStats]:
        """Stream a reply with the model's chat template; the last item is the stats.

        ``stop`` is polled after each chunk: when it returns true the reply ends there
        (finish reason "interrupted") with the KV cache consistent for the next turn.
        """
        sampling.validate()
        import llama_cpp

        ctx = self.llama._ctx.ctx
        llama_cpp.llama_perf_context_reset(ctx)
        if sampling.seed is not None:
            self.llama.set_seed(sampling.seed)
        start = time.perf_counter()
        first: float | None = None
        last: float | None = None
        pieces: list[str] = []
        finish = "interrupted"
        stream: Any = None
        try:
            stream = self.llama.create_chat_completion(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                stream=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                min_p=sampling.min_p,
                repeat_penalty=sampling.repeat_penalty,
                max_tokens=sampling.max_tokens,
                seed=sampling.seed,
            )
            for chunk in stream:
                choice = chunk["choices"][0]
                text = choice.get("delta", {}).get("content")
                if text:
                    last = time.perf_counter()
                    if first is None:
                        first = last
                    pieces.append(text)
                    yield TextChunk(text)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                elif stop is not None and stop():
                    break
        except ValueError as exc:
            # llama-cpp-python raises ValueError when the prompt exceeds the context.
            raise ContextOverflow(str(exc)) from None
        finally:
            if stream is not None:
                # Finish llama-cpp-python's generator now, not at garbage collection
                # in the middle of a later turn.
                stream.close()
        perf = llama_cpp.llama_perf_context(ctx)
        end = time.perf_counter()
        generated = int(perf.n_eval)
        # One sampled token is evaluated per step; the last sampled token is not.
        yield GenerationStats(
            text="".join(pieces),
            finish_reason=finish,
            prompt_tokens=max(self.kv_used - generated, 0),
            prompt_evaluated=int(perf.n_p_eval),
            generated_tokens=generated + (1 if pieces else 0),
            prompt_seconds=perf.t_p_eval_ms / 1000.0,
            generation_seconds=perf.t_eval_ms / 1000.0,
            ttft_seconds=(first or end) - start,
            kv_used=self.kv_used,
            kv_cells=self.n_ctx,
            stream_seconds=(last - first) if first is not None and last is not None else 0.0,
        )

    def reset(self) -> None:
        """Forget the conversation held in the KV cache."""
        self.llama.reset()
        self.llama._ctx.kv_cache_clear()

    def close(self) -> None:
        self.llama.close()


def load_model(path: str | os.PathLike[str], options: RuntimeOptions) -> LoadedModel:
    """Load a GGUF through llama.cpp with ``options``; failures become ModelLoadError."""
    global _log_echo
    options.validate()
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no such model file: {path}")
    llama_cpp = import_llama_cpp()
    _install_log_capture()
    _log_echo = options.verbose
    mark = _log_mark()
    rope = options.rope
    try:
        llama = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=options.n_ctx,
            n_batch=options.n_batch,
            n_ubatch=options.n_ubatch,
            n_threads=options.n_threads or default_threads(),
            n_threads_batch=options.n_threads_batch or options.n_threads or default_threads(),
            n_gpu_layers=options.n_gpu_layers,
            seed=options.seed,
            type_k=KV_CACHE_TYPES[options.type_k],
            type_v=KV_CACHE_TYPES[options.type_v],
            flash_attn=options.flash_attn,
            rope_scaling_type=(
                ROPE_SCALING_TYPES[rope.scaling]
                if rope.scaling is not None
                else llama_cpp.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED
            ),
            rope_freq_base=rope.freq_base,
            rope_freq_scale=rope.freq_scale,
            yarn_orig_ctx=rope.yarn_orig_ctx,
            yarn_ext_factor=rope.yarn_ext_factor,
            yarn_attn_factor=rope.yarn_attn_factor,
            yarn_beta_fast=rope.yarn_beta_fast,
            yarn_beta_slow=rope.yarn_beta_slow,
            logits_all=options.logits_all,
            verbose=options.verbose,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        errors = [line for line in _log_since(mark) if "error" in line.lower()]
        reason = errors[-1].strip() if errors else str(exc)
        raise ModelLoadError(f"llama.cpp could not load {path.name}: {reason}") from None
    return LoadedModel(llama, path, options, _log_since(mark))
