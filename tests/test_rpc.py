"""llama.cpp's RPC backend: endpoints, the in-process server, the handshake, a split model.

Servers run as separate processes on 127.0.0.1 (random free ports), started and killed by
the tests; fake servers speak just enough of the wire format to misbehave on purpose.
References are independent of the code under test: the kernel's socket table, the
pinned llama.cpp header, sysconf, hand arithmetic of llama.cpp's layer split, and the
same model run locally.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, free_port
from support.gguf_files import tensor_bytes_by_layer

from localllm.errors import InvalidArgument, RpcError
from localllm.rpc.hosts import (
    Endpoint,
    RpcServerOptions,
    hosts_memory,
    non_loopback_warning,
    parse_endpoints,
    serve,
)
from localllm.runtime.rpc_devices import check_endpoint

RPC_HEADER = (
    REPO / "benchmarks/build/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/include/ggml-rpc.h"
)
SERVE = (
    "import sys; from pathlib import Path; from localllm.rpc.hosts import RpcServerOptions, serve; "
    "cache = Path(sys.argv[2]) if len(sys.argv) > 2 else None; "
    "s = serve(RpcServerOptions(port=int(sys.argv[1]), threads=1, cache_dir=cache)); "
    "print('listening', flush=True); s.wait()"
)


class ServerProcess:
    """``localllm.rpc.hosts.serve`` in its own process, as ``localllm rpc-server`` will run it."""

    def __init__(self, cache: Path | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(self.port), *([str(cache)] if cache else [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        while not (line := self.proc.stdout.readline()).startswith("listening"):
            assert line, f"the RPC server did not start: {self.proc.stderr.read()}"  # type: ignore[union-attr]
        # ggml prints a line per client connection: drain so the pipe never fills.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def rpc_servers() -> Iterator[Callable[[int], list[ServerProcess]]]:
    started: list[ServerProcess] = []

    def start(count: int, cache: Path | None = None) -> list[ServerProcess]:
        servers = [ServerProcess(cache) for _ in range(count)]
        started.extend(servers)
        return servers

    yield start
    for server in started:
        server.kill()


def _hello(sock: socket.socket) -> bytes:
    """The client half of ggml-rpc's HELLO: cmd 14, u64 size, 24 bytes of capabilities."""
    sock.sendall(struct.pack("<BQ", 14, 24) + bytes(24))
    (size,) = struct.unpack("<Q", sock.recv(8, socket.MSG_WAITALL))
    return sock.recv(size, socket.MSG_WAITALL)


