"""Tool calling: the request checks, each family's format, grammars, and serve end to end.

Fast tests read llama.cpp's own copies of the Qwen2.5, Llama-3.1 and Mistral Nemo
templates (its models/templates/) and check that what the template writes for a call is
what the parser reads back. Slow tests run the real SmolLM2 through the openai client:
its template knows no tools, so it gets the generic JSON envelope; copies of it with the
three templates written in get their own formats. Arguments are checked with the
reference validator (jsonschema), not with localllm's grammar code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from support.gguf_files import gguf_with_chat_template

from localllm.runtime.params import LoadOptions
from localllm.serve import RunningServer, ServeOptions, start_server
from localllm.serve.schema import ApiError, parse_chat_completion_request
from localllm.templates.sandbox import GuardedTemplate
from localllm.tools.api import Message, ToolCall, ToolChoice, parse_tools
from localllm.tools.families import detect_family, mistral_call_id, template_conversation
from localllm.tools.grammar import tool_grammar
from localllm.tools.parse import CallPiece, ParsedReply, ToolStream, parse_reply

MODEL = "smollm2-135m"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TEMPLATES = {
    "hermes": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "llama3": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "mistral": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
}
# Where each template writes an assistant turn: (after, before).
TURN = {
    "hermes": ("<|im_start|>assistant\n", "<|im_end|>"),
    "llama3": ("assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "mistral": ("[/INST]", "</s>"),
}


def template_text(source: Path, family: str) -> str:
    return (source / "models" / "templates" / TEMPLATES[family]).read_text(encoding="utf-8")


def assert_valid(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


# --------------------------------------------------------------------- request checks


def request(**fields: Any) -> bytes:
    return json.dumps({"messages": ASK, **fields}).encode()


@pytest.mark.parametrize(
    ("tools", "param", "fragment"),
    [
        ([{"type": "retrieval"}], "tools[0].type", "only 'function' tools"),
        ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name", "1-64"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            "tools[0].function.parameters",
            "type 'object'",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": [1]}}],
            "tools[0].function.parameters",
            "type 'object'",
        ),
        ([ADD, WEATHER, ADD], "tools[2].function.name", "already tools[0]"),
        ([{"type": "function", "function": {"name": "f", "x": 1}}], "tools[0].function.x", ""),
        ([], "tools", "non-empty list"),
    ],
)
def test_bad_tools_are_400s_naming_the_field(tools: Any, param: str, fragment: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_chat_completion_request(request(tools=tools))
    assert (info.value.status, info.value.param) == (400, param)
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"tool_choice": "sometimes"}, "tool_choice", "'sometimes'"),
        ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}},
            "tool_choice",
            "no tool is named 'mul'",
        ),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
        (
            {"tools": TOOLS, "response_format": {"type": "json_object"}},
            "response_format",
            "tool_choice is 'none'",
        ),
        ({"functions": [ADD["function"]]}, "functions", "unsupported parameter 'functions'"),
        ({"function_call": "auto"}, "function_call", "unsupported parameter"),
    ],
)
def test_bad_tool_choices_and_unsupported_keys_are_400s(
    fields: dict[str, Any], param: str, fragment: str
) -> None:
    with pytest.raises(ApiError) as info:
        parse_chat_completion_request(request(**fields))
    assert (info.value.status, info.value.param) == (400, param)
    assert fragment in info.value.message


def test_history_messages_carry_tool_calls_and_results() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    req = parse_chat_completion_request(json.dumps({"messages": messages}).encode())
    assert req.messages[1].tool_calls == (ToolCall("call_1", "add", "{}"),)
    assert (req.messages[2].role, req.messages[2].tool_call_id) == ("tool", "call_1")
    assert req.tool_choice == ToolChoice("none") and req.tools == ()


def test_a_tool_message_needs_its_call_id_and_calls_their_shape() -> None:
    bad_call = [*ASK, {"role": "assistant", "tool_calls": [{"function": {"name": 3}}]}]
    for messages, param in [
        ([*ASK, {"role": "tool", "content": "3"}], "messages[1].tool_call_id"),
        (bad_call, "messages[1].tool_calls[0].function.name"),
    ]:
        with pytest.raises(ApiError) as info:
            parse_chat_completion_request(json.dumps({"messages": messages}).encode())
        assert info.value.param == param


def test_a_schema_the_grammar_builder_cannot_take_is_named() -> None:
    tools = parse_tools(
        [
            ADD,
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {
                        "type": "object",
                        "properties": {"x": {"$ref": "https://example.com/x.json"}},
                    },
                },
            },
        ]
    )
    with pytest.raises(Exception) as info:
        tool_grammar("generic", tools, ToolChoice("required"), True)
    assert getattr(info.value, "param", None) == "tools[1].function.parameters"
    assert "'f'" in str(info.value)


# --------------------------------------------------------------------- families


def test_the_family_is_read_from_the_template_text(llama_cpp_source: Path) -> None:
    for family in TEMPLATES:
        assert detect_family(template_text(llama_cpp_source, family)) == family
    smollm2 = "{% for message in messages %}<|im_start|>{{ message['content'] }}{% endfor %}"
    assert detect_family(smollm2) == "generic"
    assert detect_family(None) == "generic"


def _history(calls: tuple[ToolCall, ...]) -> list[Message]:
    return [
        Message("user", "Weather in Paris and 2+3?"),
        Message("assistant", "", calls),
        *(Message("tool", "18", (), c.id) for c in calls),
    ]


CALLS = (
    ToolCall("call_a", "get_weather", '{"city": "Paris", "unit": "celsius"}'),
    ToolCall("call_b", "add", '{"a": 2, "b": 3}'),
)


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_each_template_writes_calls_its_parser_reads_back(
    llama_cpp_source: Path, family: str
) -> None:
    template = GuardedTemplate.compile(template_text(llama_cpp_source, family), family)
    calls = CALLS[:1] if family == "llama3" else CALLS  # Llama 3.1 takes one call a turn
    messages, extra = template_conversation(
        family, _history(calls), parse_tools(TOOLS), ToolChoice("auto")
    )
    prompt = template.render(messages, bos_token="<s>", eos_token="</s>", **extra)
    assert "get_weather" in prompt.split(TURN[family][0])[0]  # the tools are described
    after, before = TURN[family]
    turn = prompt.split(after)[1 if family != "mistral" else -1].split(before)[0]
    parsed = parse_reply(family, turn)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        (c.name, json.loads(c.arguments)) for c in calls
    ]
    assert parsed.content is None


def test_mistral_ids_are_nine_alphanumerics_and_stable() -> None:
    mapped = mistral_call_id("call_0123456789abcdef")
    assert (
        len(mapped) == 9 and mapped.isalnum() and mapped == mistral_call_id("call_0123456789abcdef")
    )
    assert mistral_call_id("abcDEF123") == "abcDEF123"


def test_generic_history_is_the_json_envelope_and_tool_results_are_user_turns() -> None:
    messages, extra = template_conversation(
        "generic", _history(CALLS), parse_tools(TOOLS), ToolChoice("auto")
    )
    assert extra == {"tools": None}
    assert messages[0]["role"] == "system" and "get_weather" in messages[0]["content"]
    assert json.loads(messages[2]["content"])["tool_calls"][1] == {
        "name": "add",
        "arguments": {"a": 2, "b": 3},
        "id": "call_b",
    }
    result = json.loads(messages[3]["content"])["tool_response"]
    assert messages[3]["role"] == "user" and result["tool"] == "get_weather"


REPLIES = {
    "hermes": 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
    '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": '
    '{"a": 2, "b": 3}}\n</tool_call>',
    "mistral": 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", '
    '"unit": "celsius"}, "id": "abcdefghi"}, {"name": "add", "arguments": {"a": 2, "b": 3}, '
    '"id": "ABCDEFGHI"}]',
    "llama3": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", '
    '"unit": "celsius"}}; {"name": "add", "parameters": {"a": 2, "b": 3}}',
    "generic": '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", '
    '"unit": "celsius"}}, {"name": "add", "arguments": {"a": 2, "b": 3}}]}',
}


@pytest.mark.parametrize("family", sorted(REPLIES))
def test_every_parallel_call_is_parsed_whole_and_streamed(family: str) -> None:
    whole = parse_reply(family, REPLIES[family])
    assert [c.name for c in whole.calls] == ["get_weather", "add"]
    assert json.loads(whole.calls[1].arguments) == {"a": 2, "b": 3}
    expected = "Sure." if family in ("hermes", "mistral") else None
    assert whole.content == expected
    if family == "mistral":
        assert [c.id for c in whole.calls] == ["abcdefghi", "ABCDEFGHI"]
    stream, text, pieces = ToolStream(family), "", []
    for ch in REPLIES[family]:  # one character at a time: markers arrive split
        shown, new = stream.push(ch)
        text, pieces = text + shown, pieces + new
        assert "<tool" not in text and "[TOOL" not in text
    shown, new = stream.finish()
    text, pieces = text + shown, pieces + new
    assert text.strip() == (expected or "")
    assert reassemble(pieces) == [(c.name, c.arguments) for c in whole.calls]
    fragments = [p for p in pieces if p.id is None]
    if family != "mistral":  # arguments arrive as they are written (Mistral's id comes last)
        assert len(fragments) > len(whole.calls)


def reassemble(pieces: list[CallPiece]) -> list[tuple[str, str]]:
    """Calls from streamed pieces, as a client does: by index, arguments concatenated."""
    calls: dict[int, list[str]] = {}
    for piece in pieces:
        if piece.id is not None:
            assert piece.index not in calls and piece.name  # the head comes once, first
            calls[piece.index] = [piece.name, piece.arguments]
        else:
            calls[piece.index][1] += piece.arguments
    assert sorted(calls) == list(range(len(calls)))
    return [(name, args) for name, args in calls.values()]


def test_plain_text_stays_text_and_a_broken_call_is_not_a_call() -> None:
    text = "Hello <b>there</b>"
    for family in ("hermes", "mistral", "llama3", "generic"):
        assert parse_reply(family, text) == ParsedReply(text, ())
    broken = parse_reply("hermes", '<tool_call>\n{"name": "add", "argu')
    assert broken.calls == () and broken.content == '<tool_call>\n{"name": "add", "argu'
    assert parse_reply("generic", '{"response": "Hi \\"you\\""}').content == 'Hi "you"'
    stream = ToolStream("generic")
    shown = "".join(stream.push(c)[0] for c in '{"response": "caf\\u00e9 ok"}')
    assert shown + stream.finish()[0] == "café ok"


@pytest.mark.parametrize("family", ["hermes", "mistral", "llama3", "generic"])
def test_grammars_hold_required_and_leave_auto_free_until_a_call(family: str) -> None:
    tools = parse_tools(TOOLS)
    required = tool_grammar(family, tools, ToolChoice("required"), True)
    auto = tool_grammar(family, tools, ToolChoice("auto"), True)
    named = tool_grammar(family, tools, ToolChoice("function", "add"), True)
    assert required is not None and auto is not None and named is not None
    assert required.triggers == ()
    assert (auto.triggers == ()) == (family == "generic")
    assert "call ::= call1\n" in named.gbnf and "call0 ::=" not in named.gbnf
    assert tool_grammar(family, tools, ToolChoice("none"), True) is None


# --------------------------------------------------------------------- serve, real model


@pytest.fixture(scope="module")
def server(smollm2_path: Path) -> Iterator[RunningServer]:
    options = ServeOptions(
        model_path=smollm2_path, model_id=MODEL, port=0, parallel=4, load=LoadOptions(n_ctx=4096)
    )
    with start_server(options) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, **fields: Any) -> Any:
    fields = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 120, **fields}
    return client.chat.completions.create(**fields)


@pytest.mark.slow
def test_five_sampled_required_replies_are_valid_calls(client: openai.OpenAI) -> None:
    def one(seed: int) -> Any:
        return chat(client, tool_choice="required", temperature=0.8, seed=seed)

    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(one, range(1, 6)))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1  # parallel_tool_calls is off by default
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            assert_valid(call.function.name, call.function.arguments)


@pytest.mark.slow
def test_a_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "add"}}
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    reply = chat(client, messages=messages, tool_choice=named, temperature=0)
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "add" and reply.choices[0].finish_reason == "tool_calls"
    assert_valid("add", call.function.arguments)


@pytest.mark.slow
def test_a_streamed_call_reassembles_to_a_valid_call(client: openai.OpenAI) -> None:
    chunks = list(chat(client, tool_choice="required", temperature=0, stream=True))
    calls: dict[int, dict[str, str]] = {}
    content, finish = "", None
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or ():
            call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += part.id or ""
            call["name"] += (part.function.name or "") if part.function else ""
            call["arguments"] += (part.function.arguments or "") if part.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls and content == ""
    for call in calls.values():
        assert call["id"].startswith("call_")
        assert_valid(call["name"], call["arguments"])
    whole = chat(client, tool_choice="required", temperature=0)
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls
    ]


@pytest.mark.slow
def test_auto_replies_either_call_or_text_and_say_which(client: openai.OpenAI) -> None:
    reply = chat(client, tool_choice="auto", temperature=0).choices[0]
    if reply.message.tool_calls:
        assert reply.finish_reason == "tool_calls"
        for call in reply.message.tool_calls:
            assert_valid(call.function.name, call.function.arguments)
    else:
        assert reply.finish_reason in ("stop", "length") and reply.message.content


@pytest.mark.slow
def test_parallel_calls_in_the_history_are_rendered_and_answered(client: openai.OpenAI) -> None:
    calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": "add", "arguments": args}}
        for i, args in enumerate(['{"a": 1, "b": 2}', '{"a": 3, "b": 4}'])
    ]
    history = [
        {"role": "user", "content": "What are 1+2 and 3+4?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_0", "content": "3"},
        {"role": "tool", "tool_call_id": "call_1", "content": "7"},
    ]
    reply = chat(client, messages=history, tool_choice="required", temperature=0, max_tokens=60)
    assert reply.choices[0].finish_reason == "tool_calls"
    for call in reply.choices[0].message.tool_calls:
        assert_valid(call.function.name, call.function.arguments)


@pytest.mark.slow
def test_a_tool_round_trip_ends_in_text_with_tool_choice_none(client: openai.OpenAI) -> None:
    first = chat(client, tool_choice="required", temperature=0).choices[0].message
    [call] = first.tool_calls[:1]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'},
    ]
    reply = chat(client, messages=history, tool_choice="none", temperature=0, max_tokens=40)
    answer = reply.choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")
    assert answer.message.content and "tool_calls" not in answer.message.content


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ([{"type": "code_interpreter"}], "tools[0].type"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            "tools[0].function.parameters",
        ),
        ([ADD, ADD], "tools[1].function.name"),
        (
            [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"x": {"type": "frob"}}},
                    },
                }
            ],
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_tools_through_the_client_are_400s(
    client: openai.OpenAI, tools: list, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, tools=tools)
    assert info.value.status_code == 400 and info.value.body["param"] == param


@pytest.fixture(scope="module")
def family_servers(
    smollm2_path: Path, llama_cpp_source: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, openai.OpenAI]]:
    """SmolLM2 copies with the Qwen2.5, Llama-3.1 and Mistral Nemo templates written in."""
    servers, clients = [], {}
    try:
        for family in TEMPLATES:
            dest = tmp_path_factory.mktemp(family) / f"smollm2-{family}.gguf"
            gguf_with_chat_template(smollm2_path, dest, template_text(llama_cpp_source, family))
            options = ServeOptions(
                model_path=dest, model_id=MODEL, port=0, parallel=1, load=LoadOptions(n_ctx=2048)
            )
            servers.append(start_server(options))
            clients[family] = openai.OpenAI(
                base_url=f"{servers[-1].url}/v1", api_key="unused", max_retries=0
            )
        yield clients
    finally:
        for running in servers:
            running.stop()


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_each_family_generates_and_parses_its_own_format(
    family_servers: dict[str, openai.OpenAI], family: str
) -> None:
    client = family_servers[family]
    reply = chat(client, tool_choice="required", temperature=0, max_tokens=80).choices[0]
    assert reply.finish_reason == "tool_calls", reply
    for call in reply.message.tool_calls:
        assert_valid(call.function.name, call.function.arguments)
    if family == "mistral":  # the model's own 9-character ids come back
        assert all(len(c.id) == 9 and c.id.isalnum() for c in reply.message.tool_calls)
    # The call goes back into the history in the family's format, and renders.
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [reply.message.tool_calls[0].model_dump()],
        },
        {"role": "tool", "tool_call_id": reply.message.tool_calls[0].id, "content": "18"},
    ]
    after = chat(client, messages=history, tool_choice="none", temperature=0, max_tokens=8)
    assert after.choices[0].message.tool_calls is None
    # auto: the lazy grammar (a trigger per family) is accepted by llama.cpp; the reply is
    # text, or calls that hold to their schemas.
    auto = chat(client, tool_choice="auto", temperature=0, max_tokens=60).choices[0]
    for call in auto.message.tool_calls or ():
        assert_valid(call.function.name, call.function.arguments)
    assert (auto.finish_reason == "tool_calls") == bool(auto.message.tool_calls)
