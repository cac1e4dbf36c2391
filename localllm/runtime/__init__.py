"""The only package that imports llama_cpp, and only when a model is loaded.

``import localllm.runtime`` is cheap; ``llama_cpp`` (and its shared library) is imported
inside the functions that load a model, so ``localllm --help`` and ``kv-calc`` never pay
for it. The modules:

- :mod:`~localllm.runtime.params`: LoadOptions, SamplingOptions, RopeParams and their one
  mapping onto llama.cpp's parameters;
- :mod:`~localllm.runtime.library`: the lazy import, build and device facts;
- :mod:`~localllm.runtime.log`: llama.cpp's log, captured, and the buffer sizes in it;
- :mod:`~localllm.runtime.llama`: a model kept loaded through ``Llama`` (chat, ppl);
- :mod:`~localllm.runtime.llama_bench`: llama-bench's timing loops on the C API;
- :mod:`~localllm.runtime.buffers`: contexts created only to read what they allocate;
- :mod:`~localllm.runtime.logits`: llama-perplexity's scoring on the batch API.
"""

from __future__ import annotations

import importlib
from typing import Any

# Where each name below lives: imported on first use (PEP 562), so that importing a
# sibling (``localllm.runtime.params`` for the flags) does not pay for ``runtime.llama``.
_EXPORTS = {
    "LoadOptions": "params",
    "LoadedModel": "llama",
    "RopeParams": "params",
    "SamplingOptions": "params",
    "llama_cpp_version": "library",
    "load_model": "llama",
}

__all__ = [
    "LoadOptions",
    "LoadedModel",
    "RopeParams",
    "SamplingOptions",
    "llama_cpp_version",
    "load_model",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
