"""Every generation decode of a process runs on one OS thread (one OpenMP team).

Why it matters is in localllm/runtime/compute_thread.py: with a team per calling thread,
libgomp throttles its barrier spin once two engines have decoded, and decoding slows by
a third. Here: the routing itself on a recording stand-in for llama_cpp, then the real
engines (a chat model, a second model, a draft model, embeddings) decoding through it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from localllm.runtime import compute_thread


class _Recorder:
    """Stands in for llama_cpp's module: records which thread decodes, returns a code."""

    def __init__(self, result: Any = 0) -> None:
        self.threads: list[int] = []
        self.result = result

    def llama_decode(self, ctx: Any, batch: Any) -> Any:
        self.threads.append(threading.get_ident())
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def test_decodes_from_any_thread_run_on_one_thread() -> None:
    lc = _Recorder(result=1)
    callers = [threading.Thread(target=compute_thread.decode, args=(lc, None, None)) for _ in "ab"]
    for t in callers:
        t.start()
        t.join()
    assert compute_thread.decode(lc, None, None) == 1
    assert len(lc.threads) == 3
    assert len(set(lc.threads)) == 1
    assert lc.threads[0] not in {t.ident for t in callers} | {threading.get_ident()}


def test_an_error_in_a_decode_reaches_its_caller() -> None:
    with pytest.raises(RuntimeError, match="no memory slot"):
        compute_thread.decode(_Recorder(RuntimeError("no memory slot")), None, None)
    assert compute_thread.decode(_Recorder(0), None, None) == 0  # the thread goes on


def test_ctrl_c_while_waiting_lets_the_decode_end_first() -> None:
    """A KeyboardInterrupt in the waiting (main) thread is raised only once the decode has
    finished with its context and batch: the caller then frees them safely."""
    import signal
    import time

    class Slow(_Recorder):
        finished = False

        def llama_decode(self, ctx: Any, batch: Any) -> Any:
            time.sleep(0.5)
            self.finished = True
            return 0

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    lc = Slow()
    before = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    try:
        with pytest.raises(KeyboardInterrupt):
            compute_thread.decode(lc, None, None)
        assert lc.finished
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def test_real_engines_decode_on_the_one_thread(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two models' engines, one with a draft model, and an embeddings context: every
    llama_decode they make is made by the same thread, none by theirs."""
    import llama_cpp

    from localllm.runtime.batch_engine import BatchEngine
    from localllm.runtime.batch_records import GenerationParams, run_request
    from localllm.runtime.embeddings import Embedder
    from localllm.runtime.params import LoadOptions

    real = llama_cpp.llama_decode
    seen: list[int] = []

    def recording(ctx: Any, batch: Any) -> int:
        seen.append(threading.get_ident())
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording)
    options = LoadOptions(n_ctx=512)
    engines = [
        BatchEngine.load(smollm2_path, options, spec="off"),
        BatchEngine.load(smollm2_path, options, draft=smollm2_path),
    ]
    embedder = Embedder.load(smollm2_path, n_ctx=512)
    try:
        for engine in engines:
            prompt = engine.tokenize("The capital of France is", add_bos=True)
            params = GenerationParams(max_tokens=8, temperature=0.0)
            assert run_request(engine, prompt, params, 60).completion_tokens > 0
        assert len(embedder.embed(["one text", "another"]).vectors) == 2
    finally:
        embedder.close()
        for engine in engines:
            engine.close()
    assert len(seen) > 16  # prompts, tokens, the draft model's and the embeddings' decodes
    assert len(set(seen)) == 1
    assert seen[0] != threading.get_ident()
