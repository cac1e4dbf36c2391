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

from localllm.runtime.library import llama_cpp_version
from localllm.runtime.llama import LoadedModel, load_model
from localllm.runtime.params import LoadOptions, RopeParams, SamplingOptions

__all__ = [
    "LoadOptions",
    "LoadedModel",
    "RopeParams",
    "SamplingOptions",
    "llama_cpp_version",
    "load_model",
]
