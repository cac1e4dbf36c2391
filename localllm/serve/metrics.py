"""``/metrics``: the server's counters and the engine's gauges in Prometheus' text format."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from localllm.runtime.batch_records import COUNTERS, EngineStats

__all__ = ["ENDPOINTS", "Metrics", "ModelFigures", "combine"]

# Paths counted by name; anything else is counted as "other" (bounded label values).
ENDPOINTS = (
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/models/load",
    "/models/unload",
)

# engine counter -> (metric name, help)
_ENGINE_COUNTERS = (
    ("prompt_tokens_evaluated", "prompt_tokens_total", "Prompt tokens evaluated by llama.cpp."),
    ("prompt_tokens_cached", "prompt_tokens_cached_total", "Prompt tokens reused from KV cells."),
    ("completion_tokens", "completion_tokens_total", "Tokens generated."),
    ("decode_calls", "decode_calls_total", "llama_decode calls (one per engine step)."),
    ("decode_seconds", "decode_seconds_total", "Seconds spent in llama_decode."),
    ("batch_tokens", "batch_tokens_total", "Tokens submitted to llama_decode."),
    ("draft_tokens", "draft_tokens_total", "Tokens drafted for speculative decoding."),
    ("draft_tokens_accepted", "draft_tokens_accepted_total", "Drafted tokens accepted."),
)
_OUTCOMES = (
    ("requests_finished", "finished"),
    ("requests_cancelled", "cancelled"),
    ("requests_failed", "failed"),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ModelFigures(Protocol):
    """What /metrics reads of a served model (serve.router.Resident has it)."""

    model_id: str
    status: str
    loads: int
    unloads: int
    load_seconds: float


def combine(stats: Sequence[EngineStats]) -> EngineStats:
    """Several loaded engines as one: gauges and counters summed."""
    counters: Counter[str] = Counter()
    for s in stats:
        counters.update(s.counters)
    return EngineStats(
        n_parallel=sum(s.n_parallel for s in stats),
        n_ctx=sum(s.n_ctx for s in stats),
        n_ctx_slot=max((s.n_ctx_slot for s in stats), default=0),
        slots_busy=sum(s.slots_busy for s in stats),
        queued=sum(s.queued for s in stats),
        kv_cells_used=sum(s.kv_cells_used for s in stats),
        recent_tokens_per_second=sum(s.recent_tokens_per_second for s in stats),
        counters={k: counters.get(k, 0) for k in COUNTERS},
    )


class Metrics:
    """HTTP request counts by endpoint and status; rendered with the engines' snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, int]] = Counter()
        # Counters of engines since unloaded: the totals stay monotonic across unloads.
        self._retired: Counter[str] = Counter()

    def retire(self, stats: EngineStats) -> None:
        """An engine is about to close: keep its counters in the totals."""
        with self._lock:
            self._retired.update(stats.counters)

    def count(self, method: str, path: str, status: int) -> None:
        endpoint = path if path in ENDPOINTS or path.startswith("/v1/models/") else "other"
        if endpoint.startswith("/v1/models/"):
            endpoint = "/v1/models/{id}"
        with self._lock:
            self._requests[(method, endpoint, status)] += 1

    def render(self, engines: Sequence[EngineStats], models: Sequence[ModelFigures] = ()) -> str:
        lines: list[str] = []
        stats = combine(engines)
        with self._lock:
            retired = dict(self._retired)
        stats.counters.update({k: stats.counters.get(k, 0) + v for k, v in retired.items()})

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP localllm_{name} {help_text}")
            lines.append(f"# TYPE localllm_{name} {kind}")
            for labels, value in samples:
                number = repr(float(value)) if isinstance(value, float) else str(value)
                lines.append(f"localllm_{name}{labels} {number}")

        with self._lock:
            requests = sorted(self._requests.items())
        metric(
            "http_requests_total",
            "counter",
            "HTTP requests answered, by method, endpoint and status.",
            [
                (f'{{method="{m}",endpoint="{_escape(e)}",status="{s}"}}', n)
                for (m, e, s), n in requests
            ],
        )
        c = stats.counters
        metric(
            "requests_started_total",
            "counter",
            "Generations that got a slot.",
            [("", int(c["requests_started"]))],
        )
        metric(
            "requests_ended_total",
            "counter",
            "Generations ended, by outcome (cancelled: the client left or the server stopped).",
            [(f'{{outcome="{label}"}}', int(c[key])) for key, label in _OUTCOMES],
        )
        gauges = (
            ("requests_in_flight", "Requests holding a slot now.", stats.slots_busy),
            ("requests_queued", "Requests waiting for a free slot.", stats.queued),
            ("slots", "Slots (parallel sequences) of the context.", stats.n_parallel),
            ("slot_context_tokens", "Context cells per slot.", stats.n_ctx_slot),
            ("kv_cells", "KV cache cells allocated (all slots).", stats.n_ctx),
            ("kv_cells_used", "KV cache cells holding tokens now.", stats.kv_cells_used),
            (
                "kv_usage_ratio",
                "Share of the KV cache cells holding tokens.",
                stats.kv_cells_used / stats.n_ctx if stats.n_ctx else 0.0,
            ),
            (
                "generation_tokens_per_second",
                "Tokens generated per second over the last 10 s (all slots).",
                round(stats.recent_tokens_per_second, 3),
            ),
        )
        for name, help_text, value in gauges:
            metric(name, "gauge", help_text, [("", value)])
        for key, name, help_text in _ENGINE_COUNTERS:
            value = c[key]
            metric(name, "counter", help_text, [("", value if "seconds" in key else int(value))])
        if models:
            label = [(f'{{model="{_escape(m.model_id)}"}}', m) for m in models]
            metric("model_loaded", "gauge", "1 while the model is loaded.",
                   [(lb, int(m.status == "loaded")) for lb, m in label])  # fmt: skip
            metric("model_loads_total", "counter", "Loads of the model.",
                   [(lb, m.loads) for lb, m in label])  # fmt: skip
            metric("model_unloads_total", "counter", "Unloads (keep-alive, eviction, stop).",
                   [(lb, m.unloads) for lb, m in label])  # fmt: skip
            metric("model_load_seconds_total", "counter", "Seconds spent loading the model.",
                   [(lb, round(m.load_seconds, 6)) for lb, m in label])  # fmt: skip
        return "\n".join(lines) + "\n"
