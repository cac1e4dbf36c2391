"""serve without a model: request checking, streamed text and stop strings, options, guard.

Expectations are written out by hand here; the real model is in test_serve_api.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from localllm.errors import InvalidArgument
from localllm.net import is_loopback
from localllm.runtime.batch_records import (
    COUNTERS,
    EngineStats,
    GenerationDone,
    GenerationFailed,
    GenerationFailedError,
    GenerationParams,
    TextState,
    TokenLogprob,
    run_request,
)
from localllm.serve.config import ServeOptions
from localllm.serve.guard import host_name
from localllm.serve.metrics import Metrics
from localllm.serve.schema import ApiError, parse_chat_completion_request, parse_completion_request

USER = [{"role": "user", "content": "hi"}]


def chat(**fields: object) -> bytes:
    return json.dumps({"model": "m", "messages": USER, **fields}).encode()


def refused(body: bytes, parser=parse_chat_completion_request) -> ApiError:
    with pytest.raises(ApiError) as info:
        parser(body)
    assert info.value.status == 400
    return info.value


# ----------------------------------------------------------------------------- schema


def test_chat_defaults_are_chats_flags() -> None:
    req = parse_chat_completion_request(chat())
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repeat_penalty) == (
        0.8,
        0.95,
        40,
        0.05,
        1.0,
    )
    assert req.max_tokens is None and not req.stream and req.messages[0].content == "hi"


def test_what_common_clients_always_send_is_accepted() -> None:
    req = parse_chat_completion_request(
        chat(n=1, user="me", stream=True, stream_options={"include_usage": True}, stop=None)
    )
    assert req.stream and req.include_usage and req.sampling.stop == ()


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"tools": []}, "tools", "non-empty list"),
        ({"functions": []}, "functions", "unsupported parameter 'functions'"),
        ({"n": 2}, "n", "one choice per request"),
        ({"temperature": -1}, "temperature", "-1 must be >= 0.0"),
        ({"temperature": "hot"}, "temperature", "expected a number"),
        ({"top_p": 0}, "top_p", "must be > 0.0"),
        ({"top_k": 1.5}, "top_k", "expected an integer"),
        ({"max_tokens": 0}, "max_tokens", "between 1 and"),
        ({"seed": 0xFFFFFFFF}, "seed", "between 0 and 4294967294"),
        ({"stop": [""]}, "stop", "cannot be empty"),
        ({"stop": ["x"] * 17}, "stop", "at most 16"),
        ({"top_logprobs": 2}, "top_logprobs", "only allowed with logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "not a token id"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "conflicts"),
    ],
)
def test_bad_chat_fields_are_400s_naming_the_field(
    fields: dict[str, object], param: str, fragment: str
) -> None:
    error = refused(chat(**fields))
    assert error.param == param
    assert fragment in error.message
    body = error.body()["error"]
    assert body["param"] == param and body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("messages", "param", "fragment"),
    [
        (None, "messages", "non-empty list"),
        ([], "messages", "non-empty list"),
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id", "needs the call's id"),
        ([{"role": "function", "content": "x"}], "messages[0].role", "not supported"),
        ([{"role": "developer", "content": "x"}], "messages[0].role", "use 'system'"),
        ([{"role": "user", "content": "x", "name": "bob"}], "messages[0].name", "not supported"),
        ([{"role": "user", "content": None}], "messages[0].content", "string or a list"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0]",
            "text only",
        ),
    ],
)
def test_bad_messages_are_400s(messages: object, param: str, fragment: str) -> None:
    error = refused(json.dumps({"messages": messages}).encode())
    assert error.param == param and fragment in error.message


def test_text_parts_are_joined_by_newlines() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = parse_chat_completion_request(
        json.dumps({"messages": [{"role": "user", "content": parts}]}).encode()
    )
    assert req.messages[0].content == "a\nb"


@pytest.mark.parametrize("body", [b"{", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_json_is_a_400(body: bytes) -> None:
    error = refused(body)
    assert error.code == "invalid_json"


@pytest.mark.parametrize("parser", [parse_chat_completion_request, parse_completion_request])
@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
        ('{"prompt": "\u00e9"}'.encode("latin-1"), "not valid JSON"),
    ],
)
def test_bodies_the_json_parser_cannot_take_are_400s(parser, body: bytes, fragment: str) -> None:
    error = refused(body, parser)
    assert error.code == "invalid_json" and fragment in error.message


def test_json_schema_response_format_keeps_the_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    req = parse_chat_completion_request(chat(response_format=fmt))
    assert req.response_format == "json_schema" and req.json_schema == schema


def test_completion_prompts() -> None:
    assert parse_completion_request(b'{"prompt": "x"}').prompt == "x"
    assert parse_completion_request(b'{"prompt": ["x"]}').prompt == "x"
    assert parse_completion_request(b'{"prompt": [1, 2, 3]}').prompt == (1, 2, 3)
    assert parse_completion_request(b'{"prompt": [[4, 5]]}').prompt == (4, 5)
    assert parse_completion_request(b'{"prompt": "x", "logprobs": 3}').logprobs == 3
    for body, param in [
        (b'{"prompt": ["a", "b"]}', "prompt"),
        (b'{"prompt": "x", "echo": true}', "echo"),
        (b'{"prompt": "x", "best_of": 2}', "best_of"),
        (b'{"prompt": "x", "suffix": "y"}', "suffix"),
        (b'{"prompt": "x", "logprobs": 6}', "logprobs"),
        (b'{"prompt": "x", "messages": []}', "messages"),
        (b"{}", "prompt"),
    ]:
        assert refused(body, parse_completion_request).param == param, body


# ------------------------------------------------------------------------- text state


def lp(token: int, piece: bytes) -> TokenLogprob:
    return TokenLogprob(token, piece, -1.0)


def test_a_stop_string_split_over_tokens_is_held_back_then_cut() -> None:
    state = TextState(["END"])
    assert state.push(b"Hello E", None) == ("Hello ", (), False)  # "E" could start END
    assert state.push(b"N", None) == ("", (), False)
    assert state.push(b"D and more", None) == ("", (), True)
    assert state.final == "Hello "
    assert state.finish() == ("", ())


def test_a_held_back_prefix_is_released_when_it_diverges() -> None:
    state = TextState(["END"])
    assert state.push(b"E", None)[0] == ""
    assert state.push(b"X", None)[0] == "EX"
    assert state.finish() == ("", ())
    assert state.final == "EX"


def test_the_earliest_stop_wins_whatever_the_order_given() -> None:
    state = TextState(["zz", "b"])
    assert state.push(b"abzz", None) == ("a", (), True)
    assert state.final == "a"


def test_a_character_split_over_tokens_waits_for_its_last_byte() -> None:
    state = TextState([])
    e_acute = "é".encode()  # two bytes
    assert state.push(b"caf" + e_acute[:1], lp(1, b"caf" + e_acute[:1])) == ("caf", (), False)
    text, logprobs, stopped = state.push(e_acute[1:], lp(2, e_acute[1:]))
    assert (text, stopped) == ("é", False)
    assert [x.token_id for x in logprobs] == [1, 2]  # both tokens are complete text now


def test_finish_drops_an_unfinished_character() -> None:
    state = TextState([])
    state.push(b"ok\xe2\x82", None)  # the first two bytes of the euro sign
    assert state.finish() == ("", ())
    assert state.final == "ok"


def test_logprobs_of_tokens_cut_by_a_stop_string_are_dropped() -> None:
    state = TextState(["STOP"])
    assert state.push(b"a S", lp(1, b"a S")) == ("a ", (), False)  # "S" may start STOP
    text, logprobs, stopped = state.push(b"TOP!", lp(2, b"TOP!"))
    assert (text, logprobs, stopped) == ("", (), True)
    assert state.final == "a "
    assert state.finish() == ("", ())  # token 1 ends inside the stop string: dropped too


class _Replying:
    """An engine stand-in whose submit() answers with ``events`` from another thread."""

    def __init__(self, *events: object) -> None:
        self.events = events

    def submit(self, prompt: object, params: object, sink) -> None:
        import threading

        threading.Thread(target=lambda: [sink(e) for e in self.events]).start()


def test_run_request_returns_the_end_or_raises_the_failure() -> None:
    done = GenerationDone("hi", "stop", 1, 0, 1, 0.0, 0.0, 0.0, 0)
    params = GenerationParams(max_tokens=4)
    assert run_request(_Replying("a delta", done), [1], params, 10) is done
    with pytest.raises(GenerationFailedError, match="decode returned -1"):
        run_request(_Replying(GenerationFailed("decode returned -1")), [1], params, 10)
    with pytest.raises(GenerationFailedError, match=r"within 0\.1 s"):
        run_request(_Replying(), [1], params, 0.1)  # nothing ever ends it


def test_generation_params_are_checked() -> None:
    GenerationParams(max_tokens=1, temperature=0).validate()
    with pytest.raises(InvalidArgument, match="top_p"):
        GenerationParams(max_tokens=1, top_p=0).validate()
    with pytest.raises(InvalidArgument, match="max_tokens"):
        GenerationParams(max_tokens=0).validate()


# ----------------------------------------------------------------------- options, guard


def options(**fields: object) -> ServeOptions:
    return ServeOptions(model_path=Path("m.gguf"), model_id="m", **fields)  # type: ignore[arg-type]


def test_a_network_host_needs_a_key_or_insecure() -> None:
    with pytest.raises(InvalidArgument, match="--api-key"):
        options(host="0.0.0.0").validate()
    options(host="0.0.0.0", api_key="k").validate()
    options(host="0.0.0.0", insecure=True).validate()
    options(host="127.0.0.1").validate()
    with pytest.raises(InvalidArgument, match="empty"):
        options(api_key=" ").validate()
    with pytest.raises(InvalidArgument, match="--parallel"):
        options(parallel=0).validate()


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    assert not is_loopback("example.com")


def test_host_names_accepted() -> None:
    assert options().host_names() == {"127.0.0.1", "localhost", "::1"}
    assert options(host="0.0.0.0", insecure=True).host_names() is None
    names = options(host="0.0.0.0", insecure=True, allowed_hosts=("box.lan",)).host_names()
    assert names == {"box.lan", "127.0.0.1", "localhost", "::1"}


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:8080", "127.0.0.1"),
        ("LOCALHOST", "localhost"),
        ("[::1]:8080", "::1"),
        ("evil.example:80", "evil.example"),
        ("::1", "::1"),
    ],
)
def test_host_header_names(header: str, name: str) -> None:
    assert host_name(header) == name


def test_metrics_are_valid_prometheus_text() -> None:
    metrics = Metrics()
    metrics.count("POST", "/v1/chat/completions", 200)
    metrics.count("GET", "/nope", 404)
    counters = dict.fromkeys(COUNTERS, 0.0) | {"decode_seconds": 1.5, "completion_tokens": 7.0}
    stats = EngineStats(4, 4096, 1024, 3, 2, 100, 12.5, counters)
    text = metrics.render([stats])
    sample = re.compile(r'^localllm_[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? [0-9.e+-]+$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert "localllm_requests_in_flight 3\n" in text
    assert "localllm_requests_queued 2\n" in text
    assert "localllm_kv_usage_ratio 0.0244140625\n" in text  # 100 / 4096
    assert "localllm_completion_tokens_total 7\n" in text
    assert 'endpoint="other",status="404"' in text
