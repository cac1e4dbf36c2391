"""The guarded chat-template renderer: identical to llama-cpp-python, bounded, one-line errors.

References: llama-cpp-python's own ``Jinja2ChatFormatter`` (what chat used before), llama.cpp's
70 reference templates (``models/templates`` in the vendored tree), Meta's published Llama-2
prompt format written out by hand, and the models' own GGUF metadata read by gguf-py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from support.gguf_files import gguf_reader, gguf_with_chat_template, token_text

from localllm.errors import TemplateError
from localllm.gguf.spec import read_model_spec
from localllm.templates import (
    SAMPLE_CONVERSATION,
    GuardedTemplate,
    RenderBudget,
    TemplateCaps,
    template_caps,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP_TEMPLATES = (
    REPO / "benchmarks/build/llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates"
)
LABEL = "the GGUF's chat template"
BOUND_SECONDS = 2.0

# -- real-world templates, as their models' tokenizer_config.json ship them

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Zephyr's is written on several lines: it exercises trim_blocks and lstrip_blocks.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
REAL_TEMPLATES = {
    "llama2": LLAMA2,
    "mistral-v0.1": MISTRAL_V01,
    "chatml": CHATML,
    "zephyr": ZEPHYR,
    "llama3": LLAMA3,
    "gemma": GEMMA,
}

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "  Hi there  "},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City"}},
                "required": ["city"],
            },
        },
    }
]


def reference_render(
    text: str, messages: Sequence[dict[str, Any]], *, bos: str, eos: str, **kwargs: Any
) -> str:
    """What llama-cpp-python's Jinja2ChatFormatter makes of the conversation."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=text, eos_token=eos, bos_token=bos)
    return str(formatter(messages=[dict(m) for m in messages], **kwargs).prompt)


def reference_outcome(text: str, messages: list[dict[str, Any]], **kwargs: Any) -> str | None:
    """The reference prompt, or None when llama-cpp-python's formatter raises."""
    try:
        return reference_render(text, messages, bos="<s>", eos="</s>", **kwargs)
    except Exception:  # the reference may fail any way a template can; we only compare
        return None


def assert_one_line_error(error: TemplateError, label: str = LABEL) -> str:
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    assert label in message, message
    assert "--template" in message, message
    assert "Traceback" not in message
    return message


def refused(text: object, messages: Sequence[dict[str, Any]] | None = None, **kw: Any) -> str:
    """Compile and render ``text``, expect a TemplateError; return its one line."""
    with pytest.raises(TemplateError) as info:
        template = GuardedTemplate.compile(text, LABEL, **kw)
        template.render(messages or TURNS, bos_token="<s>", eos_token="</s>")
    return assert_one_line_error(info.value)


def refused_quickly(text: str, **kw: Any) -> str:
    start = time.perf_counter()
    message = refused(text, **kw)
    elapsed = time.perf_counter() - start
    assert elapsed < BOUND_SECONDS, f"{elapsed:.2f} s: {message}"
    return message


# -- output identical to llama-cpp-python's formatter


@pytest.mark.parametrize("name", REAL_TEMPLATES)
@pytest.mark.parametrize("with_system", [True, False])
def test_real_templates_render_exactly_as_llama_cpp_python(name: str, with_system: bool) -> None:
    text = REAL_TEMPLATES[name]
    messages = [SYSTEM, *TURNS] if with_system else TURNS
    expected = reference_outcome(text, messages)
    if expected is None:  # Mistral v0.1 and Gemma refuse a system message on purpose
        assert (name, with_system) in {("mistral-v0.1", True), ("gemma", True)}
        refused(text, messages)
        return
    template = GuardedTemplate.compile(text, LABEL)
    assert template.render(messages, bos_token="<s>", eos_token="</s>") == expected
    without = template.render(
        messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=False
    )
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(
        text, eos_token="</s>", bos_token="<s>", add_generation_prompt=False
    )
    assert without == formatter(messages=[dict(m) for m in messages]).prompt


def test_llama2_prompt_is_metas_published_format() -> None:
    """Meta's format, written out by hand: system folded into the first [INST]."""
    turns = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    prompt = GuardedTemplate.compile(LLAMA2, LABEL).render(
        [SYSTEM, *turns], bos_token="<s>", eos_token="</s>"
    )
    assert prompt == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
        "<s>[INST] What is 2+2? [/INST]"
    )


