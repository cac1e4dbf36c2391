"""The few llama.cpp settings localllm exposes, checked, and their one mapping onto llama.cpp.

Cheap to import (no llama_cpp): the CLI and the core build these options before any load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from localllm.errors import InvalidArgument
from localllm.gguf.ggml_types import (
    KV_CACHE_TYPES,
    check_kv_type,
    ggml_type_id,
    kv_type_is_quantized,
)
from localllm.machine import physical_cores

__all__ = [
    "FLASH_ATTN_TYPES",
    "KV_CACHE_TYPE_IDS",
    "ROPE_SCALING_TYPES",
    "LoadOptions",
    "RopeParams",
    "SamplingOptions",
    "check_v_cache_attention",
    "context_fields",
    "rope_fields",
]

# KV cache element types llama.cpp accepts for type_k / type_v, with their ggml ids.
KV_CACHE_TYPE_IDS: dict[str, int] = {name: ggml_type_id(name) for name in KV_CACHE_TYPES}
# llama-bench's -fa values and the llama_flash_attn_type each one records (llama.h).
FLASH_ATTN_TYPES: dict[str, int] = {"auto": -1, "off": 0, "on": 1}
# enum llama_rope_scaling_type (llama.h)
ROPE_SCALING_TYPES = {"none": 0, "linear": 1, "yarn": 2}
_ROPE_SCALING_UNSPECIFIED = -1


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


def check_v_cache_attention(type_v: str, flash_attn: bool) -> None:
    """llama.cpp cannot create a context with a quantized V cache and no flash attention."""
    if kv_type_is_quantized(type_v) and not flash_attn:
        raise InvalidArgument(
            f"a quantized V cache ({type_v}) needs flash attention; "
            "drop --flash-attn off or keep the V cache in f16"
        )


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model and create its context: the llama.cpp settings localllm exposes."""

    n_ctx: int = 4096
    n_threads: int | None = None  # None: physical cores, as llama.cpp
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
    repack: bool | None = None  # None: llama.cpp's default, except off on AMX CPUs
    rpc: tuple[str, ...] = ()  # llama.cpp RPC servers (host:port) whose devices take layers
    tensor_split: tuple[float, ...] = ()  # the RPC devices' shares of the layers (llama.cpp's)
    swa_full: bool = False  # False: the sliding-window cache holds the window (llama.cpp's tools)

    def validate(self) -> None:
        if self.n_ctx <= 0:
            raise InvalidArgument(f"context size {self.n_ctx} must be a positive token count")
        for name in ("n_batch", "n_ubatch"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name} {getattr(self, name)} must be positive")
        if self.n_threads is not None and self.n_threads <= 0:
            raise InvalidArgument(f"threads {self.n_threads} must be at least 1")
        check_kv_type(self.type_k)
        check_kv_type(self.type_v)
        check_v_cache_attention(self.type_v, self.flash_attn)
        if self.rope.scaling is not None and self.rope.scaling not in ROPE_SCALING_TYPES:
            raise InvalidArgument(
                f"unknown RoPE scaling {self.rope.scaling!r}; use none, linear or yarn"
            )

    @property
    def threads(self) -> int:
        return self.n_threads or physical_cores()

    @property
    def threads_batch(self) -> int:
        return self.n_threads_batch or self.threads


def rope_fields(rope: RopeParams) -> dict[str, Any]:
    """``llama_context_params`` fields (also ``Llama()`` keywords) for a RoPE setting."""
    return {
        "rope_scaling_type": (
            ROPE_SCALING_TYPES[rope.scaling]
            if rope.scaling is not None
            else _ROPE_SCALING_UNSPECIFIED
        ),
        "rope_freq_base": rope.freq_base,
        "rope_freq_scale": rope.freq_scale,
        "yarn_orig_ctx": rope.yarn_orig_ctx,
        "yarn_ext_factor": rope.yarn_ext_factor,
        "yarn_attn_factor": rope.yarn_attn_factor,
        "yarn_beta_fast": rope.yarn_beta_fast,
        "yarn_beta_slow": rope.yarn_beta_slow,
    }


def context_fields(type_k: str, type_v: str) -> dict[str, Any]:
    """``llama_context_params`` fields (also ``Llama()`` keywords) for the KV cache types."""
    return {"type_k": KV_CACHE_TYPE_IDS[type_k], "type_v": KV_CACHE_TYPE_IDS[type_v]}


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
