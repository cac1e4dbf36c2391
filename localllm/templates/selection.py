"""Which chat template a model is spoken to with, and the prompt it makes.

The template comes from, in this order (the first that applies wins):

1. ``--template NAME|FILE``: a name localllm ships (:data:`PUBLISHED`) or llama.cpp knows
   (``llama2``, ``mistral-v1``, ``chatml``, ``llama3``, ...), or a Jinja file;
2. the GGUF's own ``tokenizer.chat_template``;
3. the template the catalog names for the model (``template = "llama-2-chat"``);
4. localllm's recognition rules for files without a template (:func:`recognize`), from
   ``general.name``/``general.basename``, the file name and the architecture;
5. otherwise no template: an error naming ``--template`` and ``--raw``.

Jinja templates (GGUF, file, published) go through the one guarded renderer; llama.cpp's
built-in names are rendered by llama.cpp itself (``llama_chat_apply_template``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from localllm.errors import InvalidArgument, TemplateError
from localllm.gguf.spec import ModelSpec
from localllm.templates.caps import validate
from localllm.templates.sandbox import GuardedTemplate
from localllm.text import escape_untrusted

__all__ = [
    "PUBLISHED",
    "ChatFormat",
    "choose_format",
    "published_template",
    "raw_format",
    "recognize",
    "template_names",
]

_PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
# Formats localllm ships as Jinja because no llama.cpp built-in reproduces the family's
# published format token for token (llama2-sys-bos drops the spaces around the answer).
PUBLISHED = {
    "llama-2-chat": "Meta's Llama-2-Chat: <s>[INST] <<SYS>>...<</SYS>> ... [/INST] ... </s>",
    "mistral-instruct": "Mistral AI's Instruct v0.1/v0.2: <s>[INST] ... [/INST]...</s>",
}
# Strings that end a reply, per llama.cpp built-in (end-of-generation tokens stop it too).
_BUILTIN_STOPS = {
    "chatml": ("<|im_end|>",),
    "llama3": ("<|eot_id|>",),
    "gemma": ("<end_of_turn>",),
    "phi3": ("<|end|>",),
    "zephyr": ("</s>", "<|endoftext|>"),
}
FILE_HINT = "pass --template NAME (localllm chat --template list) or --raw"


@dataclass(frozen=True)
class ChatFormat:
    """A chosen chat template: what renders prompts, and where it came from."""

    name: str  # "gguf", a published or llama.cpp name, a file path, or "raw"
    source: str  # --template | gguf | catalog | recognized | --raw
    kind: str  # jinja | builtin | raw
    template: GuardedTemplate | None = field(default=None, repr=False)
    stop_strings: tuple[str, ...] = ()

    @property
    def add_bos(self) -> bool:
        """Whether tokenizing the prompt adds BOS: Jinja templates write their own."""
        return self.kind != "jinja"

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        bos_token: str,
        eos_token: str,
        add_generation_prompt: bool = True,
    ) -> str:
        if self.kind == "raw":
            return _raw_text(messages)
        if self.kind == "builtin":
            from localllm.runtime.chat_templates import apply_builtin_template

            return apply_builtin_template(self.name, messages, add_generation_prompt)
        assert self.template is not None
        return self.template.render(
            messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )

    def validate(self, *, bos_token: str, eos_token: str) -> None:
        """Render a sample conversation once: a broken template fails at load, not mid-chat."""
        if self.template is not None:
            validate(self.template, bos_token=bos_token, eos_token=eos_token)

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "source": self.source}

    def describe(self) -> str:
        what = "the GGUF's own" if self.source == "gguf" else escape_untrusted(self.name, 80)
        return f"{what} ({self.source})"


def _raw_text(messages: Sequence[Mapping[str, str]]) -> str:
    """--raw: the text so far; a line typed after the model's text starts a new line."""
    text = ""
    for message in messages:
        piece = message["content"]
        if message["role"] == "user" and text and not text.endswith("\n"):
            text += "\n"
        text += piece
    return text