def test_smollm2_gguf_template_renders_exactly_as_llama_cpp_python(smollm2_path: Path) -> None:
    text = read_model_spec(smollm2_path).chat_template
    assert text is not None and "<|im_start|>" in text
    bos = token_text(smollm2_path, gguf.Keys.Tokenizer.BOS_ID)
    eos = token_text(smollm2_path, gguf.Keys.Tokenizer.EOS_ID)
    assert (bos, eos) == ("<|im_start|>", "<|im_end|>")
    template = GuardedTemplate.compile(text, LABEL)
    for messages in ([SYSTEM, *TURNS], TURNS, TURNS[:1]):
        expected = reference_render(text, messages, bos=bos, eos=eos)
        assert template.render(messages, bos_token=bos, eos_token=eos) == expected
    # SmolLM2 adds its own system prompt when the conversation has none.
    assert template.render(TURNS[:1], bos_token=bos, eos_token=eos).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )


def llama_cpp_reference_templates() -> list[Path]:
    paths = sorted(LLAMA_CPP_TEMPLATES.glob("*.jinja"))
    assert len(paths) >= 50, f"llama.cpp's reference templates missing under {LLAMA_CPP_TEMPLATES}"
    return paths


def long_conversation(n_turns: int) -> list[dict[str, Any]]:
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"word {i} " * 80}
        for i in range(n_turns)
    ]
    return [SYSTEM, *turns]


def test_llama_cpp_reference_templates_render_as_llama_cpp_python_within_budget() -> None:
    """All of llama.cpp's reference templates: the same prompt or the same refusal, and a
    401-message conversation fits the default budget (the quadratic ones included)."""
    conversations: list[tuple[list[dict[str, Any]], Any]] = [
        ([SYSTEM, *TURNS], None),
        (TURNS, None),
        ([SYSTEM, *TURNS], TOOLS),
        (long_conversation(401), None),
    ]
    peak = {"loop_iterations": 0, "operations": 0, "max_depth": 0}
    for path in llama_cpp_reference_templates():
        text = path.read_text(encoding="utf-8")
        template = GuardedTemplate.compile(text, path.name)
        for messages, tools in conversations:
            expected = reference_outcome(text, messages, tools=tools)
            if expected is None:
                with pytest.raises(TemplateError):
                    template.render(messages, bos_token="<s>", eos_token="</s>", tools=tools)
                continue
            cost = template.render_with_cost(
                messages, bos_token="<s>", eos_token="</s>", tools=tools
            )
            assert cost.text == expected, path.name
            for key in peak:
                peak[key] = max(peak[key], getattr(cost, key))
    # Measured: gemma-4's template loops over the history per message (81202 iterations for
    # 401 messages, 3.2M operations); tool schemas nest 8 macro calls deep (Kimi-K3).
    assert peak["loop_iterations"] > 10_000  # the quadratic template is among them
    assert peak["max_depth"] < RenderBudget().max_recursion_depth


def test_undefined_names_behave_as_in_llama_cpp_python() -> None:
    """Jinja's default Undefined, as llama-cpp-python uses: printing one is empty, testing
    one is false; only reaching *through* one fails."""
    text = "{{ nothing }}{% if tools_missing %}t{% endif %}{{ messages[0].missing }}|ok"
    expected = reference_render(text, TURNS, bos="", eos="")
    assert expected == "|ok"
    assert GuardedTemplate.compile(text, LABEL).render(TURNS, bos_token="", eos_token="") == "|ok"


def test_none_defaults_match_llama_cpp_python() -> None:
    """tools/functions are None (not undefined) unless given, as templates test ``is none``."""
    text = (
        "{{ tools is none }}{{ functions is none }}{{ tool_choice is none }}{{ tools is defined }}"
    )
    guarded = GuardedTemplate.compile(text, LABEL).render(TURNS, bos_token="", eos_token="")
    assert guarded == reference_render(text, TURNS, bos="", eos="") == "TrueTrueTrueTrue"


# -- every failure is one line naming the template and the way out


def test_syntax_error() -> None:
    message = refused("{% for m in messages %")
    assert "does not parse" in message and "(line 1)" in message


def test_undefined_attribute_chain() -> None:
    message = refused("{{ undefined_var.x }}")
    assert "'undefined_var' is undefined" in message


def test_sandbox_blocks_python_internals() -> None:
    message = refused("{{ ''.__class__.__mro__ }}")
    assert "stopped by the sandbox" in message and "__class__" in message


