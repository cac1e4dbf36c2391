"""Running the app: load the engine once, serve it with uvicorn, report through a callback.

``run_server`` blocks until SIGINT/SIGTERM (the CLI's ``localllm serve``);
``start_server`` serves from a background thread and returns once it listens (tests,
benchmarks). uvicorn's own logging is off: what the CLI shows comes from ``on_event``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from localllm.errors import LocalLLMError, TemplateError
from localllm.generation import ChatMessage
from localllm.gguf.spec import read_model_spec
from localllm.runtime.batch_engine import BatchEngine
from localllm.runtime.batch_records import PromptFormat
from localllm.serve.app import build_app
from localllm.serve.config import EventSink, ServedModel, ServeOptions, ServerReady
from localllm.serve.metrics import Metrics
from localllm.serve.registry import register_server, unregister_server
from localllm.serve.router import ModelRouter
from localllm.serve.service import Service
from localllm.templates.selection import ChatFormat, choose_format

__all__ = [
    "RunningServer",
    "ServeError",
    "load_engine",
    "prompt_format",
    "run_server",
    "start_server",
]


class ServeError(LocalLLMError):
    """The server could not start (the port is taken, the address does not exist)."""


class _DeadlineH11(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request head.

    uvicorn arms its keep-alive timer only after a response, so a client that connects
    and sends nothing, or trickles a header byte at a time, would hold a connection
    forever. Here a connection must deliver a complete request head within the idle
    timeout of connecting or of its previous response.
    """

    _head_timer: asyncio.TimerHandle | None = None

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._head_expired)

    def _disarm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm_head_deadline()  # a request is being served; its body has its own timeout

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    """uvicorn's server that says where it listens once its socket is bound."""

    def __init__(self, config: uvicorn.Config, on_listen: Callable[[int], None]) -> None:
        super().__init__(config)
        self._on_listen = on_listen

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            self._on_listen(self.servers[0].sockets[0].getsockname()[1])


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a taken port is a ServeError (uvicorn would exit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ServeError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
            "pick another --port, or a --host of this machine"
        ) from None
    return sock


def load_engine(options: ServeOptions) -> BatchEngine:
    """Check the options, then load the first model with ``options.parallel`` slots."""
    options.validate()
    return BatchEngine.load(
        options.model_path,
        options.load,
        options.parallel,
        spec=options.spec,
        draft=options.draft_path,
    )


def _router(
    options: ServeOptions,
    engine: BatchEngine,
    pinned: bool,
    chat_format: ChatFormat | None,
    on_event: EventSink | None,
    load_seconds: float,
) -> tuple[ModelRouter[Service], Metrics]:
    """The models behind the server, the first already loaded as ``engine``."""
    metrics = Metrics()
    served = options.served()
    if chat_format is not None:
        served = (replace(served[0], chat_format=chat_format), *served[1:])

    def service(model: ServedModel, loaded: BatchEngine) -> Service:
        fmt = _prompt_format(model, loaded)
        return Service(options, model, loaded, fmt)

    def load(model: ServedModel) -> Service:
        engine = BatchEngine.load(
            model.path, model.load, model.parallel, spec=options.spec, draft=options.draft_path
        )
        return service(model, engine)

    def unload(svc: Service) -> None:
        metrics.retire(svc.engine.stats())
        svc.close_embedder()
        svc.engine.close()

    first = service(served[0], engine)
    router: ModelRouter[Service] = ModelRouter(
        served,
        load=load,
        unload=unload,
        budget_bytes=options.memory_budget,
        keep_alive=options.keep_alive,
        on_event=on_event,
    )
    router.residents[first.served.model_id].adopt(first, pinned=pinned, seconds=load_seconds)
    return router, metrics


def _config(options: ServeOptions, app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        http=_DeadlineH11,
        ws="none",
        lifespan="on",  # the app's lifespan runs the keep-alive reaper
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=options.idle_timeout,  # type: ignore[arg-type]  # float works
        limit_concurrency=options.max_connections,
        timeout_graceful_shutdown=5,
    )


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "localhost") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def _ready(options: ServeOptions, engine: BatchEngine, port: int, seconds: float) -> ServerReady:
    return ServerReady(
        url=_url(options.host, port),
        port=port,
        model_id=options.model_id,
        n_ctx=engine.n_ctx,
        n_ctx_slot=engine.n_ctx_slot,
        n_parallel=engine.n_parallel,
        api_key_required=options.api_key is not None,
        load_seconds=seconds,
        spec_note=engine.spec_note,
    )


