#!/usr/bin/env python3
"""Prompt and generation speed through llama.cpp's RPC backend: local vs 2 servers.

Every configuration runs llama-bench's own loops (``localllm.runtime.llama_bench``: one
model load, a fresh context per test, a warm-up, then ``--reps`` timed repetitions of
pp512 and tg128 from a cleared cache) in one client process, the repetitions taken
round-robin across configurations:

- ``local``: the whole model on this machine's CPU;
- ``rpc x2``: every layer on two ``localllm rpc-server`` processes on 127.0.0.1 (only the
  token embeddings stay local, as with llama.cpp's ``--rpc ... -ngl 99``);
- ``rpc x2 +D ms``: the same servers behind a delay line that adds D ms to every round
  trip (D/2 each way, data kept in order and pipelined like ``tc netem delay``).

The delay line is a userspace TCP proxy because this machine's kernel has no netem
qdisc; the round trip of one small RPC command through it is measured and printed. With
``--native`` llama.cpp's own llama-bench (``benchmarks/build/bin``) measures local and
``--rpc`` runs against the same servers, as a reference. Run it alone on the machine:

    flock /tmp/localllm-cpu.lock .venv/bin/python benchmarks/rpc.py --native
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Queue

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
NATIVE_BENCH = REPO / "benchmarks" / "build" / "bin" / "llama-bench"
SERVE = (
    "import sys; from localllm.rpc.hosts import RpcServerOptions, serve; "
    "s = serve(RpcServerOptions(port=int(sys.argv[1]), threads=int(sys.argv[2]))); "
    "print('listening', flush=True); s.wait()"
)


@dataclass(frozen=True)
class Row:
    config: str
    test: str  # pp512 | tg128
    tokens_per_second: float
    stddev: float
    samples: tuple[float, ...]
    source: str  # localllm | llama-bench


# ------------------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def rpc_servers(count: int, threads: int) -> Iterator[list[str]]:
    """``count`` ``localllm rpc-server`` equivalents, each its own process, killed after."""
    procs, endpoints = [], []
    try:
        for _ in range(count):
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-c", SERVE, str(port), str(threads)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd=REPO,
            )
            procs.append(proc)
            assert proc.stdout is not None
            while not (line := proc.stdout.readline()).startswith("listening"):
                if not line:
                    raise SystemExit(f"the RPC server on port {port} did not start")
            # ggml prints a line per client: keep reading so the pipe never fills.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            endpoints.append(f"127.0.0.1:{port}")
        yield endpoints
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


class DelayLine:
    """A TCP proxy: each byte reaches the other side ``delay_ms / 2`` later, in order.

    Threads, not asyncio: epoll's millisecond timeouts would round a 0.5 ms wait up.
    """

    def __init__(self, target: str, delay_ms: float) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.one_way = delay_ms / 2000.0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            upstream = socket.create_connection(self.target)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst in ((client, upstream), (upstream, client)):
                queue: Queue[tuple[float, bytes]] = Queue()
                threading.Thread(target=self._read, args=(src, queue), daemon=True).start()
                threading.Thread(target=self._write, args=(dst, queue), daemon=True).start()

    def _read(self, src: socket.socket, queue: Queue[tuple[float, bytes]]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 20):
                queue.put((time.perf_counter() + self.one_way, data))
        queue.put((0.0, b""))

    def _write(self, dst: socket.socket, queue: Queue[tuple[float, bytes]]) -> None:
        with contextlib.suppress(OSError):
            while True:
                due, data = queue.get()
                if not data:
                    break
                while (wait := due - time.perf_counter()) > 0:
                    time.sleep(wait)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def measured_rtt_ms(endpoint: str, samples: int = 50) -> float:
    """Median round trip of one small RPC command (DEVICE_COUNT) after a handshake, in ms."""
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def command(cmd: int, payload: bytes) -> None:
            # ggml-rpc.cpp: | cmd u8 | size u64 | payload |, reply | size u64 | payload |
            sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
            (size,) = struct.unpack("<Q", sock.recv(8, socket.MSG_WAITALL))
            sock.recv(size, socket.MSG_WAITALL)

        command(14, bytes(24))  # HELLO with no transport capabilities
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            command(15, b"")  # DEVICE_COUNT
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


# ------------------------------------------------------------------------------- timing


TESTS = (("pp512", 512, 0), ("tg128", 0, 128))


def bench(
    model: Path, configs: dict[str, list[str]], reps: int, threads: int, repack: bool = True
) -> dict[str, dict[str, list[float]]]:
    """pp512 and tg128 tokens/s samples per configuration, with llama-bench's loops.

    Every configuration (its own servers: each serves one client at a time) has its model
    loaded at once, and the repetitions go round-robin over them, so a slow spell of the
    machine hits all alike. All layers go to the endpoints, none when there are none.
    """
    from localllm.runtime.llama_bench import BenchModel, ContextConfig
    from localllm.runtime.rpc_devices import add_rpc_servers, model_devices

    models = {}
    for label, endpoints in configs.items():
        devices = add_rpc_servers(endpoints) if endpoints else ()
        with model_devices(devices) if devices else contextlib.nullcontext():
            # repack: llama.cpp's CPU_REPACK of this machine's weights (llama-bench --repack);
            # an RPC server's buffers are never repacked.
            models[label] = BenchModel(model, repack=repack)
    results: dict[str, dict[str, list[float]]] = {label: {} for label in configs}
    try:
        for name, n_prompt, n_gen in TESTS:
            config = ContextConfig(n_ctx=n_prompt + n_gen, n_threads=threads, flash_attn="on")
            contexts = {label: m.new_context(config) for label, m in models.items()}
            try:
                for ctx in contexts.values():
                    ctx.warmup(n_prompt, n_gen)
                for _ in range(reps):
                    for label, ctx in contexts.items():
                        ctx.clear()
                        ns = ctx.timed_run(n_prompt, n_gen)
                        results[label].setdefault(name, []).append((n_prompt + n_gen) / ns * 1e9)
            finally:
                for ctx in contexts.values():
                    ctx.close()
    finally:
        for m in models.values():
            m.close()
    return results


def native(model: Path, endpoints: list[str], reps: int, threads: int) -> dict[str, list[float]]:
    """The same two tests through llama.cpp's own llama-bench (JSON samples)."""
    cmd = [str(NATIVE_BENCH), "-m", str(model), "-p", "512", "-n", "128", "-r", str(reps)]
    cmd += ["-t", str(threads), "-fa", "1", "-o", "json"]
    if endpoints:
        cmd += ["--rpc", ",".join(endpoints), "-ngl", "99"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True)
    results = {}
    for test in json.loads(proc.stdout):
        name = f"pp{test['n_prompt']}" if test["n_prompt"] else f"tg{test['n_gen']}"
        results[name] = [float(x) for x in test["samples_ts"]]
    return results


