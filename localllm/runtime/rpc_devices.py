"""llama.cpp's RPC backend: remote devices for a model load, and an in-process RPC server.

llama-cpp-python binds none of ``ggml-rpc.h``; the shipped ``libggml-rpc`` is loaded with
ctypes here. ggml's own RPC client calls ``GGML_ABORT`` (killing the process) when a
server cannot be reached, so :func:`check_endpoint` speaks the protocol's HELLO from pure
Python, with a timeout, before ggml ever touches an endpoint.

The wire format below is the one of ``ggml/src/ggml-rpc/ggml-rpc.cpp`` at the pinned
llama.cpp commit (protocol 7.0.0): a command byte, a little-endian u64 payload size, the
payload; replies are a u64 size and the payload. A server serves one client at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localllm.errors import RpcError
from localllm.net import parse_host_port
from localllm.runtime.library import import_llama_cpp

__all__ = [
    "ABORT_CALLBACK",
    "RPC_PROTO_MAJOR",
    "RPC_PROTO_MINOR",
    "RpcDevice",
    "RpcServerInfo",
    "add_rpc_servers",
    "attach_devices",
    "check_endpoint",
    "devices_array",
    "model_devices",
    "rpc_device_memory",
    "rpc_libraries",
    "rpc_load_devices",
]

# ggml-rpc.h: RPC_PROTO_MAJOR_VERSION / RPC_PROTO_MINOR_VERSION at the pinned commit.
RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
# enum rpc_cmd (ggml-rpc.cpp); HELLO is fixed at 14 across versions by a static_assert.
_CMD_GET_DEVICE_MEMORY = 11
_CMD_HELLO = 14
_CMD_DEVICE_COUNT = 15
_CONN_CAPS_SIZE = 24  # transport.h: RPC_CONN_CAPS_SIZE (all zero: plain TCP, no RDMA)
_DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type


@dataclass(frozen=True)
class RpcServerInfo:
    """What an RPC server said in a handshake: its protocol version and devices."""

    endpoint: str
    version: tuple[int, int, int]
    device_memory: tuple[tuple[int, int], ...]  # (free, total) bytes per device
    handshake_seconds: float

    @property
    def total_bytes(self) -> int:
        return sum(total for _free, total in self.device_memory)

    @property
    def free_bytes(self) -> int:
        return sum(free for free, _total in self.device_memory)


@dataclass(frozen=True)
class RpcDevice:
    """One ggml device of an RPC server, as llama.cpp will use it for a load."""

    endpoint: str
    index: int  # the device number on its server
    name: str  # ggml's name ("RPC0", "RPC1", ... numbered in the order they were added)
    handle: int  # ggml_backend_dev_t


# ------------------------------------------------------------------- the protocol, in Python


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    chunks, got = [], 0
    while got < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(size - got)
        if not chunk:
            raise ConnectionResetError("closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _command(sock: socket.socket, cmd: int, payload: bytes, deadline: float) -> bytes:
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8, deadline))
    if size > 1 << 16:  # no reply we send is this large: not an RPC server
        raise ValueError(f"reply of {size} bytes")
    return _recv_exact(sock, size, deadline)


def check_endpoint(host: str, port: int, timeout: float = 3.0) -> RpcServerInfo:
    """Connect, handshake and ask each device's memory, all within ``timeout`` seconds.

    Raises a one-line RpcError for a refused, silent, busy, foreign or version-mismatched
    server, so that ggml (which aborts the process on those) never sees it.
    """
    where = f"RPC server {host}:{port}"
    start = time.monotonic()
    deadline = start + timeout
    try:
        # IPv4 only, the first address: what ggml's client gets from gethostbyname().
        address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
        sock = socket.create_connection(address, timeout=timeout)
    except socket.gaierror:
        raise RpcError(f"{where}: cannot resolve host {host!r}; check the name") from None
    except ConnectionRefusedError:
        raise RpcError(
            f"{where} refused the connection; is `localllm rpc-server --port {port}` running there?"
        ) from None
    except TimeoutError:
        raise RpcError(
            f"{where} did not answer within {timeout:g} s; check the host and firewall"
        ) from None
    except OSError as exc:
        raise RpcError(f"{where} cannot be reached: {exc.strerror or exc}") from None
    with sock:
        try:
            hello = _command(sock, _CMD_HELLO, bytes(_CONN_CAPS_SIZE), deadline)
        except TimeoutError:
            raise RpcError(
                f"{where} accepted but did not answer the handshake within {timeout:g} s: "
                "it is serving another client (one at a time) or is not an RPC server"
            ) from None
        except (OSError, ValueError):
            raise RpcError(
                f"{where} closed the connection in the handshake: not a llama.cpp RPC "
                f"server, or one older than protocol {RPC_PROTO_MAJOR}.x"
            ) from None
        if len(hello) < 3:
            raise RpcError(f"{where} sent a malformed handshake; not a llama.cpp RPC server")
        version = (hello[0], hello[1], hello[2])
        if version[0] != RPC_PROTO_MAJOR or version[1] > RPC_PROTO_MINOR:
            raise RpcError(
                f"{where} speaks RPC protocol {'.'.join(map(str, version))}, this llama.cpp "
                f"{RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}.x; run the same llama.cpp version on both"
            )
        try:
            (count,) = struct.unpack("<I", _command(sock, _CMD_DEVICE_COUNT, b"", deadline))
            memory = []
            for device in range(count):
                reply = _command(sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", device), deadline)
                free, total = struct.unpack("<QQ", reply)
                memory.append((free, total))
        except (OSError, ValueError, struct.error):
            raise RpcError(f"{where} failed after the handshake; is it healthy?") from None
    if not memory:
        raise RpcError(f"{where} has no devices to offer")
    return RpcServerInfo(f"{host}:{port}", version, tuple(memory), time.monotonic() - start)


# ----------------------------------------------------------------------- ggml through ctypes

ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


class _Libs:
    """libggml-rpc and libggml (libllama's own copies) with the argtypes used here."""

    def __init__(self) -> None:
        llama_cpp = import_llama_cpp()
        if not llama_cpp.llama_supports_rpc():
            raise RpcError(
                "this llama-cpp-python was built without llama.cpp's RPC backend; "
                "rebuild it with `make setup` (CMAKE_ARGS=-DGGML_RPC=ON)"
            )
        libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
        self.rpc = _loaded_library("ggml-rpc", libdir)
        self.ggml = _loaded_library("ggml", libdir)
        vp, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        for lib, name, args, res in (
            (self.rpc, "ggml_backend_rpc_add_server", [cp], vp),
            (
                self.rpc,
                "ggml_backend_rpc_get_device_memory",
                [cp, ctypes.c_uint32, ctypes.POINTER(sz), ctypes.POINTER(sz)],
                None,
            ),
            (self.rpc, "ggml_backend_rpc_start_server", [cp, cp, sz, sz, ctypes.POINTER(vp)], None),
            (self.ggml, "ggml_backend_dev_by_type", [ctypes.c_int], vp),
            (self.ggml, "ggml_backend_register", [vp], None),
            (self.ggml, "ggml_backend_reg_dev_count", [vp], sz),
            (self.ggml, "ggml_backend_reg_dev_get", [vp, sz], vp),
            (self.ggml, "ggml_backend_dev_name", [vp], cp),
            (self.ggml, "ggml_set_abort_callback", [ABORT_CALLBACK], vp),
        ):
            func = getattr(lib, name)
            func.argtypes, func.restype = args, res


def _loaded_library(name: str, libdir: Path) -> Any:
    """A CDLL over the very file libllama already mapped for ``lib<name>``.

    The wheel ships ``libggml.so``, ``.so.0`` and ``.so.0.x`` as three copies (wheels
    hold no symlinks), and libllama maps the ``.so.0`` ones: opening another copy would
    load a second ggml with its own device registry and RPC connections.
    """
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rstrip("\n").split(maxsplit=5)[-1]
            base = os.path.basename(path)
            if path.startswith("/") and re.fullmatch(rf"lib{re.escape(name)}\.so\.\d+", base):
                return ctypes.CDLL(path)
    from llama_cpp._ctypes_extensions import load_shared_library

    return load_shared_library(name, libdir)  # not Linux: the loader's own naming


_libs_lock = threading.Lock()
_libs_cache: _Libs | None = None
# ggml keeps every added server for the life of the process; so do we.
_added: dict[str, tuple[int, tuple[RpcDevice, ...]]] = {}  # endpoint -> (reg, devices)


def rpc_libraries() -> _Libs:
    global _libs_cache
    with _libs_lock:
        if _libs_cache is None:
            _libs_cache = _Libs()
        return _libs_cache


def add_rpc_servers(
    endpoints: Sequence[str], *, timeout: float = 3.0, register: bool = False
) -> tuple[RpcDevice, ...]:
    """Check each ``host:port`` then add it to ggml: its devices, in endpoint order.

    Every endpoint is checked (:func:`check_endpoint`) before any is added. With
    ``register`` the servers also join ggml's global device registry as llama.cpp's
    ``--rpc`` does (then every later load with default devices uses them, for the life
    of the process); without it, pass the devices to a load with :func:`model_devices`.
    """
    for endpoint in endpoints:
        check_endpoint(*parse_host_port(endpoint), timeout=timeout)
    libs = rpc_libraries()
    result: list[RpcDevice] = []
    for endpoint in endpoints:
        with _libs_lock:
            if endpoint not in _added:
                reg = libs.rpc.ggml_backend_rpc_add_server(endpoint.encode())
                if not reg:
                    raise RpcError(f"RPC server {endpoint} offers no devices")
                devices = []
                for i in range(libs.ggml.ggml_backend_reg_dev_count(reg)):
                    handle = libs.ggml.ggml_backend_reg_dev_get(reg, i)
                    name = libs.ggml.ggml_backend_dev_name(handle).decode()
                    devices.append(RpcDevice(endpoint, i, name, handle))
                _added[endpoint] = (reg, tuple(devices))
            reg, devices = _added[endpoint]
            if register:
                libs.ggml.ggml_backend_register(reg)  # ggml ignores a second registration
        result.extend(devices)
    return tuple(result)


def rpc_device_memory(endpoint: str, device: int = 0, *, timeout: float = 3.0) -> tuple[int, int]:
    """``(free, total)`` bytes of a server's device, asked through ggml's own client."""
    check_endpoint(*parse_host_port(endpoint), timeout=timeout)
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    rpc_libraries().rpc.ggml_backend_rpc_get_device_memory(
        endpoint.encode(), device, ctypes.byref(free), ctypes.byref(total)
    )
    return free.value, total.value


def devices_array(devices: Sequence[RpcDevice]) -> Any:
    """A NULL-terminated ``ggml_backend_dev_t`` array for ``llama_model_params.devices``.

    The caller keeps it referenced until the load returns (llama.cpp copies the list).
    """
    return (ctypes.c_void_p * (len(devices) + 1))(*[d.handle for d in devices], None)


def attach_devices(
    params: Any, devices: Sequence[RpcDevice], tensor_split: Sequence[float] = ()
) -> tuple[Any, ...]:
    """Point ``llama_model_params`` at ``devices`` (and their ``tensor_split`` shares).

    Returns the ctypes arrays the params now point into: keep them referenced until the
    load returns (llama.cpp copies them then).
    """
    array = devices_array(devices)
    params.devices = ctypes.cast(array, ctypes.c_void_p)
    if not tensor_split:
        return (array,)
    split = (ctypes.c_float * import_llama_cpp().LLAMA_MAX_DEVICES)(*tensor_split)
    params.tensor_split = split
    return (array, split)


_patch_lock = threading.RLock()  # nested blocks in one thread stack their patches


@contextlib.contextmanager
def model_devices(devices: Sequence[RpcDevice]) -> Iterator[None]:
    """Model loads from this thread inside the block use exactly ``devices`` (plus the CPU).

    ``llama_cpp.Llama`` has no ``devices`` argument, so ``llama_model_load_from_file`` is
    wrapped for the block (both its names: ``llama_cpp`` and ``llama_cpp.llama_cpp``):
    a copy of the params gets the device list. Loads from other threads pass unchanged.
    Code that builds its own ``llama_model_params`` can set :func:`devices_array` instead.
    """
    llama_cpp = import_llama_cpp()
    modules = (llama_cpp, llama_cpp.llama_cpp)
    array = devices_array(devices)
    owner = threading.get_ident()
    with _patch_lock:
        originals = [module.llama_model_load_from_file for module in modules]
        original = originals[1]  # the binding itself; the package re-exports the same

        def load(path: bytes, params: Any) -> Any:
            if threading.get_ident() != owner:
                return original(path, params)
            copy = type(params).from_buffer_copy(params)
            copy.devices = ctypes.cast(array, ctypes.c_void_p)
            return original(path, copy)

        for module in modules:
            module.llama_model_load_from_file = load
        try:
            yield
        finally:
            for module, saved in zip(modules, originals, strict=True):
                module.llama_model_load_from_file = saved


@contextlib.contextmanager
def rpc_load_devices(endpoints: Sequence[str]) -> Iterator[None]:
    """With --rpc: loads in the block place layers on these servers' devices (checked
    first); without, nothing changes."""
    if not endpoints:
        yield
        return
    with model_devices(add_rpc_servers(endpoints)):
        yield
