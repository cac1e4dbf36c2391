"""The batch engine's bookkeeping: a request in flight (Job), a sequence (Slot), a Ticket.

Plain Python: the worker thread of :mod:`~localllm.runtime.batch_engine` owns these.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from localllm.runtime.batch_records import GenerationParams, TextState
from localllm.runtime.speculation import DraftPolicy, NgramIndex

__all__ = ["Job", "Slot", "Ticket", "common_prefix"]


class _Wakeable(Protocol):
    def wake(self) -> None: ...


@dataclass(eq=False)
class Job:
    prompt: list[int]
    params: GenerationParams
    sink: Callable[[Any], None]
    sampler: Any  # a batch_llama.RequestSampler, owned by the job until it ends
    text: TextState
    cancelled: bool = False
    interrupted: bool = False  # cancelled by the caller who keeps the cells (chat's stop)
    prompt_pos: int = 0  # next prompt token to evaluate
    cached: int = 0  # prompt tokens whose cells were reused
    window_reevaluated: bool = False  # a sliding window had dropped the reusable prefix
    generated: int = 0
    last_token: int | None = None  # sampled, not yet decoded
    ngrams: NgramIndex | None = None  # prompt + reply, for n-gram drafts (None: no drafts)
    policy: DraftPolicy = field(default_factory=DraftPolicy)
    t_submit: float = field(default_factory=time.perf_counter)
    t_admit: float = 0.0
    t_first: float | None = None


@dataclass(eq=False)
class Slot:
    seq: int
    held: list[int] = field(default_factory=list)  # tokens whose cells this sequence holds
    job: Job | None = None
    last_used: float = 0.0


class Ticket:
    """A submitted request: ``cancel()`` stops it and frees its slot's cells; ``stop()``
    ends it as "interrupted" and keeps them (the next turn reuses the prefix)."""

    def __init__(self, engine: _Wakeable, job: Job) -> None:
        self._engine, self._job = engine, job

    def cancel(self) -> None:
        if not self._job.cancelled:
            self._job.cancelled = True
            self._engine.wake()

    def stop(self) -> None:
        if not self._job.cancelled:
            self._job.interrupted = True
            self._job.cancelled = True
            self._engine.wake()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
