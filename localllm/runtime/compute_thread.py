"""One OS thread for every ``llama_decode`` that generation makes in this process.

llama.cpp's CPU backend runs a decode as one OpenMP parallel region (libgomp on Linux),
and ggml's barriers between the graph's ops are OpenMP barriers. libgomp gives each
calling thread a team of its own, and once it manages more threads than there are CPUs
it cuts the wait at a barrier from 300,000 spins to 100 (``GOMP_SPINCOUNT``'s throttled
value, not settable above 1,000): the workers then sleep and are woken at every op. Two
engines whose threads have each decoded once are enough (two models in ``serve``, the
embeddings context beside a chat model, the benchmark's engines): SmolLM2 decoded at
53-62 t/s instead of 87-103 on 2 cores (benchmarks/speculative.md). Decodes sent here
run on one thread, so the process has one team whichever engine asks. Where OpenMP is
not in the build (macOS), this costs a thread hand-off per decode, tens of
microseconds against milliseconds.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any

__all__ = ["decode"]

_lock = threading.Lock()
_requests: queue.SimpleQueue[tuple[Any, Any, Any, list[Any], threading.Event]] | None = None
_thread: threading.Thread | None = None


def decode(lc: Any, ctx: Any, batch: Any) -> int:
    """``lc.llama_decode(ctx, batch)`` on the compute thread; its return code."""
    if threading.current_thread() is _thread:
        return int(lc.llama_decode(ctx, batch))
    requests = _start()
    box: list[Any] = []
    done = threading.Event()
    requests.put((lc, ctx, batch, box, done))
    try:
        done.wait()
    except BaseException:
        # Ctrl-C in the waiting thread (`localllm embed` waits in the main thread): the
        # decode still uses ctx and batch, so it ends before the caller goes on to free them.
        while not done.is_set():
            with contextlib.suppress(KeyboardInterrupt):
                done.wait()
        raise
    result = box[0]
    if isinstance(result, BaseException):
        raise result
    return int(result)


def _start() -> queue.SimpleQueue[tuple[Any, Any, Any, list[Any], threading.Event]]:
    global _requests, _thread
    with _lock:
        if _requests is None:
            _requests = queue.SimpleQueue()
            # A daemon: it holds nothing to flush, and an exiting process must not wait on it.
            _thread = threading.Thread(
                target=_serve, args=(_requests,), name="localllm-compute", daemon=True
            )
            _thread.start()
        return _requests


def _serve(requests: queue.SimpleQueue[tuple[Any, Any, Any, list[Any], threading.Event]]) -> None:
    while True:
        lc, ctx, batch, box, done = requests.get()
        try:
            box.append(lc.llama_decode(ctx, batch))
        except BaseException as exc:  # handed to the caller, who raises it
            box.append(exc)
        done.set()
