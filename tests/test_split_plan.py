"""A model across hosts: kv-calc's per-host plan, the memory check, bench and ppl with --rpc.

Two `localllm rpc-server` processes on 127.0.0.1 (free ports) serve this machine's CPU.
The references are independent of the plan's code: llama.cpp's own log of a real load
through the same servers, gguf-py's reading of the tensor table, and llama.cpp's layer
rule written out here (with -ngl N of L layers, layers L + 1 - N .. L go to the devices;
L is the output layer).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from conftest import REPO, start_rpc_server
from support.gguf_files import tensor_bytes_by_layer

from localllm.bench.record import RpcSplit
from localllm.chat.history import sessions_dir
from localllm.errors import InvalidArgument
from localllm.flags import parse_tensor_split
from localllm.plan.split import layer_of_tensor

MIB = 1 << 20
SMOL_LAYERS = 30
SMOL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------------ fast


def test_tensors_go_with_their_layer() -> None:
    assert layer_of_tensor("blk.7.attn_q.weight", 30) == 7
    assert layer_of_tensor("blk.29.ffn_down.weight", 30) == 29
    assert layer_of_tensor("token_embd.weight", 30) is None  # the input layer: this CPU
    assert layer_of_tensor("output.weight", 30) == 30
    assert layer_of_tensor("output_norm.weight", 30) == 30


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("a,b", "'a,b'"),
        ("-1,2", "non-negative"),
        ("0,0", "at least one above 0"),
        ("1,1,1", "one per server"),
        ("nan,1", "non-negative"),
    ],
)
def test_tensor_split_errors_name_the_value(text: str, named: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_tensor_split(text, ("127.0.0.1:1", "127.0.0.1:2"))
    assert named in str(info.value) and "\n" not in str(info.value)


def test_tensor_split_reads_llama_cpps_comma_or_slash() -> None:
    assert parse_tensor_split("3,1", ("a:1", "b:2")) == (3.0, 1.0)
    assert parse_tensor_split("3/1", ("a:1", "b:2")) == (3.0, 1.0)
    with pytest.raises(InvalidArgument, match="add --rpc"):
        parse_tensor_split("1", ())


def test_bench_split_fields_as_llama_bench_writes_them() -> None:
    split = RpcSplit(
        ("127.0.0.1:5",), 20, (3.0, 1.0), (("CPU", tuple(range(11))), ("RPC0", (11, 12, 30)))
    )
    assert split.tensor_split_field == "3.00/1.00"  # llama-bench: %.2f joined by "/"
    assert RpcSplit((), -1, (), ()).tensor_split_field == "0.00"
    assert split.layer_split_field == "CPU 0-10/RPC0 11-12,30"


@pytest.mark.parametrize("flags", [("--tensor-split", "1,1"), ("-ngl", "20")])
def test_kv_calc_split_flags_without_rpc_are_refused(cli, flags: tuple[str, str]) -> None:
    result = cli("kv-calc", "llama-2-7b", *flags)
    assert result.exit_code == 2
    assert "add --rpc" in result.error_line


# ------------------------------------------------------------------ with servers (slow)


@pytest.fixture(scope="module")
def servers() -> Iterator[str]:
    """Two rpc-server processes; yields their --rpc value."""
    started = [start_rpc_server(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(2)]  # fmt: skip
    yield ",".join(f"127.0.0.1:{port}" for port, _ in started)
    for _, proc in started:
        proc.kill()
        proc.wait(timeout=10)


def _kv_calc_json(cli, *args: str) -> dict:
    result = cli("kv-calc", SMOL, *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_kv_calc_split_is_the_split_a_real_load_makes(
    cli, servers: str, smollm2_path: Path
) -> None:
    from localllm.runtime.llama import load_model
    from localllm.runtime.params import LoadOptions
    from localllm.runtime.rpc_devices import add_rpc_servers, model_devices
    from localllm.runtime.rpc_plan import parse_placement

    plan = _kv_calc_json(cli, "--rpc", servers, "-ngl", "20", "--ctx", "512")
    hosts = plan["plans"][0]["hosts"]
    first, second = servers.split(",")
    assert [h["host"] for h in hosts] == ["this machine", first, second]
    # llama.cpp's rule: -ngl 20 of 30 layers + output -> layers 11..30 on the devices,
    # split evenly between two servers of equal memory.
    assert hosts[0]["layers"] == list(range(11))
    assert hosts[1]["layers"] + hosts[2]["layers"] == list(range(11, SMOL_LAYERS + 1))
    # Weights from gguf-py's tensor table; the output layer holds a copy of token_embd.
    layers, others = tensor_bytes_by_layer(smollm2_path)
    assert (
        hosts[0]["weights_bytes"] == sum(layers[i] for i in range(11)) + others["token_embd.weight"]
    )
    # A real load through the same servers (after the CLI exits: one client at a time).
    devices = add_rpc_servers(servers.split(","))
    with model_devices(devices):
        model = load_model(smollm2_path, LoadOptions(n_ctx=512, n_gpu_layers=20, n_threads=2))
    try:
        logged = {s.endpoint: s for s in parse_placement(model.load_log, devices) if s.endpoint}
    finally:
        model.close()
    for host in hosts[1:]:
        real = logged[host["host"]]
        # llama.cpp logs MiB with 2 decimals.
        assert abs(host["weights_bytes"] - real.weights_bytes) <= 0.006 * MIB, host["host"]
        assert abs(host["kv_bytes"] - real.kv_bytes) <= 0.006 * MIB, host["host"]
        assert abs(host["compute_bytes"] - real.compute_bytes) <= 0.006 * MIB, host["host"]


@pytest.mark.slow
def test_a_model_too_big_here_fits_across_hosts(
    cli, servers: str, store_with_smollm2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's example, scaled down: 60 MiB here, SmolLM2 at 4096 tokens needs more."""
    monkeypatch.setenv("LOCALLLM_AVAILABLE_MEMORY", "60MiB")
    alone = _kv_calc_json(cli, "--ctx", "4096")
    assert alone["rows"][0]["verdict"] == "too big"
    split = _kv_calc_json(cli, "--rpc", servers, "--ctx", "4096")["plans"][0]
    assert split["fits"] and split["hosts"][0]["verdict"] == "fits"
    assert split["hosts"][0]["layers"] == []  # -ngl -1: every layer on the servers

    local = cli("chat", "-p", "hi", "--max-tokens", "4", "--no-history")
    assert local.exit_code == 1 and "is available" in local.error_line
    remote = cli("chat", "-p", "hi", "--max-tokens", "4", "--no-history", "--rpc", servers)
    assert remote.exit_code == 0, remote.stderr
    # Too many layers kept here: refused before loading, naming this machine.
    kept = cli("chat", "-p", "hi", "--no-history", "--rpc", servers, "-ngl", "2")
    last = kept.stderr.strip().splitlines()[-1]
    assert kept.exit_code == 1 and last.startswith("error: ") and "this machine's share" in last
    assert "Traceback" not in kept.stderr