@pytest.mark.parametrize(
    "text",
    [
        "{% set x = messages.append({'role': 'user', 'content': 'x'}) %}",
        "{% set x = messages[0].update({'content': 'x'}) %}",
        "{% set x = messages[0].pop('content') %}",
    ],
)
def test_sandbox_is_immutable(text: str) -> None:
    messages = [dict(m) for m in TURNS]
    message = refused(text, messages)
    assert "stopped by the sandbox" in message and "unsafe" in message
    assert messages == TURNS


def test_range_overflow() -> None:
    message = refused_quickly("{% for i in range(100000000) %}{% endfor %}")
    assert "OverflowError: Range too big" in message


def test_nested_loops_are_refused_fast() -> None:
    text = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    assert "loop iterations" in refused_quickly(text)


def test_string_multiplication_is_refused_before_it_allocates() -> None:
    message = refused_quickly("{{ 'x' * 10**9 }}")
    assert "went over its budget" in message and "characters or items" in message


def test_power_is_bounded() -> None:
    assert "digits" in refused_quickly("{{ 2 ** 100000000 }}")


def test_self_recursive_macro_hits_the_depth_limit() -> None:
    message = refused_quickly("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    assert "recursion deeper than 32" in message


def test_exponential_macro_tree_hits_the_operation_budget() -> None:
    text = (
        "{% macro f(n) %}{% if n < 30 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}"
        "{{ f(0) }}"
    )
    assert "template operations" in refused_quickly(text)


def test_output_length_is_bounded() -> None:
    text = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
    assert "a prompt of more than" in refused_quickly(text)


@pytest.mark.parametrize(
    "text",
    [
        # doubling a value in a loop: ~, +, a list literal, a block set, a join
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s }}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}{{ ns.s }}",
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}"
        "{% endfor %}{{ ns.l }}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set t %}{{ ns.s }}{{ ns.s }}"
        "{% endset %}{% set ns.s = t %}{% endfor %}{{ ns.s }}",
        # one operation that builds far more than it is given
        "{{ 'x'|center(1000000000) }}",
        "{{ 'x'.ljust(1000000000) }}",
        "{{ '{:>1000000000}'.format(1) }}",
        "{{ '%01000000000d' % 1 }}",
        "{% set s = 'x' * 100000 %}{{ s.replace('', s) }}",
        "{% set s = 'x' * 100000 %}{{ s|replace('', s) }}",
        "{% set s = '\n' * 100000 %}{{ s|indent('x' * 100000) }}",
        "{{ ('\t' * 100000).expandtabs(100000) }}",
        "{{ [1]|batch(1000000000, 'x')|list }}",
        "{{ {}.fromkeys(range(100000), 'x' * 100000)|tojson }}",
        "{{ ([[1] * 1000] * 1000)|sum(start=[]) }}",
        "{% set ns = namespace(n=10) %}{% for i in range(100) %}{% set ns.n = ns.n * ns.n %}"
        "{% endfor %}{{ ns.n }}",
        # bytes have the same methods and operators
        "{{ 'x'.encode() * 10**9 }}",
        "{{ 'x'.encode().center(1000000000) }}",
        # a join over a generator is sized before it allocates
        "{{ ('x' * 100000).join(range(100000)|map('string')) }}",
        "{{ range(100000)|map('string')|join('x' * 100000) }}",
        # a negative width must not buy back budget for later work
        "{% for i in range(50000) %}{% set x = ('\n' * 1000)|indent(-1000000) %}"
        "{% set y = 'x' * 900000 %}{% endfor %}",
    ],
)
def test_amplification_is_refused_fast(text: str) -> None:
    assert "went over its budget" in refused_quickly(text)


NESTED = "{% for i in range(100000) %}{% for j in range(100000) %}BODY{% endfor %}{% endfor %}"


@pytest.mark.parametrize(
    "body",
    [
        # one hostile pattern per kind of operation, each run until the budget stops it
        NESTED.replace("BODY", "{% set x = 1 %}"),
        NESTED.replace("BODY", "{% set x = 'ab'.upper() %}"),
        NESTED.replace("BODY", "{% set x = j|string %}"),
        NESTED.replace("BODY", "{% set x = [j, j] %}"),
        NESTED.replace("BODY", "{% set x = 'a' ~ j %}"),
        "{% for i in range(100000) %}{% set x = range(100000)|select('odd')|list %}{% endfor %}",
        "{% for i in range(100000) %}" + "{% set x = 1 %}" * 2000 + "{% endfor %}",
    ],
    ids=["nodes", "method", "filter", "literal", "concat", "lazy-filter", "long-body"],
)
def test_every_kind_of_operation_is_bounded_in_time(body: str) -> None:
    """The operation cap is a time bound: each kind is charged what it costs in CPU."""
    message = refused_quickly(body)
    assert "loop iterations" in message or "template operations" in message


