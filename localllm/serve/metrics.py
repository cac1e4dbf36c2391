"""``/metrics``: the server's counters and the engine's gauges in Prometheus' text format."""

from __future__ import annotations

import threading
from collections import Counter

from localllm.runtime.batch_records import EngineStats

__all__ = ["ENDPOINTS", "Metrics"]

# Paths counted by name; anything else is counted as "other" (bounded label values).
ENDPOINTS = (
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
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


class Metrics:
    """HTTP request counts by endpoint and status; rendered with the engine's snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, int]] = Counter()

    def count(self, method: str, path: str, status: int) -> None:
        endpoint = path if path in ENDPOINTS or path.startswith("/v1/models/") else "other"
        if endpoint.startswith("/v1/models/"):
            endpoint = "/v1/models/{id}"
        with self._lock:
            self._requests[(method, endpoint, status)] += 1

    def render(self, stats: EngineStats) -> str:
        lines: list[str] = []

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
        return "\n".join(lines) + "\n"
