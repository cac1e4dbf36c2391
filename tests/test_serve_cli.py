"""`localllm serve` as a user starts it: the real CLI process, the real model, loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, free_port

pytestmark = pytest.mark.slow


def _get(url: str, data: dict | None = None) -> dict:
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_serve_answers_as_chat_does_and_stops_on_ctrl_c(cli, store_with_smollm2: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "localllm", "serve", "--port", str(port), "--parallel", "2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                models = _get(f"http://127.0.0.1:{port}/v1/models")
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("serve did not answer")
        meta = models["data"][0]["meta"]
        # --ctx defaults to chat's per-slot context (min(trained 8192, 4096)) times the slots.
        assert (meta["n_parallel"], meta["n_ctx_slot"], meta["n_ctx"]) == (2, 4096, 8192)
        question = "Name three colours."
        reply = _get(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {"messages": [{"role": "user", "content": question}], "temperature": 0,
             "seed": 1, "max_tokens": 24},
        )  # fmt: skip
        text = reply["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "serving smollm2-135m on http://127.0.0.1:" in err and "2 slots x 4096" in err
    chat = cli("chat", "-p", question, "--temp", "0", "--seed", "1", "--max-tokens", "24")
    assert chat.exit_code == 0
    assert chat.stdout == text + "\n"


def test_serve_refuses_a_public_address_without_a_key(cli, store_with_smollm2: Path) -> None:
    result = cli("serve", "--host", "0.0.0.0", "--port", str(free_port()), timeout=60)
    assert result.exit_code != 0
    assert "--api-key" in result.error_line and "--insecure" in result.error_line
