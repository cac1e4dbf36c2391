"""What a chat template can do, found by probe-rendering it; and the load-time validation.

Like llama.cpp's ``common/jinja/caps.cpp``, each capability is probed by rendering a small
conversation that uses it. llama.cpp judges a probe by whether the template *read* the
probed value; here it is judged by whether the value *reaches the prompt* (a marker string
in the output), which is what matters to the model and needs no instrumented values. A
template that refuses a probe (``raise_exception("System role not supported")``) simply
lacks that capability: only a template that cannot render a plain conversation is broken.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localllm.errors import TemplateError
from localllm.templates.budget import RenderBudget
from localllm.templates.sandbox import DEFAULT_HINT, GuardedTemplate

__all__ = [
    "SAMPLE_CONVERSATION",
    "SAMPLE_SYSTEM",
    "TemplateCaps",
    "probe_caps",
    "template_caps",
    "validate",
]

SAMPLE_SYSTEM: Mapping[str, str] = {"role": "system", "content": "You are a helpful assistant."}
SAMPLE_CONVERSATION: tuple[Mapping[str, str], ...] = (
    {"role": "user", "content": "Hello! My name is Ada."},
    {"role": "assistant", "content": "Hello Ada, how can I help?"},
    {"role": "user", "content": "What is my name?"},
)

# Markers: plain words, so no template escapes, splits or trims them.
_USER, _TYPED, _SYSTEM = "ProbeUserText", "ProbeTypedText", "ProbeSystemText"
_TOOL, _CALL, _BOS = "probe_tool_name", "probe_call_name", "ProbeBosToken"
_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": _TOOL,
            "description": "Tool description",
            "parameters": {
                "type": "object",
                "properties": {"arg": {"type": "string", "description": "Arg description"}},
                "required": ["arg"],
            },
        },
    }
]


@dataclass(frozen=True)
class TemplateCaps:
    """Whether a chat template parses and what reaches its prompt (for ``localllm info``)."""

    parses: bool
    error: str | None  # the one-line reason it does not parse or render a user turn
    string_content: bool = False  # message content as a plain string
    typed_content: bool = False  # content as a list of {"type": "text", "text": ...} parts
    system_role: bool = False  # a system message reaches the prompt
    tools: bool = False  # tool definitions (``tools=[...]``) reach the prompt
    tool_calls: bool = False  # an assistant message's tool calls reach the prompt
    generation_prompt: bool = False  # add_generation_prompt opens the assistant's turn
    emits_bos: bool = False  # the template writes bos_token itself (do not add another)

    @property
    def features(self) -> tuple[str, ...]:
        """Names of the capabilities present, in a fixed order."""
        names = ("system_role", "tools", "tool_calls", "typed_content", "generation_prompt")
        return tuple(name for name in names if getattr(self, name))


def _reaches(
    template: GuardedTemplate,
    marker: str,
    messages: Sequence[Mapping[str, Any]],
    **variables: Any,
) -> bool:
    """Whether rendering ``messages`` succeeds and puts ``marker`` in the prompt."""
    try:
        text = template.render(messages, bos_token=_BOS, eos_token="", **variables)
    except TemplateError:
        return False
    return marker in text


def _renders_typed_content(template: GuardedTemplate) -> bool:
    """Whether content as a list of text parts reaches the prompt as text, not as a repr."""
    parts = [{"type": "text", "text": _TYPED}]
    try:
        text = template.render([{"role": "user", "content": parts}], bos_token=_BOS, eos_token="")
    except TemplateError:
        return False
    # Llama-3's ``content | trim`` prints the list itself: "[{'type': 'text', ...}]".
    return _TYPED in text and "'type'" not in text and '"type"' not in text


def _tool_call_messages(arguments: Any) -> list[dict[str, Any]]:
    call = {
        "id": "call00001",
        "type": "function",
        "function": {"name": _CALL, "arguments": arguments},
    }
    return [
        {"role": "user", "content": "User message"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "Tool response", "tool_call_id": "call00001"},
        {"role": "assistant", "content": "The tool response was 'tool response'"},
        {"role": "user", "content": "User message"},
    ]


def probe_caps(template: GuardedTemplate) -> TemplateCaps:
    """Probe-render a compiled template for each capability (a few ms; never raises)."""
    user = [{"role": "user", "content": _USER}]
    try:
        plain = template.render(user, bos_token=_BOS, eos_token="", add_generation_prompt=False)
        opened = template.render(user, bos_token=_BOS, eos_token="")
    except TemplateError as exc:
        return TemplateCaps(parses=True, error=str(exc))
    system = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": "User message"}]
    return TemplateCaps(
        parses=True,
        error=None,
        string_content=_USER in opened,
        typed_content=_renders_typed_content(template),
        system_role=_reaches(template, _SYSTEM, system),
        tools=_reaches(template, _TOOL, user, tools=_TOOLS),
        tool_calls=(
            _reaches(template, _CALL, _tool_call_messages({"arg": "value"}), tools=_TOOLS)
            or _reaches(template, _CALL, _tool_call_messages('{"arg": "value"}'), tools=_TOOLS)
        ),
        generation_prompt=opened != plain,
        emits_bos=_BOS in opened,
    )


def template_caps(
    text: object, label: str = "the chat template", budget: RenderBudget | None = None
) -> TemplateCaps:
    """Whether ``text`` parses as a chat template and what it can do."""
    try:
        template = GuardedTemplate.compile(text, label, budget=budget, hint=DEFAULT_HINT)
    except TemplateError as exc:
        return TemplateCaps(parses=False, error=str(exc))
    return probe_caps(template)


def validate(template: GuardedTemplate, *, bos_token: str, eos_token: str) -> TemplateCaps:
    """Render a two-turn sample conversation once, so a broken template fails at load time.

    The sample has a system message only if the template supports one (many refuse it on
    purpose); every user message must reach the prompt. Raises TemplateError (one line).
    """
    caps = probe_caps(template)
    if caps.error is not None:
        raise TemplateError(caps.error)
    messages = [*([SAMPLE_SYSTEM] if caps.system_role else []), *SAMPLE_CONVERSATION]
    text = template.render(messages, bos_token=bos_token, eos_token=eos_token)
    for message in SAMPLE_CONVERSATION:
        if message["role"] == "user" and message["content"] not in text:
            raise template.error(
                "leaves the user's words out of the prompt",
                f"{message['content']!r} is not in what it renders",
            )
    return caps
