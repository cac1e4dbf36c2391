"""`localllm rpc-server` and `chat --rpc`, as a user runs them: two processes on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import free_port, start_rpc_server

pytestmark = pytest.mark.slow

GREEDY = ["--temp", "0", "--seed", "1", "--max-tokens", "24", "--no-history"]


@pytest.fixture
def rpc_server() -> object:
    port, proc = start_rpc_server(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield port, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)


def test_chat_through_an_rpc_server_answers_as_local(
    cli, store_with_smollm2: Path, rpc_server: tuple[int, subprocess.Popen]
) -> None:
    port, _ = rpc_server
    local = cli("chat", "-p", "Name three colours.", *GREEDY)
    remote = cli("chat", "-p", "Name three colours.", *GREEDY, "--rpc", f"127.0.0.1:{port}",
                 "-ngl", "20")  # fmt: skip
    assert local.exit_code == 0 and remote.exit_code == 0, remote.stderr
    # The same CPU kernels on both sides and f32 activations on the wire: the same reply.
    assert remote.stdout == local.stdout
    assert "--rpc: layers go to the RPC servers" in remote.stderr


def test_rpc_server_exits_0_on_ctrl_c(rpc_server: tuple[int, subprocess.Popen]) -> None:
    _, proc = rpc_server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0


def test_a_dead_endpoint_is_one_line_within_seconds(cli, store_with_smollm2: Path) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    result = cli("chat", "-p", "hi", "--rpc", f"127.0.0.1:{port}", timeout=60)
    assert result.exit_code == 1
    assert f"127.0.0.1:{port}" in result.error_line
    assert time.monotonic() - started < 30  # refused before any model loads


def test_rpc_server_listens_on_loopback_by_default(
    rpc_server: tuple[int, subprocess.Popen],
) -> None:
    port, proc = rpc_server
    listening = [
        line for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
    ]  # fmt: skip
    assert listening and all(line.split()[1].startswith("0100007F:") for line in listening)
    assert proc.poll() is None and os.path.exists(f"/proc/{proc.pid}")
