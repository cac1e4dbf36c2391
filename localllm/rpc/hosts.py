"""Split a model across machines with llama.cpp's RPC backend: endpoints, servers, memory.

``localllm rpc-server`` runs llama.cpp's RPC server in-process (:func:`serve`); ``--rpc``
names the servers a load uses (:func:`parse_endpoints`); :func:`hosts_memory` asks each
one, from Python and with a timeout, what memory it offers. Nothing here prints.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from localllm.errors import InvalidArgument, RpcError
from localllm.machine import physical_cores
from localllm.net import is_loopback, parse_host_port
from localllm.runtime import rpc_devices
from localllm.runtime.rpc_server import RpcServerThread, start_rpc_server

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "MAX_SERVERS",
    "Endpoint",
    "HostMemory",
    "RpcServer",
    "RpcServerOptions",
    "hosts_memory",
    "non_loopback_warning",
    "parse_endpoints",
    "serve",
]

DEFAULT_HOST = "127.0.0.1"  # llama.cpp's rpc-server default
DEFAULT_PORT = 50052
MAX_SERVERS = 16  # ggml-rpc.h: GGML_RPC_MAX_SERVERS (and llama_max_devices() here)
CHECK_TIMEOUT = 3.0  # seconds for connect + handshake + memory query, per server

# The facts llama.cpp's rpc-server prints for a non-loopback --host, in localllm's words.
NON_LOOPBACK_WARNING = (
    "warning: the RPC server on {endpoint} is reachable from the network. llama.cpp's RPC "
    "protocol has no authentication and no encryption: anyone who can reach it can use "
    "this machine's CPU and memory, send it crafted messages, and read the weights and "
    "activations it holds. Never expose it beyond a trusted network."
)


@dataclass(frozen=True)
class Endpoint:
    """One RPC server, ``host:port`` as llama.cpp's ``--rpc`` spells it."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.host)


def _parse_endpoint(item: str) -> Endpoint:
    return Endpoint(*parse_host_port(item))


def parse_endpoints(text: str | Sequence[str]) -> tuple[Endpoint, ...]:
    """``"h:p,h:p"`` (or several such strings) -> endpoints, in order, each once."""
    items = [text] if isinstance(text, str) else list(text)
    parts = [p.strip() for item in items for p in item.split(",")]
    if not any(parts):
        raise InvalidArgument("--rpc needs at least one HOST:PORT")
    endpoints: list[Endpoint] = []
    for part in parts:
        if not part:
            raise InvalidArgument(f"--rpc {','.join(items)!r} has an empty entry; drop the comma")
        endpoint = _parse_endpoint(part)
        if endpoint in endpoints:
            raise InvalidArgument(f"RPC server {endpoint} is listed twice; name each server once")
        endpoints.append(endpoint)
    if len(endpoints) > MAX_SERVERS:
        raise InvalidArgument(
            f"{len(endpoints)} RPC servers given; llama.cpp takes at most {MAX_SERVERS}"
        )
    return tuple(endpoints)


# ----------------------------------------------------------------------------- the server


@dataclass(frozen=True)
class RpcServerOptions:
    """How ``localllm rpc-server`` serves this machine's CPU to other hosts."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    threads: int | None = None  # None: physical cores
    cache_dir: Path | None = None  # llama.cpp's tensor cache: fast reloads of the same weights

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port)

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.host)

    def validate(self) -> None:
        try:
            ipaddress.IPv4Address(self.host)
        except ValueError:
            # ggml binds with inet_addr(): dotted IPv4 only, no names.
            raise InvalidArgument(
                f"--host {self.host!r} must be an IPv4 address, e.g. 127.0.0.1 or 0.0.0.0"
            ) from None
        if not 0 < self.port < 65536:
            raise InvalidArgument(f"--port {self.port} must be 1-65535")
        if self.threads is not None and self.threads <= 0:
            raise InvalidArgument(f"--threads {self.threads} must be at least 1")
        if self.cache_dir is not None and self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise InvalidArgument(f"--cache {self.cache_dir} exists and is not a directory")


def non_loopback_warning(options: RpcServerOptions) -> str | None:
    """The warning the CLI prints before serving beyond this machine; None on loopback."""
    if options.is_loopback:
        return None
    return NON_LOOPBACK_WARNING.format(endpoint=options.endpoint)


class RpcServer:
    """A running in-process RPC server: ``endpoint``, ``wait()``, ``stop()``."""

    def __init__(self, options: RpcServerOptions, threads: int, handle: RpcServerThread):
        self.options = options
        self.threads = threads
        self._handle = handle

    @property
    def endpoint(self) -> Endpoint:
        return self.options.endpoint

    @property
    def running(self) -> bool:
        return self._handle.running

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server ends; Ctrl-C raises KeyboardInterrupt here as usual."""
        return self._handle.wait(timeout)

    def stop(self) -> None:
        self._handle.stop()


def serve(options: RpcServerOptions) -> RpcServer:
    """Start llama.cpp's RPC server on this machine's CPU; returns once it listens."""
    options.validate()
    threads = options.threads or physical_cores()
    cache = options.cache_dir
    if cache is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidArgument(f"--cache {cache}: {exc.strerror or exc}") from None
    handle = start_rpc_server(
        options.host, options.port, threads, os.fspath(cache) if cache else None
    )
    return RpcServer(options, threads, handle)


# ------------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class HostMemory:
    """What one RPC server offers: its devices' memory, as ggml reports it.

    A CPU server on Linux reports free = total = its physical RAM (ggml-cpu says "free
    system memory is ill-defined"), so ``free_bytes`` is no measure of what is in use.
    """

    endpoint: Endpoint
    free_bytes: int
    total_bytes: int
    devices: int
    protocol: str  # e.g. "7.0.0"
    handshake_seconds: float


def hosts_memory(
    endpoints: Sequence[Endpoint], timeout: float = CHECK_TIMEOUT
) -> tuple[HostMemory, ...]:
    """Handshake with every server at once and ask its memory, over its own protocol.

    Within ``timeout`` seconds; the first failing server (in order) is a one-line RpcError.
    This is the check to run before ggml touches a server (ggml aborts on a dead one).
    """
    if not endpoints:
        return ()

    def one(endpoint: Endpoint) -> HostMemory | RpcError:
        try:
            info = rpc_devices.check_endpoint(endpoint.host, endpoint.port, timeout)
        except RpcError as exc:
            return exc
        return HostMemory(
            endpoint,
            info.free_bytes,
            info.total_bytes,
            len(info.device_memory),
            ".".join(map(str, info.version)),
            info.handshake_seconds,
        )

    with ThreadPoolExecutor(max_workers=min(len(endpoints), MAX_SERVERS)) as pool:
        results = list(pool.map(one, endpoints))
    for result in results:
        if isinstance(result, RpcError):
            raise result
    return tuple(r for r in results if isinstance(r, HostMemory))
