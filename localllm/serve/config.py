"""What ``localllm serve`` is asked to do, checked before anything loads, and what it reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localllm.errors import InvalidArgument
from localllm.net import LOOPBACK_NAMES, is_loopback
from localllm.runtime.batch_engine import MAX_PARALLEL
from localllm.runtime.params import LoadOptions
from localllm.runtime.speculation import check_spec_mode

__all__ = [
    "ModelEvent",
    "RequestLogged",
    "ServeEvent",
    "ServeOptions",
    "ServedModel",
    "ServerReady",
]


@dataclass(frozen=True)
class ServedModel:
    """One model a server offers: its file, names, load settings and memory plan."""

    model_id: str
    path: Path
    aliases: tuple[str, ...] = ()
    load: LoadOptions = field(default_factory=LoadOptions)
    parallel: int = 1
    chat_format: Any = None  # templates.selection.ChatFormat, or None: the file's own
    plan_bytes: int | None = None  # weights + KV + compute (the plan); None: not planned
    plan_summary: str = ""  # "weights 0.09 + KV 0.09 + compute 0.01 GiB", for refusals


@dataclass(frozen=True)
class ServeOptions:
    """The server's settings; ``load.n_ctx`` is the TOTAL context, split over the slots."""

    model_path: Path
    model_id: str  # the name /v1/models lists and requests send as "model"
    model_aliases: tuple[str, ...] = ()  # other names accepted for it (file name, ref)
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 1
    load: LoadOptions = field(default_factory=LoadOptions)
    api_key: str | None = None
    insecure: bool = False  # allow a non-loopback host without an API key
    allowed_hosts: tuple[str, ...] = ()  # extra Host names accepted (DNS rebinding check)
    max_body_bytes: int = 2 * 1024 * 1024
    idle_timeout: float = 10.0  # seconds a connection may sit without a complete request
    body_timeout: float = 30.0  # seconds between two chunks of a request body
    send_timeout: float = 60.0  # seconds a streamed chunk may wait on a client not reading
    max_connections: int = 64  # beyond this uvicorn answers 503
    max_tokens: int | None = None  # default reply budget; None: chat's, min(512, slot ctx / 2)
    # More models behind the same server (the first is model_path above), chosen by a
    # request's "model"; each loads on its first request.
    more_models: tuple[ServedModel, ...] = ()
    keep_alive: float | None = 300.0  # idle seconds before an unload; 0: after each; None: never
    memory_budget: int | None = None  # bytes the loaded models' plans may take together
    first_plan_bytes: int | None = None  # the first model's plan (weights + KV + compute)
    first_plan_summary: str = ""
    first_chat_format: Any = None  # the first model's ChatFormat, None: the file's own

    def served(self) -> tuple[ServedModel, ...]:
        """Every model this server offers, the first (``model_path``) first."""
        first = ServedModel(
            model_id=self.model_id,
            path=self.model_path,
            aliases=self.model_aliases,
            load=self.load,
            parallel=self.parallel,
            chat_format=self.first_chat_format,
            plan_bytes=self.first_plan_bytes,
            plan_summary=self.first_plan_summary,
        )
        return (first, *self.more_models)

    spec: str = "auto"  # --spec: speculative decoding (auto, off, ngram)
    draft_path: Path | None = None  # --draft: a draft model's file

    def validate(self) -> None:
        """InvalidArgument for values that cannot work, before the model loads."""
        self.load.validate()
        check_spec_mode(self.spec, None if self.draft_path is None else str(self.draft_path))
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"port {self.port} must be between 0 and 65535")
        if not 1 <= self.parallel <= MAX_PARALLEL:
            raise InvalidArgument(
                f"--parallel {self.parallel} must be between 1 and {MAX_PARALLEL}"
            )
        if self.load.n_ctx < self.parallel:
            raise InvalidArgument(
                f"--ctx {self.load.n_ctx} cannot be split over {self.parallel} slots; "
                "raise --ctx or lower --parallel"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise InvalidArgument("the API key is empty; pass a non-empty --api-key")
        if not is_loopback(self.host) and self.api_key is None and not self.insecure:
            raise InvalidArgument(
                f"serving on {self.host} opens the model to the network without a key; "
                "pass --api-key KEY (or set LOCALLLM_API_KEY), or --insecure to accept that"
            )
        for name in ("max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} {getattr(self, name)} must be positive")
        for name in ("idle_timeout", "body_timeout", "send_timeout"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"{name} {getattr(self, name)} must be positive seconds")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidArgument(f"--max-tokens {self.max_tokens} must be positive")
        if self.keep_alive is not None and self.keep_alive < 0:
            raise InvalidArgument(
                f"--keep-alive {self.keep_alive:g} must be 0 (unload after each request), "
                "a positive duration, or -1 (never unload)"
            )
        names = [n for m in self.served() for n in (m.model_id, *m.aliases)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InvalidArgument(
                f"model name {twice[0]!r} is given to two served models; serve each file once"
            )

    def host_names(self) -> frozenset[str] | None:
        """Host header names to accept, or None when any is (a wildcard bind, no list)."""
        names = {h.lower().strip("[]") for h in self.allowed_hosts}
        bound = self.host.lower().strip("[]")
        if bound in ("0.0.0.0", "::") and not names:
            return None
        if bound not in ("0.0.0.0", "::"):
            names.add(bound)
        return frozenset(names | set(LOOPBACK_NAMES))


@dataclass(frozen=True)
class ServerReady:
    """Listening: where, with which model, how the context is split."""

    url: str
    port: int
    model_id: str
    n_ctx: int
    n_ctx_slot: int
    n_parallel: int
    api_key_required: bool
    load_seconds: float
    spec_note: str | None = None  # why speculative decoding is off for this model


@dataclass(frozen=True)
class RequestLogged:
    """One HTTP request answered (generation fields set for the completion endpoints)."""

    method: str
    path: str
    status: int
    seconds: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class ModelEvent:
    """A served model loaded, unloaded or failed to load."""

    model_id: str
    action: str  # "loaded" | "unloaded" | "load_failed"
    seconds: float
    reason: str  # "request", "keep-alive", "evicted for X", "stop", "load request"


ServeEvent = ServerReady | RequestLogged | ModelEvent
EventSink = Callable[[ServeEvent], None]