@pytest.mark.slow
def test_budget_is_the_largest_context_every_host_holds(cli, servers: str) -> None:
    budget = 150 * MIB  # the output layer alone computes ~97 MiB of logits at ubatch 512
    data = _kv_calc_json(cli, "--rpc", servers, "-ngl", "20", "--budget", "150MiB")
    best = data["budget"]["ctx"]
    assert best % 256 == 0 and 256 <= best < 8192
    at = _kv_calc_json(cli, "--rpc", servers, "-ngl", "20", "--ctx", str(best))["plans"][0]
    above = _kv_calc_json(cli, "--rpc", servers, "-ngl", "20", "--ctx", str(best + 256))
    assert max(h["total_bytes"] for h in at["hosts"]) <= budget
    assert max(h["total_bytes"] for h in above["plans"][0]["hosts"]) > budget


@pytest.mark.slow
def test_bench_through_rpc_records_the_servers_and_the_split(
    cli, servers: str, store_with_smollm2: Path
) -> None:
    first = servers.split(",")[0]
    result = cli("bench", "-p", "16", "-n", "4", "-r", "1", "--no-warmup", "-o", "json",
                 "--rpc", first, "-ngl", "20")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["n_prompt"] for r in records] == [16, 0]
    for record in records:
        assert record["backends"] == "RPC"  # llama-bench --rpc's backends field
        assert record["n_gpu_layers"] == 20
        assert record["rpc_servers"] == first
        # 30 layers + output, -ngl 20: llama.cpp starts the offload at 31 - 20 = 11.
        assert record["layer_split"] == f"CPU 0-10/RPC0[{first}] 11-30"
        assert record["avg_ts"] > 0
    table = cli("bench", "-p", "0", "-n", "2", "-r", "1", "--no-warmup", "--rpc", first)
    assert table.exit_code == 0, table.stderr
    (row,) = [ln for ln in table.stdout.splitlines() if "tg2" in ln]
    assert row.split("|")[4].strip() == "RPC"  # the backend column, as llama-bench's


