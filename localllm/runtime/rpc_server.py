"""llama.cpp's RPC server run in this process, and ggml's abort hook.

``ggml_backend_rpc_start_server`` never returns: it runs in a daemon thread, and the
process ends it. ggml calls ``abort()`` after its abort callback returns, so the hook
is for saving state and reporting, not for recovering.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from localllm.errors import RpcError
from localllm.net import parse_host_port
from localllm.runtime.rpc_devices import ABORT_CALLBACK, rpc_libraries

__all__ = ["RpcServerThread", "install_abort_handler", "start_rpc_server"]

_DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type


class RpcServerThread:
    """llama.cpp's RPC server running in a daemon thread of this process (CPU device)."""

    def __init__(self, endpoint: str, thread: threading.Thread, listen_fd: int):
        self.endpoint = endpoint
        self._thread = thread
        self._listen_fd = listen_fd

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server ends (it only does on :meth:`stop`); True if it ended."""
        # Short joins so that Ctrl-C (KeyboardInterrupt) reaches the main thread.
        end = None if timeout is None else time.monotonic() + timeout
        while self._thread.is_alive():
            if end is not None and time.monotonic() >= end:
                return False
            self._thread.join(0.2)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """End the accept loop: shut its listening socket and any client connection down."""
        port = parse_host_port(self.endpoint)[1]
        for fd in _sockets():
            with contextlib.suppress(OSError):
                sock = socket.socket(fileno=os.dup(fd))
                with sock:
                    if fd == self._listen_fd or sock.getsockname()[1] == port:
                        # accept() and recv() in ggml's thread return; ggml then closes.
                        sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RpcError(f"the RPC server on {self.endpoint} did not stop within {timeout:g} s")


def _sockets() -> dict[int, str]:
    """This process's socket fds and their ``socket:[inode]`` names."""
    found = {}
    for entry in os.scandir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(entry.path)
            if target.startswith("socket:"):
                found[int(entry.name)] = target
    return found


def _new_listening_fd(host: str, port: int, before: set[str]) -> int | None:
    """A listening socket on (host, port) that did not exist in ``before``."""
    for fd, name in _sockets().items():
        if name in before:
            continue
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if listening and sock.getsockname() == (host, port):
                return fd
    return None


def start_rpc_server(
    host: str, port: int, threads: int, cache_dir: str | os.PathLike[str] | None = None
) -> RpcServerThread:
    """Start ``ggml_backend_rpc_start_server`` on this machine's CPU in a daemon thread.

    Returns once the server listens; an address ggml cannot bind is a one-line RpcError.
    ggml prints its banner and one line per client connection on stdout (C stdio).
    """
    endpoint = f"{host}:{port}"
    try:
        socket.inet_aton(host)
    except OSError:
        raise RpcError(f"RPC server address {host!r} must be an IPv4 address") from None
    if threads <= 0:
        raise RpcError(f"RPC server threads {threads} must be at least 1")
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    libs = rpc_libraries()
    cpu = libs.ggml.ggml_backend_dev_by_type(_DEVICE_TYPE_CPU)
    if not cpu:
        raise RpcError("ggml has no CPU device to serve")
    devices = (ctypes.c_void_p * 1)(cpu)
    cache = os.fsencode(os.fspath(cache_dir)) if cache_dir is not None else None

    def run() -> None:
        # Returns only when the address cannot be bound or the socket is shut down.
        libs.rpc.ggml_backend_rpc_start_server(endpoint.encode(), cache, threads, 1, devices)

    before = set(_sockets().values())  # this process may listen on the port itself
    thread = threading.Thread(target=run, name=f"rpc-server {endpoint}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        fd = _new_listening_fd(host, port, before)
        if fd is not None:
            return RpcServerThread(endpoint, thread, fd)
        if not thread.is_alive():
            raise RpcError(
                f"cannot listen on {endpoint}: the port is in use or the address is not "
                "on this machine; pick another --port or --host"
            )
        time.sleep(0.01)
    raise RpcError(f"the RPC server on {endpoint} did not start listening within 10 s")


# ---------------------------------------------------------------------------- ggml aborts

_abort_handler: Any = None  # the ctypes callback must stay referenced while installed


def install_abort_handler(handler: Callable[[str], None] | None) -> None:
    """Call ``handler(message)`` when ggml aborts (None restores ggml's own report).

    ggml calls ``abort()`` as soon as the handler returns: nothing can continue. The
    handler runs on whichever thread failed (for RPC, ggml's dispatcher thread) and may
    only save state, report, and end the process itself (``os._exit``).
    """
    global _abort_handler
    libs = rpc_libraries()
    if handler is None:
        libs.ggml.ggml_set_abort_callback(ABORT_CALLBACK())
        _abort_handler = None
        return

    def call(message: bytes | None) -> None:
        handler((message or b"").decode("utf-8", errors="replace"))

    _abort_handler = ABORT_CALLBACK(call)
    libs.ggml.ggml_set_abort_callback(_abort_handler)
