"""The ASGI app: OpenAI's endpoints over the batch engine, /health, /metrics, the chat page.

Each completion request is checked (schema), formatted with the injected chat format,
tokenized, held against its slot's context, then streamed from the engine. A client
that disconnects cancels its generation, which frees its slot's cells.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from localllm.errors import LocalLLMError
from localllm.runtime.batch_records import (
    GenerationDone,
    GenerationFailedError,
    TextDelta,
)
from localllm.serve import wire
from localllm.serve.config import EventSink, ServeOptions
from localllm.serve.embeddings import embeddings_response, parse_embeddings_request
from localllm.serve.guard import USAGE_KEY, Guard
from localllm.serve.metrics import Metrics
from localllm.serve.router import ModelRouter, Resident
from localllm.serve.schema import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_chat_completion_request,
    parse_completion_request,
    parse_model_action,
)
from localllm.serve.service import Job, Service
from localllm.tools.parse import ToolStream, parse_reply

__all__ = ["STATIC_DIR", "build_app"]

STATIC_DIR = Path(__file__).parent / "static"
# The chat page may only talk to this server and run its own script (markdown is built
# as DOM nodes, never parsed as HTML; the policy is a second line of defence).
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _json(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def _note_usage(request: Request, done: GenerationDone | None) -> None:
    if done is not None:
        request.scope.setdefault("state", {})[USAGE_KEY] = {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "finish_reason": done.finish_reason,
        }


def _failure_body(exc: Exception) -> dict[str, Any]:
    return ApiError(500, str(exc), kind="server_error", code="generation_failed").body()


class _Hold:
    """A request's hold on its model, released once (by the route or its stream's end)."""

    def __init__(self, router: ModelRouter[Service], resident: Resident[Service]) -> None:
        self.router, self.resident, self.done = router, resident, False

    @property
    def svc(self) -> Service:
        assert self.resident.engine is not None
        return self.resident.engine

    async def release(self) -> None:
        if not self.done:
            self.done = True
            await self.router.release(self.resident)


# Long: the routes are closures over the router, options and metrics they share.
def build_app(
    options: ServeOptions,
    router: ModelRouter[Service],
    metrics: Metrics,
    on_event: EventSink | None = None,
) -> Guard:
    """The whole ASGI app over ``router``'s models: routes behind the Host/Origin/auth/body
    guard, and the keep-alive reaper while the server runs."""
    created = int(time.time())

    async def hold(model: str | None) -> _Hold:
        return _Hold(router, await router.acquire(model))

    async def chat_completions(request: Request) -> Response:
        held = None
        try:
            req = parse_chat_completion_request(await request.body())
            held = await hold(req.model)
            svc = held.svc
            # Rendering and tokenizing may take a while on long prompts: not on the event loop.
            job = await run_in_threadpool(svc.chat_job, req)
            if req.stream:
                response, held = _stream_chat(request, held, job, req), None
                return response
            done, entries = await svc.collect(request, job)
        except ApiError as exc:
            return _json(exc.status, exc.body())
        except GenerationFailedError as exc:
            return _json(500, _failure_body(exc))
        finally:
            if held is not None:
                await held.release()
        _note_usage(request, done)
        if done is None:
            return Response(status_code=499)
        logprobs = wire.chat_logprobs(entries) if req.logprobs else None
        parsed = parse_reply(job.tool_family, done.text) if job.tool_family else None
        body = wire.chat_response(wire.new_id("chatcmpl"), job.model, done, logprobs, parsed)
        return _json(200, body)

    async def completions(request: Request) -> Response:
        held = None
        try:
            req = parse_completion_request(await request.body())
            held = await hold(req.model)
            svc = held.svc
            job = await run_in_threadpool(svc.completion_job, req)
            if req.stream:
                response, held = _stream_completion(request, held, job, req), None
                return response
            done, entries = await svc.collect(request, job)
        except ApiError as exc:
            return _json(exc.status, exc.body())
        except GenerationFailedError as exc:
            return _json(500, _failure_body(exc))
        finally:
            if held is not None:
                await held.release()
        _note_usage(request, done)
        if done is None:
            return Response(status_code=499)
        logprobs = wire.completion_logprobs(entries, 0) if req.logprobs is not None else None
        body = wire.completion_response(wire.new_id("cmpl"), job.model, done, logprobs)
        return _json(200, body)

    async def embeddings(request: Request) -> Response:
        held = None
        try:
            req = parse_embeddings_request(await request.body())
            held = await hold(req.model)
            if not held.svc.has_embedder:  # its context is counted before it is made
                need = await run_in_threadpool(held.svc.embeddings_bytes)
                await router.reserve(held.resident, need, "embeddings context")
            result = await run_in_threadpool(held.svc.embed, req)
            model_id = held.svc.served.model_id
        except ApiError as exc:
            return _json(exc.status, exc.body())
        except LocalLLMError as exc:
            return _json(500, _failure_body(exc))
        finally:
            if held is not None:
                await held.release()
        request.scope.setdefault("state", {})[USAGE_KEY] = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": 0,
            "finish_reason": "stop",
        }
        return _json(200, embeddings_response(result, model_id, req.encoding_format))

    def model_card(r: Resident[Service]) -> dict[str, Any]:
        m = r.model
        meta: dict[str, Any] = {
            "n_ctx": m.load.n_ctx,
            "n_ctx_slot": m.load.n_ctx // m.parallel,
            "n_parallel": m.parallel,
            "memory_bytes": m.plan_bytes,
            "aliases": sorted(set(m.aliases) - {m.model_id}),
        }
        svc = r.engine
        if svc is not None:
            engine = svc.engine
            meta |= {
                "n_ctx": engine.n_ctx,
                "n_ctx_slot": engine.n_ctx_slot,
                "n_parallel": engine.n_parallel,
                "n_ctx_train": engine.n_ctx_train,
                "n_vocab": engine.n_vocab,
                "default_max_tokens": svc.default_max_tokens,
                "chat_template": svc.chat_format is not None,
            }
        if r.extra_bytes:  # its embeddings context, counted beside memory_bytes
            meta["embeddings_bytes"] = r.extra_bytes
        expires = router.expires_in(r)
        status: dict[str, Any] = {"value": "loaded" if r.status == "loaded" else r.status}
        if expires is not None:
            status["expires_in"] = round(expires, 1)
        return {
            "id": m.model_id,
            "object": "model",
            "created": created,
            "owned_by": "localllm",
            "aliases": meta["aliases"],
            "status": status,
            "meta": meta,
        }

    async def models(request: Request) -> Response:
        cards = [model_card(r) for r in router.residents.values()]
        return _json(200, {"object": "list", "data": cards})

    async def model(request: Request) -> Response:
        try:
            return _json(200, model_card(router.lookup(request.path_params["model_id"])))
        except ApiError as exc:
            return _json(exc.status, exc.body())

    async def load_or_unload(request: Request) -> Response:
        try:
            name = parse_model_action(await request.body())
            resident = router.lookup(name)
            if request.url.path.endswith("/unload"):
                if resident.status != "loaded" or resident.pinned:
                    raise ApiError(400, f"model {resident.model_id!r} is not loaded here",
                                   param="model", code="model_not_loaded")  # fmt: skip
                if resident.in_flight:
                    raise ApiError(409, f"model {resident.model_id!r} is answering "
                                   f"{resident.in_flight} request(s); try again when they end",
                                   param="model", code="model_busy")  # fmt: skip
                await router.unload(resident, "stop")
            else:
                await router.load(resident.model_id, "load request")
        except ApiError as exc:
            return _json(exc.status, exc.body())
        return _json(200, {"success": True, "model": resident.model_id, "status": resident.status})

    def loaded() -> list[Resident[Service]]:
        return [r for r in router.residents.values() if r.engine is not None]

    async def health(request: Request) -> Response:
        stats = [r.engine.engine.stats() for r in loaded() if r.engine is not None]
        return _json(
            200,
            {
                "status": "ok",
                "slots_idle": sum(s.n_parallel - s.slots_busy for s in stats),
                "slots_busy": sum(s.slots_busy for s in stats),
                "queued": sum(s.queued for s in stats),
                "models_loaded": [r.model_id for r in loaded()],
            },
        )

    async def metrics_route(request: Request) -> Response:
        stats = [r.engine.engine.stats() for r in loaded() if r.engine is not None]
        text = metrics.render(stats, list(router.residents.values()))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)

    async def server_error(request: Request, exc: Exception) -> Response:
        # Anything a route did not expect (a template bug, a library error) is still a
        # JSON answer; the worker thread is untouched.
        body = ApiError(500, f"internal error: {exc!r}", kind="server_error").body()
        return _json(500, body)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        reaper = asyncio.ensure_future(router.run_reaper())
        try:
            yield
        finally:
            reaper.cancel()

    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/metrics", metrics_route),
        Route("/v1/models", models),
        Route("/v1/models/{model_id:path}", model),
        Route("/models/load", load_or_unload, methods=["POST"]),
        Route("/models/unload", load_or_unload, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={Exception: server_error}, lifespan=lifespan)
    return Guard(
        app,
        api_key=options.api_key,
        host_names=options.host_names(),
        max_body_bytes=options.max_body_bytes,
        body_timeout=options.body_timeout,
        metrics=metrics,
        on_event=on_event,
    )


def _sse(svc: Service, events: Any, held: _Hold) -> EventSourceResponse:
    # The hold is released where the stream ends; the background task covers a stream
    # that never started (the client left before the first byte).
    return EventSourceResponse(
        events,
        sep="\n",
        ping=15,
        send_timeout=svc.options.send_timeout,
        headers={"Cache-Control": "no-store"},
        background=BackgroundTask(held.release),
    )


def _stream_chat(request: Request, held: _Hold, job: Job, req: ChatCompletionRequest) -> Response:
    svc = held.svc
    stream = svc.submit(job)
    rid, created = wire.new_id("chatcmpl"), int(time.time())

    async def events() -> Any:
        done = None
        calls = ToolStream(job.tool_family) if job.tool_family else None
        try:
            yield json.dumps(
                wire.chat_chunk(rid, job.model, created, {"role": "assistant", "content": ""})
            )
            async for event in stream:
                if isinstance(event, TextDelta):
                    lp = wire.chat_logprobs(event.logprobs) if req.logprobs else None
                    if calls is None:
                        delta = {"content": event.text}
                        yield json.dumps(wire.chat_chunk(rid, job.model, created, delta, None, lp))
                        continue
                    for delta in wire.tool_deltas(*calls.push(event.text), lp is not None):
                        yield json.dumps(wire.chat_chunk(rid, job.model, created, delta, None, lp))
                        lp = None
                else:
                    done = event
            assert done is not None
            finish = done.finish_reason
            if calls is not None:
                for delta in wire.tool_deltas(*calls.finish()):
                    yield json.dumps(wire.chat_chunk(rid, job.model, created, delta))
                finish = wire.finish_reason(done, bool(calls.calls))
            last = wire.chat_chunk(rid, job.model, created, {}, finish)
            last["timings"] = wire.timings(done)
            yield json.dumps(last)
            if req.include_usage:
                tail = {**wire.chat_chunk(rid, job.model, created, {}), "choices": []}
                yield json.dumps({**tail, "usage": wire.usage(done)})
        except GenerationFailedError as exc:
            yield json.dumps(_failure_body(exc))
        finally:
            stream.cancel()
            _note_usage(request, done)
            await held.release()
        yield "[DONE]"

    return _sse(svc, events(), held)


def _stream_completion(request: Request, held: _Hold, job: Job, req: CompletionRequest) -> Response:
    svc = held.svc
    stream = svc.submit(job)
    rid, created = wire.new_id("cmpl"), int(time.time())

    async def events() -> Any:
        done = None
        offset = 0
        try:
            async for event in stream:
                if isinstance(event, TextDelta):
                    lp = None
                    if req.logprobs is not None:
                        lp = wire.completion_logprobs(event.logprobs, offset)
                    offset += len(event.text)
                    yield json.dumps(
                        wire.completion_chunk(rid, job.model, created, event.text, None, lp)
                    )
                else:
                    done = event
            assert done is not None
            last = wire.completion_chunk(rid, job.model, created, "", done.finish_reason)
            last["timings"] = wire.timings(done)
            yield json.dumps(last)
            if req.include_usage:
                tail = {**wire.completion_chunk(rid, job.model, created, ""), "choices": []}
                yield json.dumps({**tail, "usage": wire.usage(done)})
        except GenerationFailedError as exc:
            yield json.dumps(_failure_body(exc))
        finally:
            stream.cancel()
            _note_usage(request, done)
            await held.release()
        yield "[DONE]"

    return _sse(svc, events(), held)
