"""Test helper: llama-cpp-python's own chat formatting, the independent reference for chat.

localllm renders chat templates with its guarded renderer and streams a completion; these
helpers do what llama-cpp-python's create_chat_completion does with a GGUF's template
(its Jinja2ChatFormatter and chat handler), so tests can hold one against the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from localllm.generation import ChatMessage
from localllm.runtime import LoadedModel, SamplingOptions


def _formatter(model: LoadedModel) -> Any:
    from llama_cpp import llama_chat_format

    return llama_chat_format.Jinja2ChatFormatter(
        template=model.llama.metadata["tokenizer.chat_template"],
        eos_token=model.eos_text,
        bos_token=model.bos_text,
        stop_token_ids=[model.llama.token_eos()],
    )


def _json(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def reference_prompt(model: LoadedModel, messages: Sequence[ChatMessage]) -> str:
    return str(_formatter(model)(messages=_json(messages)).prompt)


def reference_prompt_tokens(model: LoadedModel, messages: Sequence[ChatMessage]) -> list[int]:
    """The tokens llama-cpp-python's chat handler evaluates for ``messages``."""
    prompt = reference_prompt(model, messages)
    return model.tokenize(prompt, add_bos=False, special=True)


def reference_reply(
    model: LoadedModel, messages: Sequence[ChatMessage], sampling: SamplingOptions
) -> str:
    """llama-cpp-python's chat completion with the GGUF template (its own handler)."""
    handler = _formatter(model).to_chat_handler()
    if sampling.seed is not None:
        model.llama.set_seed(sampling.seed)
    out = handler(
        llama=model.llama,
        messages=_json(messages),
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        repeat_penalty=sampling.repeat_penalty,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
    )
    return str(out["choices"][0]["message"]["content"])