def prompt_format(chat_format: ChatFormat, engine: BatchEngine) -> PromptFormat:
    """What the server renders chat requests with: ``chat``'s format, its stops included."""
    bos, eos = engine.bos_text, engine.eos_text

    def render(messages: Sequence[ChatMessage]) -> str:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        return chat_format.render(chat, bos_token=bos, eos_token=eos)

    def render_messages(messages: Sequence[Mapping[str, Any]], extra: Mapping[str, Any]) -> str:
        assert chat_format.template is not None
        return chat_format.template.render(messages, bos_token=bos, eos_token=eos, **extra)

    # As chat's session: the template's end marks and EOS's text, none for --raw.
    stop = () if chat_format.kind == "raw" else (*chat_format.stop_strings, *([eos] if eos else []))
    jinja = chat_format.template
    return PromptFormat(
        render=render,
        stop=stop,
        add_bos=chat_format.add_bos,
        render_messages=render_messages if jinja is not None else None,
        template_text=jinja.source if jinja is not None else None,
    )


def _prompt_format(model: ServedModel, engine: BatchEngine) -> PromptFormat | None:
    """The model's format, else the one chat picks for the file (the GGUF's template, a
    recognized one); None for a model with none: /v1/completions only, chat says so."""
    chat_format = model.chat_format
    if chat_format is None:
        try:
            spec = read_model_spec(model.path)
            chat_format = choose_format(spec, model.path.name)
        except TemplateError:
            return None
    return prompt_format(chat_format, engine)


def run_server(
    options: ServeOptions,
    *,
    chat_format: ChatFormat | None = None,
    on_event: EventSink | None = None,
) -> None:
    """Load the model and serve until interrupted; ServeError if the port cannot be bound."""
    options.validate()
    sock = _bind(options.host, options.port)  # before the load: a taken port fails fast
    started = time.perf_counter()
    try:
        engine = load_engine(options)
    except BaseException:
        sock.close()
        raise
    loaded = time.perf_counter() - started
    router, record = None, None
    try:
        router, metrics = _router(options, engine, False, chat_format, on_event, loaded)
        app = build_app(options, router, metrics, on_event)

        def listening(port: int) -> None:
            nonlocal record
            ready = _ready(options, engine, port, loaded)
            record = register_server(ready.url, options.api_key is not None)
            if on_event is not None:
                on_event(ready)

        _Server(_config(options, app), listening).run(sockets=[sock])
    finally:
        if record is not None:
            unregister_server(record)
        if router is not None:
            router.close_all()
        else:
            engine.close()


@dataclass
class RunningServer:
    """A server on a background thread: ``url`` to call, ``stop()`` to end it."""

    url: str
    port: int
    engine: BatchEngine  # the first model's, loaded at start
    ready: ServerReady
    router: ModelRouter[Service]
    _server: _Server
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.router.close_all()  # a caller's engine is pinned: left to the caller

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    options: ServeOptions,
    *,
    engine: BatchEngine | None = None,
    chat_format: ChatFormat | None = None,
    on_event: EventSink | None = None,
    timeout: float = 30.0,
) -> RunningServer:
    """Serve on a background thread (``port`` 0 picks a free one); returns once listening."""
    options.validate()
    sock = _bind(options.host, options.port)
    started = time.perf_counter()
    owns = engine is None
    try:
        engine = engine or load_engine(options)
    except BaseException:
        sock.close()
        raise
    loaded = time.perf_counter() - started
    router, metrics = _router(options, engine, not owns, chat_format, on_event, loaded)
    app = build_app(options, router, metrics, on_event)
    listening = threading.Event()
    server = _Server(_config(options, app), lambda _port: listening.set())
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="localllm-serve", daemon=True
    )
    thread.start()
    if not listening.wait(timeout):
        server.should_exit = True
        thread.join(timeout=5)
        router.close_all()
        raise ServeError(f"the server on {options.host}:{options.port} did not start")
    port = sock.getsockname()[1]
    ready = _ready(options, engine, port, loaded)
    if on_event is not None:
        on_event(ready)
    return RunningServer(ready.url, port, engine, ready, router, server, thread)
