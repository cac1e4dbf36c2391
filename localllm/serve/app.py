"""The ASGI app: OpenAI's endpoints over the batch engine, /health, /metrics, the chat page.

Each completion request is checked (schema), formatted with the injected chat format,
tokenized, held against its slot's context, then streamed from the engine. A client
that disconnects cancels its generation, which frees its slot's cells.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from localllm.chat.session import DEFAULT_MAX_TOKENS
from localllm.errors import LocalLLMError
from localllm.generation import ChatMessage
from localllm.runtime.batch_engine import BatchEngine
from localllm.runtime.batch_llama import json_grammar
from localllm.runtime.batch_records import (
    GenerationDone,
    GenerationFailedError,
    GenerationParams,
    PromptFormat,
    TextDelta,
)
from localllm.serve import wire
from localllm.serve.config import EventSink, ServeOptions
from localllm.serve.guard import USAGE_KEY, Guard
from localllm.serve.metrics import Metrics
from localllm.serve.schema import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Sampling,
    parse_chat_completion_request,
    parse_completion_request,
)
from localllm.tools.grammar import ToolGrammar
from localllm.tools.parse import ToolStream, parse_reply
from localllm.tools.setup import needs_tools, prepare_tools
from localllm.tools.spec import ToolError

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


@dataclass(frozen=True)
class _Job:
    """A checked request ready for the engine."""

    prompt: list[int]
    params: GenerationParams
    model: str
    tool_family: str | None = None  # read the reply for calls in this family's format


class _Service:
    def __init__(
        self, options: ServeOptions, engine: BatchEngine, chat_format: PromptFormat | None
    ) -> None:
        self.options = options
        self.engine = engine
        self.chat_format = chat_format
        self.metrics = Metrics()
        self.created = int(time.time())
        self.names = {options.model_id, *options.model_aliases}
        budget = options.max_tokens or min(DEFAULT_MAX_TOKENS, engine.n_ctx_slot // 2)
        self.default_max_tokens = budget

    # ------------------------------------------------------------------ checks
    def check_model(self, model: str | None) -> str:
        if model is not None and model not in self.names:
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server holds "
                f"{self.options.model_id!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        return self.options.model_id

    def params(
        self, prompt: list[int], s: Sampling, max_tokens: int | None, what: str, **extra: Any
    ) -> GenerationParams:
        """The engine's parameters; 400 when the prompt (``what``) and reply cannot fit."""
        budget = max_tokens if max_tokens is not None else self.default_max_tokens
        slot = self.engine.n_ctx_slot
        if len(prompt) + budget > slot:
            o = self.options
            raise ApiError(
                400,
                f"this request needs {len(prompt)} prompt tokens + {budget} max_tokens = "
                f"{len(prompt) + budget} tokens, but each slot holds {slot} "
                f"(--ctx {self.engine.n_ctx} over --parallel {o.parallel}); shorten the "
                "prompt, lower max_tokens, or restart with a larger --ctx",
                param="max_tokens" if max_tokens is not None else what,
                code="context_length_exceeded",
            )
        for token, _ in s.logit_bias:
            if token >= self.engine.n_vocab:
                raise ApiError(
                    400,
                    f"invalid 'logit_bias': token {token} is not in the vocabulary "
                    f"(0..{self.engine.n_vocab - 1})",
                    param="logit_bias",
                )
        return GenerationParams(
            max_tokens=budget,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            repeat_penalty=s.repeat_penalty,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            seed=s.seed,
            logit_bias=s.logit_bias,
            ignore_eos=s.ignore_eos,
            **extra,
        )

    def chat_job(self, req: ChatCompletionRequest) -> _Job:
        model = self.check_model(req.model)
        fmt = self.chat_format
        if fmt is None:
            raise ApiError(
                400,
                f"{self.options.model_path.name} has no chat template; use /v1/completions "
                "with a raw prompt",
                param="messages",
                code="no_chat_template",
            )
        family, tool_grammar = None, None
        try:
            if needs_tools(req.messages, req.tools):
                text, family, tool_grammar = self.render_with_tools(fmt, req)
            else:
                text = fmt.render(req.messages)
        except LocalLLMError as exc:
            raise ApiError(400, str(exc), param="messages", code="template_error") from None
        prompt = self.engine.tokenize(text, add_bos=fmt.add_bos, special=True)
        grammar, triggers, what = None, (), "response_format"
        if req.response_format != "text":
            try:
                grammar = json_grammar(req.json_schema)
            except LocalLLMError as exc:
                raise ApiError(400, str(exc), param="response_format") from None
        elif tool_grammar is not None:
            grammar, triggers, what = tool_grammar.gbnf, tool_grammar.triggers, "tools"
        params = self.params(
            prompt,
            req.sampling,
            req.max_tokens,
            "messages",
            stop=req.sampling.stop + fmt.stop,
            top_logprobs=req.top_logprobs if req.logprobs else None,
            grammar=grammar,
            grammar_triggers=triggers,
            grammar_for=what,
        )
        return _Job(prompt, params, model, family)

    def render_with_tools(
        self, fmt: PromptFormat, req: ChatCompletionRequest
    ) -> tuple[str, str | None, ToolGrammar | None]:
        """The prompt with the tools in the template's own format, the family to read the
        reply in (None with tool_choice none) and the grammar."""
        try:
            setup = prepare_tools(
                fmt.template_text,
                req.messages,
                req.tools,
                req.tool_choice,
                req.parallel_tool_calls,
            )
        except ToolError as exc:
            raise ApiError(400, str(exc), param=exc.param, code="invalid_value") from None
        if setup.family == "generic" or fmt.render_messages is None:
            # The generic format's turns are plain {role, content}: any renderer takes them.
            text = fmt.render([ChatMessage(m["role"], m["content"]) for m in setup.messages])
        else:
            text = fmt.render_messages(setup.messages, setup.extra)
        return text, setup.family if setup.parse_calls else None, setup.grammar

    def completion_job(self, req: CompletionRequest) -> _Job:
        model = self.check_model(req.model)
        if isinstance(req.prompt, str):
            # As llama-cpp-python's create_completion: BOS if the vocabulary wants one,
            # control tokens written in the text are parsed.
            prompt = self.engine.tokenize(req.prompt, add_bos=True, special=True)
        else:
            prompt = list(req.prompt)
            bad = [t for t in prompt if not 0 <= t < self.engine.n_vocab]
            if bad:
                raise ApiError(
                    400,
                    f"invalid 'prompt': token {bad[0]} is not in the vocabulary "
                    f"(0..{self.engine.n_vocab - 1})",
                    param="prompt",
                )
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        params = self.params(
            prompt,
            req.sampling,
            req.max_tokens,
            "prompt",
            stop=req.sampling.stop,
            top_logprobs=req.logprobs,
        )
        return _Job(prompt, params, model)

    # ------------------------------------------------------------------ generation
    def submit(self, job: _Job) -> Any:
        try:
            return self.engine.stream(job.prompt, job.params)
        except LocalLLMError as exc:
            raise ApiError(400, str(exc)) from None

    async def collect(self, request: Request, job: _Job) -> tuple[GenerationDone | None, list]:
        """Run to the end; None when the client disconnected first (its slot is freed)."""
        stream = self.submit(job)
        logprobs: list = []

        async def run() -> GenerationDone:
            async for event in stream:
                if isinstance(event, TextDelta):
                    logprobs.extend(event.logprobs)
                else:
                    return event
            raise GenerationFailedError("the engine ended the request without a result")

        task = asyncio.ensure_future(run())
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                return None, logprobs
            return task.result(), logprobs
        finally:
            gone.cancel()
            stream.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


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
    svc = _Service(options, engine, chat_format)

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


def _sse(svc: _Service, events: Any) -> EventSourceResponse:
    return EventSourceResponse(
        events,
        sep="\n",
        ping=15,
        send_timeout=svc.options.send_timeout,
        headers={"Cache-Control": "no-store"},
    )


def _stream_chat(
    request: Request, svc: _Service, job: _Job, req: ChatCompletionRequest
) -> Response:
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
    request: Request, svc: _Service, job: _Job, req: CompletionRequest
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