def raw_format() -> ChatFormat:
    return ChatFormat("raw", "--raw", "raw")


def template_names() -> list[str]:
    """Every name --template takes: localllm's published formats, then llama.cpp's."""
    from localllm.runtime.chat_templates import builtin_template_names

    return [*PUBLISHED, *builtin_template_names()]


def published_template(name: str) -> str:
    return (_PUBLISHED_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def _named(name: str, source: str) -> ChatFormat:
    """A published or llama.cpp template called ``name``."""
    if name in PUBLISHED:
        template = GuardedTemplate.compile(published_template(name), f"template {name}")
        return ChatFormat(name, source, "jinja", template)
    from localllm.runtime.chat_templates import builtin_template_names

    if name in builtin_template_names():
        return ChatFormat(name, source, "builtin", stop_strings=_BUILTIN_STOPS.get(name, ()))
    raise TemplateError(
        f"unknown chat template {escape_untrusted(name, 60)!r}; "
        f"use one of {', '.join(template_names())}, or a Jinja file"
    )


def _from_argument(value: str) -> ChatFormat:
    """--template NAME or FILE (a path: it exists, or it has a separator or .jinja)."""
    path = Path(value).expanduser()
    if path.is_file() or "/" in value or value.endswith((".jinja", ".j2", ".txt")):
        if not path.is_file():
            raise InvalidArgument(f"--template {value!r}: no such file; give a Jinja file or NAME")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"--template {value!r} cannot be read: {exc}") from None
        label = f"template file {escape_untrusted(path.name, 60)}"
        # The absolute path: a saved session resumed from another directory finds it again.
        template = GuardedTemplate.compile(text, label)
        return ChatFormat(str(path.resolve()), "--template", "jinja", template)
    return _named(value, "--template")


# Recognition rules for GGUFs without a template, first match wins: (architectures or
# None for any, words that must all appear in general.name / general.basename / file
# name, the template). Never a guess for a file none of them describes.
_RULES: tuple[tuple[tuple[str, ...] | None, tuple[tuple[str, ...], ...], str], ...] = (
    (("llama",), (("llama-2", "llama2", "llama 2"), ("chat",)), "llama-2-chat"),
    (("llama",), (("mistral",), ("instruct",)), "mistral-instruct"),
    (("llama",), (("llama-3", "llama3", "llama 3"), ("instruct",)), "llama3"),
    (None, (("zephyr",),), "zephyr"),
    (("gemma", "gemma2", "gemma3"), (("-it", " it", "instruct"),), "gemma"),
    (("phi3",), (("instruct",),), "phi3"),
)


def recognize(spec: ModelSpec, file_name: str) -> str | None:
    """The template localllm's written rules give a template-less GGUF, or None."""
    words = " ".join(x for x in (spec.name, spec.basename, file_name) if x).lower()
    for archs, required, template in _RULES:
        if archs is not None and spec.architecture not in archs:
            continue
        if all(any(w in words for w in alternatives) for alternatives in required):
            return template
    return None


def choose_format(
    spec: ModelSpec,
    file_name: str,
    *,
    template: str | None = None,
    raw: bool = False,
    catalog_template: str | None = None,
) -> ChatFormat:
    """The chat format for a model, by the order in this module's docstring."""
    if raw:
        if template is not None:
            raise InvalidArgument("--raw sends the text as it is; drop --template")
        return raw_format()
    if template is not None:
        return _from_argument(template)
    if spec.chat_template:
        label = "the GGUF's chat template (tokenizer.chat_template)"
        return ChatFormat(
            "gguf", "gguf", "jinja", GuardedTemplate.compile(spec.chat_template, label)
        )
    if catalog_template:
        return _named(catalog_template, "catalog")
    recognized = recognize(spec, file_name)
    if recognized:
        return _named(recognized, "recognized")
    raise TemplateError(
        f"{escape_untrusted(file_name, 80)} has no chat template in its GGUF and localllm's "
        f"rules do not recognize it; {FILE_HINT} for plain completion"
    )
