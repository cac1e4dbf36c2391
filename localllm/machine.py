"""This machine: CPUs, memory, and its memory read bandwidth (measured once, cached)."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localllm.errors import LocalLLMError
from localllm.fileio import read_json_object, write_json_atomic
from localllm.paths import cache_root
from localllm.text import parse_size

__all__ = [
    "BANDWIDTH_METHOD",
    "ENV_AVAILABLE_MEMORY",
    "SOURCE_AVPHYS",
    "SOURCE_ENV",
    "SOURCE_MEMINFO",
    "SOURCE_VM_STAT",
    "VM_STAT_AVAILABLE",
    "AvailableMemory",
    "Bandwidth",
    "available_memory",
    "available_memory_bytes",
    "cpu_model",
    "measure_bandwidth",
    "measure_bandwidths",
    "memory_bandwidth",
    "online_cpus",
    "parse_vm_stat",
    "peak_rss_bytes",
    "physical_cores",
    "raise_bandwidth",
    "ram_bytes",
]

BANDWIDTH_METHOD = (
    "fastest of libc memchr, numpy int64 add.reduce and numpy uint64 bitwise_or.reduce "
    "over 256 MiB, one slice per CPU thread, each best of 7 interleaved passes"
)


def online_cpus() -> int:
    """Logical CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores, one per sibling set: llama.cpp's own thread default (cpu_get_num_math).

    llama-cpp-python would otherwise generate on cpu_count // 2 threads, half of what
    llama-cli and llama-bench use.
    """
    siblings = set()
    cpu = 0
    while True:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings")
        try:
            siblings.add(path.read_text().strip())
        except OSError:
            break
        cpu += 1
    return len(siblings) if siblings else (os.cpu_count() or 1)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_bytes() -> int:
    """Physical memory installed (0 when the platform does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


ENV_AVAILABLE_MEMORY = "LOCALLLM_AVAILABLE_MEMORY"
# Where available_memory() found its figure (system --json's available_memory_source).
SOURCE_ENV = ENV_AVAILABLE_MEMORY
SOURCE_MEMINFO = "MemAvailable"
SOURCE_VM_STAT = "vm_stat"
SOURCE_AVPHYS = "SC_AVPHYS_PAGES"
# vm_stat's lines counted as available, as Activity Monitor's "available": its "Pages free"
# is the kernel's free_count less the speculative pages, listed apart. Wired, active and
# compressed pages are none of these, so nothing is subtracted.
VM_STAT_AVAILABLE = ("Pages free", "Pages inactive", "Pages purgeable", "Pages speculative")
_VM_STAT_PAGE_SIZE = re.compile(r"page size of (\d+) bytes")
_VM_STAT_LINE = re.compile(r'^"?([^":]+)"?:\s+(\d+)\.?\s*$')


@dataclass(frozen=True)
class AvailableMemory:
    """RAM available to a new process, and where the figure comes from."""

    bytes: int | None
    source: str  # SOURCE_*; "unknown" when the platform says nothing


def parse_vm_stat(text: str, page_size: int | None = None) -> int:
    """Available bytes from macOS ``vm_stat`` output: free + inactive + purgeable + speculative.

    The page size is the header's (``page size of 16384 bytes``), else ``page_size``
    (``sysctl -n hw.pagesize``). Raises ValueError on output that is not vm_stat's.
    """
    if m := _VM_STAT_PAGE_SIZE.search(text):
        page_size = int(m[1])
    if not page_size:
        raise ValueError("vm_stat output names no page size")
    pages = {}
    for line in text.splitlines():
        if m := _VM_STAT_LINE.match(line.strip()):
            pages[m[1].strip()] = int(m[2])
    missing = [name for name in VM_STAT_AVAILABLE if name not in pages]
    if missing:
        raise ValueError(f"vm_stat output lacks {', '.join(missing)}")
    return sum(pages[name] for name in VM_STAT_AVAILABLE) * page_size


def _macos_available() -> int | None:
    """vm_stat's figure (macOS has no sysconf(SC_AVPHYS_PAGES)); None if it cannot run."""
    try:
        text = subprocess.run(
            ["vm_stat"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        if _VM_STAT_PAGE_SIZE.search(text):
            return parse_vm_stat(text)
        size = subprocess.run(
            ["sysctl", "-n", "hw.pagesize"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        return parse_vm_stat(text, int(size.strip()))
    except (subprocess.SubprocessError, OSError, ValueError):
        return None


def available_memory() -> AvailableMemory:
    """RAM available to a new process and its source: $LOCALLLM_AVAILABLE_MEMORY, Linux's
    MemAvailable, macOS's vm_stat (free + inactive + purgeable + speculative), else free pages.

    $LOCALLLM_AVAILABLE_MEMORY (e.g. ``16GiB``) plans as if that much were available: the
    laptop a model is meant for, or a test that must not depend on this machine.
    """
    override = os.environ.get(ENV_AVAILABLE_MEMORY)
    if override:
        return AvailableMemory(parse_size(override, ENV_AVAILABLE_MEMORY), SOURCE_ENV)
    if sys.platform == "darwin":
        found = _macos_available()
        return AvailableMemory(found, SOURCE_VM_STAT if found is not None else "unknown")
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return AvailableMemory(int(line.split()[1]) * 1024, SOURCE_MEMINFO)
    except (OSError, ValueError, IndexError):
        pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return AvailableMemory(pages, SOURCE_AVPHYS)
    except (ValueError, OSError, AttributeError):
        return AvailableMemory(None, "unknown")


def available_memory_bytes() -> int | None:
    """RAM available to a new process (:func:`available_memory` without its source)."""
    return available_memory().bytes


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def _machine_key() -> str:
    raw = f"{platform.node()}|{cpu_model()}|{online_cpus()}|{ram_bytes()}|{platform.machine()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Bandwidth:
    """This machine's memory read bandwidth, measured once and cached."""

    bytes_per_s: float
    method: str
    measured_at: str
    cached: bool


def _bandwidth_readers(data: Any, workers: int) -> dict[str, Callable[[int], object]]:
    """Ways to read slice ``i`` of ``data`` once, each releasing the GIL while it reads.

    llama.cpp's kernels stream weights with SIMD loads; no single Python-reachable reader
    is reliably as fast on every CPU, so the probe tries several and keeps the fastest:
    glibc's memchr (SIMD, searching for a byte that never occurs) and two numpy
    reductions (vectorized integer add and or).
    """
    import ctypes

    import numpy as np

    slices = np.array_split(data, workers)
    words = [s.view(np.uint64) for s in slices]
    readers: dict[str, Callable[[int], object]] = {
        "numpy add.reduce": lambda i: np.add.reduce(slices[i]),
        "numpy bitwise_or.reduce": lambda i: np.bitwise_or.reduce(words[i]),
    }
    try:
        memchr = ctypes.CDLL(None).memchr
    except (OSError, AttributeError):
        return readers
    memchr.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
    memchr.restype = ctypes.c_void_p
    # data holds int64 ones: the byte 0xFF never occurs, so memchr reads every byte.
    spans = [(s.ctypes.data, s.nbytes) for s in slices]
    readers["libc memchr"] = lambda i: memchr(spans[i][0], 0xFF, spans[i][1])
    return readers


def measure_bandwidths(size_bytes: int = 256 << 20, passes: int = 7) -> dict[str, float]:
    """Read bandwidth in bytes/s by each method: every CPU reads its slice of a buffer far
    larger than cache, in parallel the way llama.cpp's threads stream the weights.

    The methods' passes are interleaved, so a burst of load elsewhere slows all of them
    alike; each method's best pass is its least disturbed one.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.ones(size_bytes // 8, dtype=np.int64)
    workers = max(online_cpus(), 1)
    readers = _bandwidth_readers(data, workers)
    best = dict.fromkeys(readers, float("inf"))
    with ThreadPoolExecutor(workers) as pool:
        for read in readers.values():
            list(pool.map(read, range(workers)))  # fault the pages in, warm the threads
        for _ in range(passes):
            for name, read in readers.items():
                start = time.perf_counter()
                list(pool.map(read, range(workers)))
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: data.nbytes / seconds for name, seconds in best.items()}


def measure_bandwidth(size_bytes: int = 256 << 20, passes: int = 7) -> float:
    """This machine's read bandwidth in bytes/s: the fastest of :func:`measure_bandwidths`."""
    return max(measure_bandwidths(size_bytes, passes).values())


def memory_bandwidth(refresh: bool = False) -> Bandwidth:
    """The cached bandwidth of this machine, measured (in a child process) when missing.

    The child keeps the 256 MiB buffer out of this process's peak RSS, which bench reports.
    """
    path = cache_root() / "bandwidth.json"
    key = _machine_key()
    cache = read_json_object(path)
    entry = cache.get(key)
    if not refresh and isinstance(entry, dict) and isinstance(entry.get("bytes_per_s"), float):
        return Bandwidth(
            entry["bytes_per_s"], entry.get("method", ""), entry.get("measured_at", ""), True
        )
    code = "from localllm.machine import measure_bandwidth; print(repr(measure_bandwidth()))"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
        )
        value = float(proc.stdout.strip())
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        raise LocalLLMError(f"could not measure memory bandwidth: {exc}") from None
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cache[key] = {"bytes_per_s": value, "method": BANDWIDTH_METHOD, "measured_at": now,
                  "cpu_model": cpu_model(), "cpu_threads": online_cpus()}  # fmt: skip
    write_json_atomic(path, cache, sort_keys=True)
    return Bandwidth(value, BANDWIDTH_METHOD, now, False)


def raise_bandwidth(bytes_per_s: float, method: str) -> Bandwidth:
    """Record a read rate observed faster than the cached bandwidth (bench's tg reading
    the weights faster than the probe did): the roofline stays an upper bound."""
    path = cache_root() / "bandwidth.json"
    key = _machine_key()
    cache = read_json_object(path)
    entry = cache.get(key)
    known = entry.get("bytes_per_s") if isinstance(entry, dict) else None
    if isinstance(known, float) and known >= bytes_per_s:
        return Bandwidth(known, entry.get("method", ""), entry.get("measured_at", ""), True)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cache[key] = {"bytes_per_s": float(bytes_per_s), "method": method, "measured_at": now,
                  "cpu_model": cpu_model(), "cpu_threads": online_cpus()}  # fmt: skip
    write_json_atomic(path, cache, sort_keys=True)
    return Bandwidth(float(bytes_per_s), method, now, False)
