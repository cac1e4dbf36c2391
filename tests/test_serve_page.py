"""The chat page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

The browser talks only to the test's server on 127.0.0.1; a screenshot of the streamed
reply is kept under the test's tmp dir and its path printed.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from localllm.runtime.params import LoadOptions
from localllm.serve import RunningServer, ServeOptions, start_server

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def options(smollm2_path: Path) -> ServeOptions:
    return ServeOptions(
        model_path=smollm2_path, model_id="smollm2-135m", port=0, parallel=2, load=LoadOptions()
    )


@pytest.fixture(scope="module")
def server(options: ServeOptions) -> Iterator[RunningServer]:
    with start_server(options) as running:
        yield running


@pytest.fixture
def page(tmp_path: Path):
    assert shutil.which(CHROMIUM), "Debian's chromium is needed: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 900, "height": 700},
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()


def health(server: RunningServer) -> dict:
    with urllib.request.urlopen(f"{server.url}/health") as resp:
        return json.loads(resp.read())


def test_type_a_message_and_see_the_reply_stream(
    page, server: RunningServer, tmp_path: Path
) -> None:
    page.goto(server.url)
    page.wait_for_selector("body[data-state=idle]")
    assert "smollm2-135m" in page.text_content("#model")
    page.click("#settings summary")
    assert not page.is_visible("#key-row")  # no key on this server: no key field
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "64")
    page.fill("#input", "Name three colours.")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant")
    lengths = set()
    deadline = time.monotonic() + 60
    while reply.get_attribute("data-done") != "1":
        lengths.add(len(reply.text_content() or ""))
        assert time.monotonic() < deadline, "no complete reply within 60 s"
        time.sleep(0.02)
    shot = tmp_path / "chat_page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nchat page screenshot: {shot}")
    assert len(lengths - {0}) >= 2, f"the reply did not arrive in pieces: {sorted(lengths)}"

    # The same conversation through the API, rendered by the page's own renderer.
    request = urllib.request.Request(
        f"{server.url}/v1/chat/completions",
        data=json.dumps(
            {
                "messages": [{"role": "user", "content": "Name three colours."}],
                "temperature": 0,
                "max_tokens": 64,
            }
        ).encode(),
    )
    with urllib.request.urlopen(request) as resp:
        expected = json.loads(resp.read())["choices"][0]["message"]["content"]
    rendered = page.evaluate(
        "(t) => { const d = document.createElement('div');"
        " d.append(window.localllmRenderMarkdown(t)); return d.textContent; }",
        expected,
    )
    assert reply.text_content() == rendered
    assert page.locator(".msg.assistant ol li").count() == 3  # "1. Red ..." became a list
    assert "in ·" in page.text_content("#status")


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}


def test_tool_calls_are_shown_readably_and_not_run(page, server: RunningServer) -> None:
    ask = "What is the weather in Paris?"
    page.goto(server.url)
    page.wait_for_selector("body[data-state=idle]")
    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "64")
    page.fill("#tools", json.dumps([WEATHER]))
    page.fill("#input", ask)
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=120_000)
    request = urllib.request.Request(
        f"{server.url}/v1/chat/completions",
        data=json.dumps(
            {
                "messages": [{"role": "user", "content": ask}],
                "tools": [WEATHER],
                "temperature": 0,
                "max_tokens": 64,
            }
        ).encode(),
    )
    with urllib.request.urlopen(request) as resp:
        [call] = json.loads(resp.read())["choices"][0]["message"]["tool_calls"]
    assert page.text_content(".msg.assistant .tool-name") == "tool call · get_weather"
    shown = page.text_content(".msg.assistant .tool-call pre")
    assert shown == json.dumps(json.loads(call["function"]["arguments"]), indent=2)
    assert "tool calls (not run by this page)" in page.text_content("#status")
    assert page.locator(".msg").count() == 2  # nothing ran: no further turn appeared


def test_the_stop_button_ends_the_reply_and_frees_the_slot(page, server: RunningServer) -> None:
    page.goto(server.url)
    page.wait_for_selector("body[data-state=idle]")
    page.click("#settings summary")
    page.fill("#max-tokens", "900")
    page.fill("#input", "Write a very long story about a dragon and a knight.")
    page.click("#send")
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant')?.textContent.length > 40", timeout=60000
    )
    assert health(server)["slots_busy"] == 1
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-done='1']")
    assert "[stopped]" in page.text_content(".msg.assistant .note")
    deadline = time.monotonic() + 10
    while health(server)["slots_busy"] != 0:
        assert time.monotonic() < deadline, "the stopped reply still holds its slot"
        time.sleep(0.05)


def test_markdown_is_rendered_without_raw_html(page, server: RunningServer) -> None:
    page.goto(server.url)
    page.wait_for_selector("body[data-state=idle]")
    hostile = (
        '<img src=x onerror="window.pwned=1"> **bold** and `<b>code</b>`\n'
        "[safe](https://example.org/a) [evil](javascript:window.pwned=2)\n"
        "```\n<script>window.pwned=3</script>\n```"
    )
    page.evaluate(
        "(t) => { const d = document.createElement('div'); d.id = 'probe';"
        " d.append(window.localllmRenderMarkdown(t)); document.body.append(d); }",
        hostile,
    )
    probe = page.locator("#probe")
    assert probe.locator("img, script").count() == 0
    assert probe.locator("strong").text_content() == "bold"
    assert probe.locator("code").first.text_content() == "<b>code</b>"
    links = probe.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.org/a"
    assert "[evil](javascript:window.pwned=2)" in probe.text_content()
    assert "<img src=x" in probe.text_content()
    assert page.evaluate("window.pwned") is None


def test_the_page_asks_for_the_api_key(page, server: RunningServer, options: ServeOptions) -> None:
    with start_server(replace(options, port=0, api_key="sekret"), engine=server.engine) as keyed:
        page.goto(keyed.url)
        page.wait_for_selector("#key-row", state="visible")
        assert "API key" in page.text_content("#status")
        page.fill("#api-key", "sekret")
        page.press("#api-key", "Tab")  # change event
        page.wait_for_function(
            "() => document.querySelector('#model').textContent.includes('slot')"
        )


def test_the_page_is_served_with_a_strict_content_security_policy(server: RunningServer) -> None:
    with urllib.request.urlopen(server.url + "/") as resp:
        policy = resp.headers["Content-Security-Policy"]
        page_html = resp.read().decode()
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert "http" not in page_html.replace("http-equiv", "")  # no CDN: every asset is ours
