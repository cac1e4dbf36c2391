"""llama-bench's timing loops, run through llama.cpp's C API with nothing lost to Python.

This mirrors ``tools/llama-bench/llama-bench.cpp`` of the llama.cpp build we run:

- the model is loaded with ``llama_model_default_params()`` and kept for every test;
- each test gets a fresh context: ``n_ctx = n_prompt + n_gen + n_depth`` unless asked,
  llama.cpp's default context params otherwise (flash attention ``auto``), and a ggml
  threadpool of ``n_threads`` (``ggml_threadpool_params_default``) attached to it;
- a prompt is decoded in ``n_batch`` chunks of random tokens (the first one BOS when
  the vocabulary adds it), only the last token of a chunk producing logits; then one
  ``llama_synchronize``;
- generation decodes one token at a time and synchronizes after each, no sampling;
- each repetition starts from a cleared KV cache (a prefilled ``depth`` restored from
  a saved sequence state), and the clock covers prompt plus generation.

What Python adds sits outside the clock: the random tokens and the ``llama_batch``
views over them are built before ``t0``, so the timed loop is one ctypes call per
decode and one per synchronize.
"""

from __future__ import annotations

import ctypes
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localllm.errors import LocalLLMError, ModelLoadError
from localllm.runtime.library import import_llama_cpp
from localllm.runtime.log import (
    BufferReport,
    debug_lines,
    install_log_capture,
    load_model_file,
    log_mark,
    log_since,
    parse_buffer_report,
)
from localllm.runtime.params import (
    FLASH_ATTN_TYPES,
    RopeParams,
    context_fields,
    rope_fields,
)

__all__ = ["BenchContext", "BenchModel", "ContextConfig", "DecodeFailed"]


class DecodeFailed(LocalLLMError):
    """llama.cpp returned an error while a benchmark was decoding."""


@dataclass(frozen=True)
class ContextConfig:
    """The context settings of one benchmark test (llama-bench's cparams)."""

    n_ctx: int
    n_batch: int = 2048
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "auto"  # auto | on | off
    n_threads: int = 1
    rope: RopeParams = field(default_factory=RopeParams)
    swa_full: bool = False  # llama-bench's cparams.swa_full: the SWA cache sized to the window


def _flash_attn_resolved(lines: Sequence[str], requested: str) -> bool | None:
    """Whether flash attention ended up on: llama.cpp logs how it resolved ``auto``."""
    if requested != "auto":
        return requested == "on"
    for line in lines:
        if "Flash Attention" in line or "flash_attn since" in line:
            if re.search(r"Flash Attention (was auto, set to )?enabled|enabling flash_attn", line):
                return True
            if re.search(r"Flash Attention.*(disabled|not supported)", line):
                return False
    return None