def rows(config: str, samples: dict[str, list[float]], source: str) -> list[Row]:
    out = []
    for test, values in samples.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(Row(config, test, statistics.mean(values), sd, tuple(values), source))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="threads of the client")
    parser.add_argument("--server-threads", type=int, help="threads of each server (--threads)")
    parser.add_argument("--delays", default="1,5", help="added round trips in ms (0: none)")
    parser.add_argument("--native", action="store_true", help="also run native llama-bench")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument(
        "--repack", choices=("0", "1"), default="1", help="local weights repacked (llama-bench)"
    )
    args = parser.parse_args()
    delays = [float(d) for d in args.delays.split(",") if d.strip() and float(d) > 0]

    table: list[Row] = []
    server_threads = args.server_threads or args.threads
    with rpc_servers(2 * (1 + len(delays)), server_threads) as endpoints:
        pairs = [endpoints[i : i + 2] for i in range(0, len(endpoints), 2)]
        configs: dict[str, list[str]] = {"local": []}
        configs[f"rpc x2 (round trip {measured_rtt_ms(pairs[0][0]):.2f} ms)"] = pairs[0]
        for delay, pair in zip(delays, pairs[1:], strict=True):
            proxied = [DelayLine(e, delay).endpoint for e in pair]
            rtt = measured_rtt_ms(proxied[0])
            configs[f"rpc x2 +{delay:g} ms (round trip {rtt:.2f} ms)"] = proxied
        for label, samples in bench(
            args.model, configs, args.reps, args.threads, args.repack == "1"
        ).items():
            table += rows(label, samples, "localllm")
        if args.native:
            table += rows("local", native(args.model, [], args.reps, args.threads), "llama-bench")
            samples = native(args.model, pairs[0], args.reps, args.threads)
            table += rows("rpc x2", samples, "llama-bench")

    print(f"model {args.model.name}, {args.threads} client threads, ", end="")
    print(f"{server_threads} per server, {args.reps} reps\n")
    print("| config | test | t/s (mean ± sd) | t/s (median) | ms/token (median) | source |")
    print("|---|---|---:|---:|---:|---|")
    for row in table:
        median = statistics.median(row.samples)
        mean = f"{row.tokens_per_second:.2f} ± {row.stddev:.2f}"
        print(
            f"| {row.config} | {row.test} | {mean} | {median:.2f} | {1000 / median:.2f} |", end=""
        )
        print(f" {row.source} |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in table], indent=1) + "\n")


if __name__ == "__main__":
    main()
