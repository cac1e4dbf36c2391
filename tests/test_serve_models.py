"""One `localllm serve`, several models: each answers as itself, swapped within the plan.

The real CLI process with SmolLM2 and a renamed copy of it (another file, another model
as far as the server knows), and LOCALLLM_AVAILABLE_MEMORY set so that only one of their
plans fits at a time; plus a header-only 7B whose plan alone is too big.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, free_port, run_cli
from support.gguf_files import gguf_reader, gguf_with_chat_template, write_header_gguf

from localllm.text import format_bytes

pytestmark = pytest.mark.slow

CTX = 512


def _call(url: str, data: dict | None = None) -> tuple[int, dict]:
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _statuses(url: str) -> dict[str, str]:
    _, body = _call(url + "/v1/models")
    return {card["id"]: card["status"]["value"] for card in body["data"]}


def _plan_bytes(path: Path) -> int:
    from localllm.gguf.spec import read_model_spec
    from localllm.plan.preload import plan_load

    return plan_load(path.name, read_model_spec(path), n_ctx=CTX).row.total_bytes


@pytest.fixture
def two_models(tmp_path: Path, smollm2_path: Path) -> tuple[Path, Path, Path]:
    template = str(gguf_reader(smollm2_path).get_field("tokenizer.chat_template").contents())
    other = gguf_with_chat_template(
        smollm2_path, tmp_path / "other-smol.gguf", template, general__name="Other Smol"
    )
    big = write_header_gguf(tmp_path / "big-7b.gguf", "llama-2-7b")
    return smollm2_path, other, big


@pytest.fixture
def server(two_models: tuple[Path, Path, Path]) -> Iterator[tuple[str, subprocess.Popen]]:
    first, other, big = two_models
    one = max(_plan_bytes(first), _plan_bytes(other))
    env = {**os.environ, "LOCALLLM_AVAILABLE_MEMORY": str(int(one * 1.5))}
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "localllm", "serve", str(first), str(other), str(big),
         "--port", str(port), "--ctx", str(CTX), "--keep-alive", "-1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                _statuses(url)
                break
            except OSError:
                time.sleep(0.2)
        else:
            proc.kill()
            pytest.fail(f"serve did not answer: {proc.communicate()[1]}")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)


def _ask(url: str, model: str | None) -> tuple[int, dict]:
    body = {"messages": [{"role": "user", "content": "Say hi."}], "temperature": 0,
            "max_tokens": 8}  # fmt: skip
    if model is not None:
        body["model"] = model
    return _call(url + "/v1/chat/completions", body)


def test_each_model_answers_as_itself_and_they_swap_within_the_plan(
    server: tuple[str, subprocess.Popen],
) -> None:
    url, _ = server
    smol, other, big = "smollm2-135m", "other-smol", "big-7b"
    assert _statuses(url) == {smol: "loaded", other: "unloaded", big: "unloaded"}

    status, reply = _ask(url, other)
    assert status == 200 and reply["model"] == other
    assert _statuses(url) == {smol: "unloaded", other: "loaded", big: "unloaded"}

    status, again = _ask(url, smol)
    assert status == 200 and again["model"] == smol
    assert _statuses(url) == {smol: "loaded", other: "unloaded", big: "unloaded"}
    # The copy holds the same weights: at temperature 0 both say the same.
    assert again["choices"][0]["message"] == reply["choices"][0]["message"]

    status, default = _ask(url, None)  # no model: the first
    assert status == 200 and default["model"] == smol

    status, unknown = _ask(url, "no-such-model")
    assert status == 404
    assert all(repr(name) in unknown["error"]["message"] for name in (smol, other, big))

    status, refused = _ask(url, big)
    assert status == 507 and refused["error"]["code"] == "insufficient_memory"
    assert "is available to this server" in refused["error"]["message"]
    assert "weights" in refused["error"]["message"] and "KV" in refused["error"]["message"]
    assert _statuses(url)[smol] == "loaded"  # a refused model evicts nothing

    _, card = _call(url + f"/v1/models/{other}")
    assert card["meta"]["n_ctx"] == CTX and card["meta"]["memory_bytes"] > 0

    metrics = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    assert f'localllm_model_loads_total{{model="{other}"}} 1' in metrics
    assert f'localllm_model_loads_total{{model="{smol}"}} 2' in metrics
    assert f'localllm_model_unloads_total{{model="{smol}"}} 1' in metrics
    assert f'localllm_model_loaded{{model="{big}"}} 0' in metrics
    seconds = re.search(rf'localllm_model_load_seconds_total{{model="{other}"}} (\S+)', metrics)
    assert seconds is not None and float(seconds.group(1)) > 0  # the load's own time


def test_ps_lists_what_servers_hold_and_stop_unloads(
    server: tuple[str, subprocess.Popen], smollm2_path: Path
) -> None:
    url, _ = server
    ps = run_cli("ps", "--json")
    assert ps.exit_code == 0, ps.stderr
    rows = {row["model_id"]: row for row in json.loads(ps.stdout)}
    assert rows["smollm2-135m"]["status"] == "loaded" and rows["smollm2-135m"]["server"] == url
    assert rows["other-smol"]["status"] == "unloaded"
    assert rows["smollm2-135m"]["n_ctx"] == CTX
    # The plan's total, as kv-calc and the pre-load check compute it (docs/serve.md's figure).
    plan = _plan_bytes(smollm2_path)
    assert rows["smollm2-135m"]["memory_bytes"] == plan

    table = run_cli("ps")
    assert table.exit_code == 0
    line = next(ln for ln in table.stdout.splitlines() if ln.startswith("smollm2-135m"))
    assert "loaded" in line and "forever" in line and url in line
    assert format_bytes(plan) in line

    stopped = run_cli("stop", "smollm2-135m")
    assert stopped.exit_code == 0, stopped.stderr
    assert f"smollm2-135m unloaded from {url}" in stopped.stderr
    assert _statuses(url)["smollm2-135m"] == "unloaded"

    again = run_cli("stop", "smollm2-135m")  # not loaded any more: said, non-zero
    assert again.exit_code == 1 and "is not loaded here" in again.stderr

    nothing = run_cli("stop", "no-such-model")
    assert nothing.exit_code == 2
    assert "no running server serves 'no-such-model'" in nothing.error_line


def test_a_server_that_stops_leaves_no_record(server: tuple[str, subprocess.Popen]) -> None:
    url, proc = server
    assert any(row["server"] == url for row in json.loads(run_cli("ps", "--json").stdout))
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert json.loads(run_cli("ps", "--json").stdout) == []