@contextlib.contextmanager
def fake_server(reply: Callable[[socket.socket], None]) -> Iterator[int]:
    """A listener on a free port that runs ``reply`` on each connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def loop() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn, contextlib.suppress(OSError):
                    reply(conn)

    threading.Thread(target=loop, daemon=True).start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()


def _assert_one_line(error: Exception, *names: str) -> None:
    text = str(error)
    assert "\n" not in text and text.strip() == text
    for name in names:
        assert name in text, text


# ---------------------------------------------------------------------- endpoints (fast)


def test_parse_endpoints_in_order_and_from_repeated_flags() -> None:
    assert parse_endpoints("127.0.0.1:50052, host-b.lan:1") == (
        Endpoint("127.0.0.1", 50052),
        Endpoint("host-b.lan", 1),
    )
    assert parse_endpoints(["10.0.0.2:50052", "10.0.0.3:65535"]) == (
        Endpoint("10.0.0.2", 50052),
        Endpoint("10.0.0.3", 65535),
    )
    assert str(Endpoint("10.0.0.2", 50052)) == "10.0.0.2:50052"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", ["HOST:PORT"]),
        ("gpu-box", ["'gpu-box'", "needs a port"]),
        (":50052", ["':50052'", "needs a host"]),
        ("a:", ["'a:'", "1-65535"]),
        ("a:0", ["'0'", "1-65535"]),
        ("a:65536", ["'65536'"]),
        ("a:5x", ["'5x'"]),
        ("a:1,,b:2", ["empty entry"]),
        ("a:1,a:1", ["a:1", "twice"]),
        ("[::1]:50052", ["IPv4 only"]),
        ("fe80::1:50052", ["IPv4 only"]),
        ("bad_host:1", ["'bad_host'"]),
        (",".join(f"10.0.0.{i}:1" for i in range(17)), ["17", "at most 16"]),
    ],
)
def test_parse_endpoints_errors_are_one_line(text: str, names: list[str]) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_endpoints(text)
    _assert_one_line(info.value, *names)


def test_server_defaults_are_llama_cpp_rpc_server_defaults_and_loopback() -> None:
    options = RpcServerOptions()
    # tools/rpc/rpc-server.cpp: host 127.0.0.1, port 50052.
    assert (options.host, options.port) == ("127.0.0.1", 50052)
    assert options.is_loopback
    assert non_loopback_warning(options) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20"])
def test_non_loopback_host_gets_the_warning(host: str) -> None:
    warning = non_loopback_warning(RpcServerOptions(host=host, port=50052))
    assert warning is not None and "\n" not in warning
    for fact in (f"{host}:50052", "no authentication", "no encryption", "trusted network"):
        assert fact in warning


@pytest.mark.parametrize(
    ("options", "names"),
    [
        (RpcServerOptions(host="localhost"), ["'localhost'", "IPv4"]),
        (RpcServerOptions(host="::1"), ["'::1'"]),
        (RpcServerOptions(port=0), ["--port 0"]),
        (RpcServerOptions(port=70000), ["--port 70000"]),
        (RpcServerOptions(threads=0), ["--threads 0"]),
    ],
)
def test_server_option_errors(options: RpcServerOptions, names: list[str]) -> None:
    with pytest.raises(InvalidArgument) as info:
        serve(options)
    _assert_one_line(info.value, *names)


def test_cache_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "cache"
    file.write_text("")
    with pytest.raises(InvalidArgument) as info:
        serve(RpcServerOptions(port=free_port(), cache_dir=file))
    _assert_one_line(info.value, str(file))


# ------------------------------------------------------------- handshake and servers (fast)


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of LISTEN sockets on ``port``, from the kernel's /proc/net/tcp."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _remote, state = line.split()[1:4]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: TCP_LISTEN
            found.append(socket.inet_ntoa(struct.pack("<I", int(address, 16))))
    return found


def test_default_server_listens_on_loopback_only(rpc_servers) -> None:
    (server,) = rpc_servers(1)
    assert _listening_addresses(server.port) == ["127.0.0.1"]


def test_handshake_reports_the_pinned_protocol_and_this_machines_ram(rpc_servers) -> None:
    (server,) = rpc_servers(1)
    (host,) = hosts_memory(parse_endpoints(server.endpoint))
    header = RPC_HEADER.read_text()
    version = [
        re.search(rf"#define RPC_PROTO_{part}_VERSION\s+(\d+)", header)[1]  # type: ignore[index]
        for part in ("MAJOR", "MINOR", "PATCH")
    ]
    assert host.protocol == ".".join(version)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # ggml-cpu on Linux: total = physical RAM, and "free" is reported as the same number.
    assert (host.devices, host.total_bytes, host.free_bytes) == (1, ram, ram)
    assert host.handshake_seconds < 1.0


def test_ggml_client_agrees_with_the_python_handshake(rpc_servers) -> None:
    from localllm.runtime.rpc_devices import rpc_device_memory

    (server,) = rpc_servers(1)
    (host,) = hosts_memory(parse_endpoints(server.endpoint))
    assert rpc_device_memory(server.endpoint) == (host.free_bytes, host.total_bytes)


def test_refused_endpoint_is_one_line_within_a_second() -> None:
    port = free_port()  # bound then closed: nothing listens there
    start = time.monotonic()
    with pytest.raises(RpcError) as info:
        hosts_memory([Endpoint("127.0.0.1", port)])
    assert time.monotonic() - start < 1.0
    _assert_one_line(info.value, f"127.0.0.1:{port}", "refused")


def test_dead_endpoint_never_reaches_ggml_abort() -> None:
    """ggml's own client aborts the process on a refused connection; ours must not."""
    port = free_port()
    code = textwrap.dedent(
        f"""
        from localllm.errors import RpcError
        from localllm.runtime.rpc_devices import add_rpc_servers
        try:
            add_rpc_servers(["127.0.0.1:{port}"])
        except RpcError as exc:
            print(exc)
        """
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert time.monotonic() - start < 10
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(f"RPC server 127.0.0.1:{port} refused")
    assert proc.stderr == ""


def test_silent_listener_times_out_on_the_handshake() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts (backlog), never answers
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(RpcError) as info:
            check_endpoint("127.0.0.1", port, timeout=0.5)
        assert 0.4 < time.monotonic() - start < 2.0
    _assert_one_line(info.value, f"127.0.0.1:{port}", "did not answer the handshake")


def test_a_server_serves_one_client_at_a_time(rpc_servers) -> None:
    (server,) = rpc_servers(1)
    with socket.create_connection(("127.0.0.1", server.port)) as first:
        assert len(_hello(first)) == 4 + 24  # rpc_msg_hello_rsp: version, padding, caps
        with pytest.raises(RpcError) as info:
            check_endpoint("127.0.0.1", server.port, timeout=0.5)
        _assert_one_line(info.value, server.endpoint, "another client")
    # The first client gone, the server answers again.
    assert check_endpoint("127.0.0.1", server.port).device_memory


@pytest.mark.parametrize(("major", "minor"), [(6, 1), (7, 9), (8, 0)])
def test_version_mismatch_is_refused(major: int, minor: int) -> None:
    def reply(conn: socket.socket) -> None:
        conn.recv(1 + 8 + 24, socket.MSG_WAITALL)
        conn.sendall(struct.pack("<Q", 28) + bytes([major, minor, 0, 0]) + bytes(24))
        conn.recv(1)

    with fake_server(reply) as port, pytest.raises(RpcError) as info:
        check_endpoint("127.0.0.1", port, timeout=2)
    _assert_one_line(info.value, f"127.0.0.1:{port}", f"{major}.{minor}.0", "same llama.cpp")


def test_a_service_that_hangs_up_is_not_an_rpc_server() -> None:
    # Accepts, then closes at once.
    with fake_server(lambda conn: None) as port, pytest.raises(RpcError) as info:
        check_endpoint("127.0.0.1", port, timeout=2)
    _assert_one_line(info.value, f"127.0.0.1:{port}", "closed the connection")


def test_in_process_server_starts_answers_and_stops() -> None:
    port = free_port()
    server = serve(RpcServerOptions(port=port, threads=1))
    try:
        assert server.running and str(server.endpoint) == f"127.0.0.1:{port}"
        (host,) = hosts_memory([server.endpoint])
        assert host.devices == 1
        client = socket.create_connection(("127.0.0.1", port))
        _hello(client)  # stop() must also end a connection being served
    finally:
        server.stop()
        client.close()
    assert not server.running
    with pytest.raises(RpcError, match="refused"):
        check_endpoint("127.0.0.1", port, timeout=1)


def test_port_in_use_is_one_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(RpcError) as info:
            serve(RpcServerOptions(port=port, threads=1))
    _assert_one_line(info.value, f"127.0.0.1:{port}", "in use")


# ------------------------------------------------------------------- a split model (slow)

SMOL_LAYERS = 30
KV_BYTES_PER_LAYER_CELL = 2 * 3 * 64 * 2  # K and V, 3 KV heads x head dim 64, f16


def _mib(n: int) -> float:
    return round(n / 1024 / 1024, 2)  # llama.cpp logs buffer sizes as %.2f MiB


class CountingProxy:
    """Forwards TCP to ``target`` and counts the bytes sent to it (client -> server)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
                for src, dst, count in ((client, upstream, True), (upstream, client, False)):
                    args = (src, dst, count)
                    threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 20):
                if count:
                    with self._lock:
                        self.sent += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.mark.slow
def test_split_model_generates_exactly_as_local(smollm2_path: Path, rpc_servers) -> None:
    import numpy as np

    from localllm.runtime.llama import load_model
    from localllm.runtime.params import LoadOptions
    from localllm.runtime.rpc_devices import add_rpc_servers, model_devices
    from localllm.runtime.rpc_plan import parse_placement

    servers = rpc_servers(2)
    devices = add_rpc_servers([s.endpoint for s in servers])
    # 20 layers offloaded (the output layer and 19 repeating), the first 11 kept local.
    options = LoadOptions(n_ctx=512, seed=1, n_gpu_layers=20, n_threads=2)
    local = load_model(smollm2_path, options)
    with model_devices(devices):
        remote = load_model(smollm2_path, options)
    try:
        for prompt in ("The capital of France is", "Write a haiku about the sea."):
            texts = []
            for model in (local, remote):
                model.reset()
                out = model.llama.create_completion(prompt, max_tokens=48, temperature=0)
                texts.append(out["choices"][0]["text"])
            assert texts[0] == texts[1] and len(texts[0]) > 20
        logits = []
        for model in (local, remote):
            model.reset()
            model.llama.eval(model.tokenize("The quick brown fox jumps over the lazy dog. " * 6))
            logits.append(np.array(model.llama.scores[model.llama.n_tokens - 1]))
        # Same CPU code on both sides, activations copied as f32: bit for bit.
        assert np.array_equal(logits[0], logits[1])

        shares = {s.device: s for s in parse_placement(remote.load_log, devices)}
        # llama.cpp's split: layers from 31 - 20 = 11 go remote, cut at the 50/50 point of
        # equal free memory: 11..20 on the first server, 21..29 and the output on the second.
        layers, others = tensor_bytes_by_layer(smollm2_path)
        first, second = devices
        assert shares[first.name].endpoint == servers[0].endpoint
        expected = {
            first.name: sum(layers[i] for i in range(11, 21)),
            # Tied embeddings: the output layer is a copy of token_embd on its device.
            second.name: sum(layers[i] for i in range(21, 30))
            + others["token_embd.weight"]
            + others["output_norm.weight"],
        }
        for name, weights in expected.items():
            assert _mib(shares[name].weights_bytes) == pytest.approx(_mib(weights), abs=0.011)
        kv = {"CPU": 11, first.name: 10, second.name: 9}
        for name, n_layers in kv.items():
            expected_kv = n_layers * 512 * KV_BYTES_PER_LAYER_CELL
            assert _mib(shares[name].kv_bytes) == _mib(expected_kv)
            assert shares[name].compute_bytes > 0
    finally:
        local.close()
        remote.close()


@pytest.mark.slow
def test_perplexity_through_rpc_equals_local(smollm2_path: Path, rpc_servers) -> None:
    from localllm.ppl.perplexity import PerplexityResult, iter_perplexity
    from localllm.runtime.params import LoadOptions
    from localllm.runtime.rpc_devices import add_rpc_servers, model_devices

    servers = rpc_servers(2)
    devices = add_rpc_servers([s.endpoint for s in servers])
    options = LoadOptions(n_gpu_layers=-1, n_threads=2)
    local = list(iter_perplexity(str(smollm2_path), None, ctx=128, chunks=4, options=options))
    with model_devices(devices):
        remote = list(iter_perplexity(str(smollm2_path), None, ctx=128, chunks=4, options=options))
    a, b = local[-1], remote[-1]
    assert isinstance(a, PerplexityResult) and isinstance(b, PerplexityResult)
    assert a.tokens == b.tokens > 0
    assert b.ppl == a.ppl  # the issue asks for 0.5%; the same CPU code gives the same bits


@pytest.mark.slow
def test_dry_run_places_layers_without_sending_weights(smollm2_path: Path, rpc_servers) -> None:
    from localllm.runtime.dry_run import DryRunSettings
    from localllm.runtime.llama import load_model
    from localllm.runtime.params import LoadOptions
    from localllm.runtime.rpc_devices import add_rpc_servers, model_devices
    from localllm.runtime.rpc_plan import SplitDryRun

    servers = rpc_servers(2)
    proxies = [CountingProxy(s.endpoint) for s in servers]
    devices = add_rpc_servers([p.endpoint for p in proxies])
    with SplitDryRun(smollm2_path, devices, n_gpu_layers=20) as dry:
        shares = dry.plan(DryRunSettings(512)).shares
    sent_planning = sum(p.sent for p in proxies)

    by_name = {s.device: s for s in shares}
    first, second = devices
    assert by_name["CPU"].layers == tuple(range(11))
    assert by_name[first.name].layers == tuple(range(11, 21))
    assert by_name[second.name].layers == (*range(21, 30), SMOL_LAYERS)  # 30: the output
    assert by_name[second.name].kv_layers == tuple(range(21, 30))
    assert all(s.weights_bytes == 0 and s.kv_bytes == 0 for s in shares)  # nothing allocated
    assert all(s.compute_bytes > 0 for s in shares)

    layers, others = tensor_bytes_by_layer(smollm2_path)
    remote_weights = sum(layers[i] for i in range(11, 30)) + others["token_embd.weight"]
    assert sent_planning < 1024 * 1024  # queries only, against ~69 MiB of weights
    with model_devices(devices):
        model = load_model(smollm2_path, LoadOptions(n_ctx=512, n_gpu_layers=20, n_threads=2))
    model.close()
    assert sum(p.sent for p in proxies) - sent_planning > remote_weights


@pytest.mark.slow
def test_server_cache_skips_resending_large_tensors(
    smollm2_path: Path, rpc_servers, tmp_path: Path
) -> None:
    from localllm.runtime.llama import load_model
    from localllm.runtime.params import LoadOptions
    from localllm.runtime.rpc_devices import add_rpc_servers, model_devices

    cache = tmp_path / "rpc-cache"
    (server,) = rpc_servers(1, cache)
    proxy = CountingProxy(server.endpoint)
    devices = add_rpc_servers([proxy.endpoint])
    sent = []
    for _ in range(2):
        before = proxy.sent
        with model_devices(devices):
            load_model(smollm2_path, LoadOptions(n_ctx=256, n_gpu_layers=-1, n_threads=1)).close()
        sent.append(proxy.sent - before)
    # ggml-rpc.cpp: tensors over 10 MiB go by hash (HASH_THRESHOLD) and are cached on the
    # server; in SmolLM2 that is only the output layer's copy of token_embd.
    _layers, others = tensor_bytes_by_layer(smollm2_path)
    assert others["token_embd.weight"] > 10 * 1024 * 1024
    assert sent[0] - sent[1] == pytest.approx(others["token_embd.weight"], rel=0.01)
    assert [p.stat().st_size for p in cache.rglob("*") if p.is_file()] == [
        others["token_embd.weight"]
    ]


CLIENT = """
import os, sys, threading
from localllm.runtime.llama import load_model
from localllm.runtime.params import LoadOptions
from localllm.runtime.rpc_devices import add_rpc_servers, model_devices
from localllm.runtime.rpc_server import install_abort_handler

model_path, endpoint, server_pid, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
devices = add_rpc_servers([endpoint])
main = threading.get_ident()

def handler(message):
    # ggml calls abort() when this returns: save, report, leave.
    with open(out + ".abort", "w") as f:
        f.write(("main" if threading.get_ident() == main else "other") + "\\n" + message)
    os._exit(3)

install_abort_handler(handler)
with model_devices(devices):
    model = load_model(model_path, LoadOptions(n_ctx=256, n_gpu_layers=-1, n_threads=1))
with open(out, "w") as transcript:
    stream = model.llama.create_completion("Once upon a time", max_tokens=200, temperature=0,
                                           stream=True)
    for n, chunk in enumerate(stream):
        transcript.write(chunk["choices"][0]["text"])
        transcript.flush()
        if n == 5:
            os.kill(server_pid, 9)
print("finished without noticing", flush=True)
"""


@pytest.mark.slow
def test_server_killed_mid_generation_reaches_the_abort_handler(
    smollm2_path: Path, rpc_servers, tmp_path: Path
) -> None:
    (server,) = rpc_servers(1)
    out = tmp_path / "transcript.txt"
    args = [str(smollm2_path), server.endpoint, str(server.proc.pid), str(out)]
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert time.monotonic() - start < 60
    thread, message = Path(f"{out}.abort").read_text().split("\n", 1)
    # The RPC client's dispatcher thread fails, not the thread that called llama_decode.
    assert thread == "other"
    assert message.endswith("Remote RPC server crashed or returned malformed response")
    assert len(out.read_text()) > 0  # what was generated before the loss is kept
    assert "gdb" not in proc.stderr and "backtrace" not in proc.stderr.lower()


REGISTER = """
import sys
from localllm.runtime.llama import load_model
from localllm.runtime.params import LoadOptions
from localllm.runtime.rpc_devices import add_rpc_servers

add_rpc_servers([sys.argv[2]], register=True)  # as llama.cpp's --rpc: for every later load
model = load_model(sys.argv[1], LoadOptions(n_ctx=256, n_gpu_layers=-1, n_threads=1))
print("\\n".join(line for line in model.load_log if "model buffer size" in line))
"""


@pytest.mark.slow
def test_registered_servers_serve_default_loads(smollm2_path: Path, rpc_servers) -> None:
    """Registration must reach libllama's own ggml registry, not a second copy of ggml."""
    (server,) = rpc_servers(1)
    proc = subprocess.run(
        [sys.executable, "-c", REGISTER, str(smollm2_path), server.endpoint],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    layers, others = tensor_bytes_by_layer(smollm2_path)
    remote = sum(layers.values()) + others["token_embd.weight"] + others["output_norm.weight"]
    sizes = re.findall(r"RPC0\[(\S+)\] model buffer size =\s*([\d.]+) MiB", proc.stdout)
    assert [(endpoint, float(mib)) for endpoint, mib in sizes] == [(server.endpoint, _mib(remote))]