def test_the_meters_own_filters_are_out_of_a_templates_reach() -> None:
    """The instrumentation's filters cannot be called with a negative weight to win back budget."""
    body = "{% set x = 1 %}" * 2000
    for name in ("__guard_iter__", "guard_iter", "localllm.guard.iter"):
        text = f"{{% for i in range(100000)|{name}(-100000) %}}{body}{{% endfor %}}"
        assert "No filter named" in refused_quickly(text)


def test_raise_exception_keeps_the_templates_own_message() -> None:
    """Mistral's "roles must alternate" with a non-alternating history, in one line."""
    history = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="Conversation roles must alternate"):
        reference_render(MISTRAL_V01, history, bos="<s>", eos="</s>")
    message = refused(MISTRAL_V01, history)
    assert message == (
        f"{LABEL} refused the conversation: Conversation roles must alternate "
        "user/assistant/user/assistant/...; pass --template NAME (localllm chat --template list)"
    )


def test_untrusted_messages_are_escaped_and_cut_to_one_line() -> None:
    message = refused("{{ raise_exception('bad\\x1b[31m red\\u202e\\nsecond line') }}")
    assert "\x1b" not in message and "\u202e" not in message
    assert "\\x1b[31m" in message and "\\u202e" in message and "second line" not in message


@pytest.mark.parametrize("value", [42, None, ["{{ x }}"], b"{{ x }}"])
def test_template_that_is_not_text(value: object) -> None:
    assert "is not text" in refused(value)


def test_template_too_long_to_compile() -> None:
    message = refused("x" * (RenderBudget().max_source_chars + 1))
    assert "characters long" in message


def test_include_and_import_are_refused() -> None:
    assert "includes or imports" in refused("{% include 'other.jinja' %}")


def test_deep_nesting_fails_in_one_line() -> None:
    refused("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}")


def test_label_and_hint_are_the_callers() -> None:
    with pytest.raises(TemplateError) as info:
        GuardedTemplate.compile("{% if %}", "template file x.jinja", hint="fix x.jinja")
    assert str(info.value).startswith("template file x.jinja does not parse: ")
    assert str(info.value).endswith("; fix x.jinja")


def test_a_smaller_budget_is_respected() -> None:
    text = (
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% endif %}{{ n }}{% endmacro %}{{ f(depth) }}"
    )
    template = GuardedTemplate.compile(text, LABEL, budget=RenderBudget(max_recursion_depth=3))
    assert template.render([], bos_token="", eos_token="", depth=2) == "012"
    with pytest.raises(TemplateError, match="recursion deeper than 3"):
        template.render([], bos_token="", eos_token="", depth=3)


def test_limits_grow_with_the_conversation_not_with_the_template() -> None:
    """A prompt may be as long as the conversation needs, above max_output_chars."""
    budget = RenderBudget(max_output_chars=100)
    template = GuardedTemplate.compile(CHATML, LABEL, budget=budget)
    prompt = template.render(long_conversation(100), bos_token="", eos_token="")
    assert len(prompt) > 50 * budget.max_output_chars
    with pytest.raises(TemplateError, match="a prompt of more than"):
        GuardedTemplate.compile("{{ 'x' * 1000 }}", LABEL, budget=budget).render(
            [], bos_token="", eos_token=""
        )


# -- any thread, no signals


def test_budget_holds_in_a_worker_thread() -> None:
    template = GuardedTemplate.compile(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", LABEL
    )
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(template.render, TURNS, bos_token="", eos_token="")
        with pytest.raises(TemplateError, match="loop iterations"):
            future.result(timeout=10)
    assert threading.current_thread() is threading.main_thread()
    assert time.perf_counter() - start < BOUND_SECONDS


def test_concurrent_renders_have_their_own_meters() -> None:
    template = GuardedTemplate.compile(LLAMA3, LABEL)
    conversations = [long_conversation(n) for n in (1, 41, 81, 121)] * 4
    alone = [template.render_with_cost(c, bos_token="<s>", eos_token="</s>") for c in conversations]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(
            pool.map(
                lambda c: template.render_with_cost(c, bos_token="<s>", eos_token="</s>"),
                conversations,
            )
        )
    assert together == alone


