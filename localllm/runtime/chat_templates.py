"""llama.cpp's built-in chat templates, applied by llama.cpp itself (not re-implemented).

``llama_chat_apply_template(name, ...)`` formats a conversation with one of the templates
llama.cpp knows by name (``llama2``, ``mistral-v1``, ``chatml``, ``llama3``, ...); this
module lists those names and calls it through llama-cpp-python's low-level binding.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from functools import cache

from localllm.errors import TemplateError
from localllm.runtime.library import import_llama_cpp

__all__ = ["apply_builtin_template", "builtin_template_names"]

_MAX_TEMPLATES = 256


@cache
def builtin_template_names() -> tuple[str, ...]:
    """The names llama.cpp's llama_chat_apply_template accepts, in its own order."""
    llama_cpp = import_llama_cpp()
    names = (ctypes.c_char_p * _MAX_TEMPLATES)()
    count = int(llama_cpp.llama_chat_builtin_templates(names, _MAX_TEMPLATES))
    return tuple(names[i].decode() for i in range(min(count, _MAX_TEMPLATES)))


def apply_builtin_template(
    name: str, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
) -> str:
    """The prompt llama.cpp's template ``name`` makes of ``messages``."""
    if name not in builtin_template_names():
        known = ", ".join(builtin_template_names())
        raise TemplateError(f"unknown chat template {name!r}; llama.cpp knows: {known}")
    llama_cpp = import_llama_cpp()
    # The encoded strings must outlive the call: keep them referenced here.
    encoded = [(m["role"].encode("utf-8"), m["content"].encode("utf-8")) for m in messages]
    chat = (llama_cpp.llama_chat_message * max(len(encoded), 1))()
    for i, (role, content) in enumerate(encoded):
        chat[i].role, chat[i].content = role, content
    size = 1024 + 2 * sum(len(r) + len(c) for r, c in encoded)
    for _ in range(2):  # a second try when the first buffer was too small
        buf = ctypes.create_string_buffer(size)
        n = int(
            llama_cpp.llama_chat_apply_template(
                name.encode(), chat, len(encoded), add_generation_prompt, buf, size
            )
        )
        if n < 0:
            raise TemplateError(f"llama.cpp could not apply the chat template {name!r}")
        if n <= size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n + 1
    raise TemplateError(f"llama.cpp's chat template {name!r} did not fit its buffer")