@pytest.mark.slow
def test_perplexity_through_rpc_equals_local_from_the_cli(
    cli, servers: str, store_with_smollm2: Path
) -> None:
    args = ("ppl", "-c", "128", "--chunks", "4", "--json")
    local = cli(*args)
    remote = cli(*args, "--rpc", servers, "-ngl", "20")
    assert local.exit_code == 0 and remote.exit_code == 0, remote.stderr
    a, b = json.loads(local.stdout)["ppl"], json.loads(remote.stdout)["ppl"]
    assert abs(b / a - 1) < 0.005  # the bound; the same CPU kernels give equality


@pytest.mark.slow
def test_a_server_killed_mid_reply_is_one_line_and_the_chat_is_kept(
    store_with_smollm2: Path,
) -> None:
    port, server = start_rpc_server(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env = {**os.environ, "COLUMNS": "200", "TERM": "xterm", "NO_COLOR": "1"}
        child = pexpect.spawn(
            sys.executable,
            ["-m", "localllm", "chat", "--rpc", f"127.0.0.1:{port}", "--temp", "0",
             "--max-tokens", "400", "--ctx", "2048"],
            env=env, cwd=str(REPO), encoding="utf-8", timeout=120, dimensions=(50, 200),
        )  # fmt: skip
        child.expect_exact(">>> ")
        child.sendline("Say hello.")
        child.expect(r"\d+ in(?: \(\d+ new\))? · \d+ out")
        child.expect_exact(">>> ")
        child.sendline("Write a long story about a lighthouse keeper.")
        child.expect_exact("lighthouse keeper.")  # the echo of the input
        child.expect(r"\w+ \w+ \w+")  # then the reply is streaming
        server.kill()
        started = time.monotonic()
        child.expect(pexpect.EOF)
        child.close()
        assert time.monotonic() - started < 30  # no hang
        assert child.exitstatus == 1 and child.signalstatus is None
        lines = [ln for ln in child.before.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1 and "RPC server stopped answering" in lines[0]
        assert "chat --resume" in lines[0]
        (saved,) = sessions_dir().glob("*.json")
        messages = json.loads(saved.read_text())["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]  # the completed turn
        assert messages[0]["content"] == "Say hello."
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)


def test_layer_lists_read_as_ranges() -> None:
    from localllm.text import format_ranges

    assert format_ranges([30, 0, 1, 2, 11, 12]) == "0-2,11-12,30"  # order does not matter
    assert format_ranges([5]) == "5" and format_ranges([]) == ""
    assert format_ranges(range(11), ", ") == "0-10"
