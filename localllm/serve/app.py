"""The ASGI app: OpenAI's endpoints over the batch engine, /health, /metrics, the chat page.

Each completion request is checked (schema), made a job (service), then streamed from the
engine. A client that disconnects cancels its generation, which frees its slot's cells.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from localllm.errors import LocalLLMError
from localllm.runtime.batch_engine import BatchEngine
from localllm.runtime.batch_records import (
    GenerationDone,
    GenerationFailedError,
    PromptFormat,
    TextDelta,
)
from localllm.serve import wire
from localllm.serve.config import EventSink, ServeOptions
from localllm.serve.embeddings import embeddings_response, parse_embeddings_request
from localllm.serve.guard import USAGE_KEY, Guard
from localllm.serve.schema import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_chat_completion_request,
    parse_completion_request,
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


# Long: the routes are closures over the engine, options and metrics they share.
def build_app(
    options: ServeOptions,
    engine: BatchEngine,
    chat_format: PromptFormat | None,
    on_event: EventSink | None = None,
) -> Guard:
    """The whole ASGI app for ``engine``: routes behind the Host/Origin/auth/body guard."""
    svc = Service(options, engine, chat_format)

    async def chat_completions(request: Request) -> Response:
        try:
            req = parse_chat_completion_request(await request.body())
            # Rendering and tokenizing may take a while on long prompts: not on the event loop.
            job = await run_in_threadpool(svc.chat_job, req)
            if req.stream:
                return _stream_chat(request, svc, job, req)
            done, entries = await svc.collect(request, job)
        except ApiError as exc:
            return _json(exc.status, exc.body())
        except GenerationFailedError as exc:
            return _json(500, _failure_body(exc))
        _note_usage(request, done)
        if done is None:
            return Response(status_code=499)
        logprobs = wire.chat_logprobs(entries) if req.logprobs else None
        parsed = parse_reply(job.tool_family, done.text) if job.tool_family else None
        body = wire.chat_response(wire.new_id("chatcmpl"), job.model, done, logprobs, parsed)
        return _json(200, body)

    async def completions(request: Request) -> Response:
        try:
            req = parse_completion_request(await request.body())
            job = await run_in_threadpool(svc.completion_job, req)
            if req.stream:
                return _stream_completion(request, svc, job, req)
            done, entries = await svc.collect(request, job)
        except ApiError as exc:
            return _json(exc.status, exc.body())
        except GenerationFailedError as exc:
            return _json(500, _failure_body(exc))
        _note_usage(request, done)
        if done is None:
            return Response(status_code=499)
        logprobs = wire.completion_logprobs(entries, 0) if req.logprobs is not None else None
        body = wire.completion_response(wire.new_id("cmpl"), job.model, done, logprobs)
        return _json(200, body)

    async def embeddings(request: Request) -> Response:
        try:
            req = parse_embeddings_request(await request.body())
            result = await run_in_threadpool(svc.embed, req)
        except ApiError as exc:
            return _json(exc.status, exc.body())
        except LocalLLMError as exc:
            return _json(500, _failure_body(exc))
        request.scope.setdefault("state", {})[USAGE_KEY] = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": 0,
            "finish_reason": "stop",
        }
        body = embeddings_response(result, options.model_id, req.encoding_format)
        return _json(200, body)

    def model_card() -> dict[str, Any]:
        return {
            "id": options.model_id,
            "object": "model",
            "created": svc.created,
            "owned_by": "localllm",
            "meta": {
                "n_ctx": engine.n_ctx,
                "n_ctx_slot": engine.n_ctx_slot,
                "n_parallel": engine.n_parallel,
                "n_ctx_train": engine.n_ctx_train,
                "n_vocab": engine.n_vocab,
                "default_max_tokens": svc.default_max_tokens,
                "chat_template": chat_format is not None,
                "aliases": sorted(svc.names - {options.model_id}),
            },
        }

    async def models(request: Request) -> Response:
        return _json(200, {"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        try:
            svc.check_model(request.path_params["model_id"])
        except ApiError as exc:
            return _json(exc.status, exc.body())
        return _json(200, model_card())

    async def health(request: Request) -> Response:
        s = engine.stats()
        return _json(
            200,
            {
                "status": "ok",
                "slots_idle": s.n_parallel - s.slots_busy,
                "slots_busy": s.slots_busy,
                "queued": s.queued,
            },
        )

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(
            svc.metrics.render(engine.stats()), media_type="text/plain; version=0.0.4"
        )

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)

    async def server_error(request: Request, exc: Exception) -> Response:
        # Anything a route did not expect (a template bug, a library error) is still a
        # JSON answer; the worker thread is untouched.
        body = ApiError(500, f"internal error: {exc!r}", kind="server_error").body()
        return _json(500, body)

    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/models/{model_id:path}", model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={Exception: server_error})
    return Guard(
        app,
        api_key=options.api_key,
        host_names=options.host_names(),
        max_body_bytes=options.max_body_bytes,
        body_timeout=options.body_timeout,
        metrics=svc.metrics,
        on_event=on_event,
    )


def _sse(svc: Service, events: Any) -> EventSourceResponse:
    return EventSourceResponse(
        events,
        sep="\n",
        ping=15,
        send_timeout=svc.options.send_timeout,
        headers={"Cache-Control": "no-store"},
    )


def _stream_chat(request: Request, svc: Service, job: Job, req: ChatCompletionRequest) -> Response:
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
        yield "[DONE]"

    return _sse(svc, events())


def _stream_completion(
    request: Request, svc: Service, job: Job, req: CompletionRequest
) -> Response:
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
        yield "[DONE]"

    return _sse(svc, events())