# -- capabilities, probed like llama.cpp's common/jinja/caps.cpp


@pytest.mark.parametrize(
    ("name", "system_role", "generation_prompt", "emits_bos"),
    [
        ("chatml", True, True, False),
        ("llama2", True, False, True),  # Llama-2 has no assistant header to open
        ("mistral-v0.1", False, False, True),  # "Only user and assistant roles"
        ("zephyr", True, True, False),
        ("llama3", True, True, True),
        ("gemma", False, True, True),  # "System role not supported"
    ],
)
def test_caps_of_real_templates(
    name: str, system_role: bool, generation_prompt: bool, emits_bos: bool
) -> None:
    caps = template_caps(REAL_TEMPLATES[name], LABEL)
    assert caps == TemplateCaps(
        parses=True,
        error=None,
        string_content=True,
        typed_content=False,
        system_role=system_role,
        tools=False,
        tool_calls=False,
        generation_prompt=generation_prompt,
        emits_bos=emits_bos,
    )


def test_caps_find_tools_in_llama_3_1() -> None:
    text = (LLAMA_CPP_TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()
    caps = template_caps(text, LABEL)
    assert caps.features == ("system_role", "tools", "tool_calls", "generation_prompt")
    # Its ``message['content'] | trim`` prints a list of parts as a Python repr: not typed.
    assert caps.string_content and not caps.typed_content and caps.emits_bos


def test_caps_of_a_template_that_does_not_parse() -> None:
    caps = template_caps("{% for m in messages %", LABEL)
    assert not caps.parses and caps.features == ()
    assert caps.error is not None
    assert_one_line_error(TemplateError(caps.error))


def test_caps_of_a_template_that_cannot_render_a_user_turn() -> None:
    caps = template_caps("{{ undefined_var.x }}", LABEL)
    assert caps.parses and caps.error is not None and "'undefined_var' is undefined" in caps.error


# -- validation when the model loads


def test_validate_accepts_smollm2_with_a_system_prompt(smollm2_path: Path) -> None:
    text = read_model_spec(smollm2_path).chat_template
    caps = validate(
        GuardedTemplate.compile(text, LABEL), bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    assert caps.system_role and caps.generation_prompt


def test_validate_accepts_a_template_that_refuses_system_messages() -> None:
    caps = validate(GuardedTemplate.compile(GEMMA, LABEL), bos_token="<bos>", eos_token="<eos>")
    assert not caps.system_role


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{{ undefined_var.x }}", "'undefined_var' is undefined"),
        ("{% for m in messages %}{{ m.role }}{% endfor %}", "leaves the user's words out"),
        ("{% for t in tools %}{{ t }}{% endfor %}", "TypeError"),  # a tools-only template
    ],
)
def test_validate_refuses_a_broken_template(text: str, expected: str) -> None:
    template = GuardedTemplate.compile(text, LABEL)
    with pytest.raises(TemplateError) as info:
        validate(template, bos_token="<s>", eos_token="</s>")
    assert expected in assert_one_line_error(info.value)


def test_sample_conversation_is_two_turns() -> None:
    assert [m["role"] for m in SAMPLE_CONVERSATION] == ["user", "assistant", "user"]


# -- copies of SmolLM2 with another chat template (tests/support/gguf_files.py, for CLI tests)


@pytest.mark.parametrize("template", ["{{ 'hostile' * 3 }}", None])
def test_gguf_copy_with_another_chat_template(
    smollm2_path: Path, tmp_path: Path, template: str | None
) -> None:
    gguf_reader(smollm2_path)  # parsed once per session (about 3 s on this machine)
    start = time.perf_counter()
    copy = gguf_with_chat_template(smollm2_path, tmp_path / "copy.gguf", template)
    elapsed = time.perf_counter() - start
    spec = read_model_spec(copy)
    assert spec.chat_template == template
    assert spec.has_chat_template == (template is not None)
    assert elapsed < 5.0, f"copying the 94 MiB GGUF took {elapsed:.2f} s"
    if template is not None:  # gguf-py re-reads the copy: same tensors, same bytes (~2.5 s)
        original, copied = gguf_reader(smollm2_path), gguf.GGUFReader(copy, "r")
        assert [t.name for t in copied.tensors] == [t.name for t in original.tensors]
        for a, b in zip(original.tensors, copied.tensors, strict=True):
            assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name