class _ThreadpoolParams(ctypes.Structure):
    """struct ggml_threadpool_params (ggml.h)."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * 512),  # GGML_MAX_N_THREADS
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


class _Threadpool:
    """llama-bench's threadpool: ggml_threadpool_params_default(n_threads), attached to the
    context. llama-cpp-python has no binding for it, so the C functions are bound here;
    without one llama.cpp makes a throwaway pool per graph (threads and all, on builds
    without OpenMP)."""

    def __init__(self, lc: Any, ctx: Any, n_threads: int) -> None:
        from llama_cpp import _ggml
        from llama_cpp._ctypes_extensions import load_shared_library

        base = _ggml.libggml
        cpu = load_shared_library("ggml-cpu", Path(lc.__file__).parent / "lib")
        base.ggml_threadpool_params_init.argtypes = [
            ctypes.POINTER(_ThreadpoolParams),
            ctypes.c_int,
        ]
        base.ggml_threadpool_params_init.restype = None
        cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(_ThreadpoolParams)]
        cpu.ggml_threadpool_new.restype = ctypes.c_void_p
        cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
        cpu.ggml_threadpool_free.restype = None
        attach = lc.llama_cpp._lib.llama_attach_threadpool
        attach.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        attach.restype = None
        params = _ThreadpoolParams()
        base.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
        self._free = cpu.ggml_threadpool_free
        self.pool = cpu.ggml_threadpool_new(ctypes.byref(params))
        if not self.pool:
            raise ModelLoadError(f"llama.cpp could not create a pool of {n_threads} threads")
        attach(ctx, self.pool, None)

    def free(self) -> None:
        if self.pool:
            self._free(self.pool)
            self.pool = None


def _token_ptr(tokens: Any, index: int) -> Any:
    """A llama_token* to ``tokens[index]`` (the array must outlive the batch using it)."""
    return ctypes.cast(ctypes.addressof(tokens) + 4 * index, ctypes.POINTER(ctypes.c_int32))


class BenchModel:
    """A model loaded the way llama-bench loads it, shared by every test's context."""

    def __init__(
        self,
        path: str | Path,
        repack: bool = True,
        *,
        rpc: Sequence[str] = (),
        n_gpu_layers: int = -1,
        tensor_split: Sequence[float] = (),
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"no such model file: {self.path}")
        llama_cpp = import_llama_cpp()
        self._lc: Any = llama_cpp
        install_log_capture()
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = repack  # llama-bench's --repack
        params.n_gpu_layers = n_gpu_layers
        self.repack = repack
        self.placement: tuple[Any, ...] = ()  # with rpc: rpc_plan.DeviceShare per device
        if rpc:
            self._load_split(params, rpc, tensor_split)
        else:
            self.model, self.load_log = load_model_file(llama_cpp, self.path, params)
        self.weights_bytes = parse_buffer_report(self.load_log).weights_bytes
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, buf, len(buf))
        self.desc = buf.value.decode(errors="replace")
        self.size_bytes = int(llama_cpp.llama_model_size(self.model))
        self.n_params = int(llama_cpp.llama_model_n_params(self.model))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self.model))
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(vocab))

    def _load_split(self, params: Any, rpc: Sequence[str], tensor_split: Sequence[float]) -> None:
        """Load onto the RPC servers' devices, then this machine's GPUs (as llama-bench
        --rpc) and note the split."""
        from localllm.runtime.devices import local_gpus
        from localllm.runtime.rpc_devices import add_rpc_servers, attach_devices
        from localllm.runtime.rpc_plan import parse_placement

        devices, gpus = add_rpc_servers(rpc), local_gpus()
        arrays = attach_devices(params, [*devices, *gpus], tensor_split)
        with debug_lines() as lines:
            self.model, self.load_log = load_model_file(self._lc, self.path, params)
        self.placement = parse_placement(lines, devices, [g.name for g in gpus])
        del arrays  # llama.cpp has copied them

    def new_context(self, config: ContextConfig) -> BenchContext:
        return BenchContext(self, config)

    def close(self) -> None:
        if self.model:
            self._lc.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> BenchModel:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class BenchContext:
    """One llama_context for one test, with llama-bench's prompt and generation loops."""

    def __init__(self, model: BenchModel, config: ContextConfig) -> None:
        lc = model._lc
        self._lc = lc
        self.model = model
        self.config = config
        params = lc.llama_context_default_params()
        params.n_ctx = config.n_ctx
        params.n_batch = config.n_batch
        params.n_ubatch = config.n_ubatch
        params.flash_attn_type = FLASH_ATTN_TYPES[config.flash_attn]
        params.swa_full = config.swa_full
        params.n_threads = config.n_threads
        params.n_threads_batch = config.n_threads
        fields = context_fields(config.type_k, config.type_v)
        if config.rope != RopeParams():  # untouched: llama.cpp's own defaults (as llama-bench)
            fields.update(rope_fields(config.rope))
        for name, value in fields.items():
            setattr(params, name, value)
        mark = log_mark()
        self.ctx = lc.llama_init_from_model(model.model, params)
        self.log = log_since(mark)
        if not self.ctx:
            errors = [
                line.strip() for line in self.log if "error" in line.lower() or "fail" in line
            ]
            reason = errors[-1] if errors else "context creation failed"
            raise ModelLoadError(f"llama.cpp could not create the benchmark context: {reason}")
        self._threadpool: _Threadpool | None = None
        try:
            self._threadpool = _Threadpool(lc, self.ctx, config.n_threads)
        except (OSError, AttributeError, RuntimeError):
            pass  # a build without these symbols: llama.cpp makes its own pools
        except ModelLoadError:
            self.close()
            raise
        self.buffers: BufferReport = parse_buffer_report(self.log)
        self.flash_attn_used = _flash_attn_resolved(self.log, config.flash_attn)
        self.n_ctx = int(lc.llama_n_ctx(self.ctx))
        self._memory = lc.llama_get_memory(self.ctx)
        self._depth_state: tuple[int, Any] | None = None
        self._rng = random.Random(1)  # llama-bench's std::rand is unseeded: seed 1

    # -- token blocks, built outside the clock
    def _random_tokens(self, n: int, first_bos: bool) -> Any:
        tokens = (ctypes.c_int32 * max(n, 1))()
        randrange, n_vocab = self._rng.randrange, self.model.n_vocab
        for i in range(n):
            tokens[i] = randrange(n_vocab)
        if n and first_bos and self.model.add_bos:
            tokens[0] = self.model.bos
        return tokens

    def _prompt_batches(self, n_prompt: int) -> tuple[Any, list[Any]]:
        """test_prompt's chunks: n_batch tokens each, BOS first, the last token's logits only."""
        n_batch = self.config.n_batch
        tokens = self._random_tokens(n_prompt, first_bos=True)
        get_one = self._lc.llama_batch_get_one
        # llama_batch_get_one: positions follow the KV cache, logits for the last token only.
        batches = [
            get_one(_token_ptr(tokens, start), min(n_prompt - start, n_batch))
            for start in range(0, n_prompt, n_batch)
        ]
        return tokens, batches

    def _gen_batches(self, n_gen: int) -> tuple[Any, list[Any]]:
        """test_gen's tokens: BOS (when the vocabulary adds it), then random ones, one a step."""
        tokens = self._random_tokens(n_gen, first_bos=True)
        get_one = self._lc.llama_batch_get_one
        return tokens, [get_one(_token_ptr(tokens, i), 1) for i in range(n_gen)]

    # -- the loops
    def _decode_prompt(self, batches: Sequence[Any]) -> None:
        decode, ctx = self._lc.llama_decode, self.ctx
        for batch in batches:
            if decode(ctx, batch) != 0:
                raise DecodeFailed("llama.cpp failed to decode a prompt batch")
        self._lc.llama_synchronize(ctx)

    def _decode_gen(self, batches: Sequence[Any]) -> None:
        decode, sync, ctx = self._lc.llama_decode, self._lc.llama_synchronize, self.ctx
        for batch in batches:
            if decode(ctx, batch) != 0:
                raise DecodeFailed("llama.cpp failed to decode a generation step")
            sync(ctx)

    def set_threads(self, n_threads: int) -> None:
        self._lc.llama_set_n_threads(self.ctx, n_threads, n_threads)

    def clear(self) -> None:
        """llama_memory_clear(mem, false): forget the sequence, keep the buffers."""
        self._lc.llama_memory_clear(self._memory, False)

    def warmup(self, n_prompt: int, n_gen: int) -> None:
        """llama-bench's warm-up: the whole prompt once, then one generated token."""
        self.set_threads(self.config.n_threads)
        if n_prompt > 0:
            _, batches = self._prompt_batches(n_prompt)
            self._decode_prompt(batches)
        if n_gen > 0:
            _, batches = self._gen_batches(1)
            self._decode_gen(batches)

    def prefill_depth(self, n_depth: int) -> None:
        """Put ``n_depth`` tokens in the cleared cache (saved once, restored after)."""
        lc, ctx = self._lc, self.ctx
        if self._depth_state is not None and self._depth_state[0] == n_depth:
            state = self._depth_state[1]
            if lc.llama_state_seq_set_data(ctx, state, len(state), 0) != 0:
                return
            self.clear()  # an incompatible state: recompute it, as llama-bench does
        self.set_threads(self.config.n_threads)
        _, batches = self._prompt_batches(n_depth)
        self._decode_prompt(batches)
        size = int(lc.llama_state_seq_get_size(ctx, 0))
        state = (ctypes.c_uint8 * size)()
        lc.llama_state_seq_get_data(ctx, state, size, 0)
        self._depth_state = (n_depth, state)

    def timed_run(self, n_prompt: int, n_gen: int) -> int:
        """One repetition: nanoseconds for prompt plus generation, as llama-bench times it."""
        prompt_keep, prompt = self._prompt_batches(n_prompt) if n_prompt > 0 else (None, [])
        gen_keep, gen = self._gen_batches(n_gen) if n_gen > 0 else (None, [])
        self.set_threads(self.config.n_threads)
        start = time.perf_counter_ns()
        if prompt:
            self._decode_prompt(prompt)
        if gen:
            self._decode_gen(gen)
        elapsed = time.perf_counter_ns() - start
        del prompt_keep, gen_keep  # the token arrays the batches point into lived until here
        return elapsed

    def close(self) -> None:
        if self.ctx:
            self._lc.llama_free(self.ctx)
            self.ctx = None
        if self._threadpool is not None:
            self._threadpool.free()  # after the context, as llama-bench frees them

    def __enter__(self) -> BenchContext:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
