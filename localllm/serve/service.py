"""One served model's side of a request: checks, tokenizing, and the run on its engine.

A request's body is checked against this model (its context per slot, its vocabulary,
its chat format) and becomes a :class:`Job`; :meth:`Service.collect` runs it to the end,
cancelling it when the client disconnects (which frees its slot's cells).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from localllm.chat.session import DEFAULT_MAX_TOKENS
from localllm.errors import ContextOverflow, InvalidArgument, LocalLLMError
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
from localllm.runtime.embeddings import Embedder, EmbeddingResult
from localllm.serve.config import ServedModel, ServeOptions
from localllm.serve.embeddings import EmbeddingsRequest
from localllm.serve.schema import ApiError, ChatCompletionRequest, CompletionRequest, Sampling
from localllm.tools.api import ToolError
from localllm.tools.calling import needs_tools, prepare_tools
from localllm.tools.grammar import ToolGrammar

__all__ = ["Job", "Service", "wait_disconnect"]


@dataclass(frozen=True)
class Job:
    """A checked request ready for the engine."""

    prompt: list[int]
    params: GenerationParams
    model: str
    tool_family: str | None = None  # read the reply for calls in this family's format


class Service:
    """One loaded model: its engine, chat format and the checks its requests pass."""

    def __init__(
        self,
        options: ServeOptions,
        served: ServedModel,
        engine: BatchEngine,
        chat_format: PromptFormat | None,
    ) -> None:
        self.options = options
        self.served = served
        self.engine = engine
        self.chat_format = chat_format
        self.created = int(time.time())
        budget = options.max_tokens or min(DEFAULT_MAX_TOKENS, engine.n_ctx_slot // 2)
        self.default_max_tokens = budget
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()

    # ------------------------------------------------------------------ embeddings
    @property
    def has_embedder(self) -> bool:
        return self._embedder is not None

    def embeddings_bytes(self) -> int:
        """What the embeddings context :meth:`embed` makes will take (KV, compute, outputs):
        llama.cpp's dry run of it, for the router to count before it is made."""
        from localllm.plan.embeddings_plan import plan_embeddings_context

        load = self.served.load
        return plan_embeddings_context(self.served.path, load.n_ctx, load.repack).total_bytes

    def embed(self, req: EmbeddingsRequest) -> EmbeddingResult:
        """The request's vectors (from a worker thread): an embeddings context of --ctx
        tokens is made on the engine's own weights on the first request, beside the
        generation slots (closed before the engine: see close_embedder)."""
        with self._embedder_lock:
            if self._embedder is None:
                load = self.served.load
                self._embedder = Embedder.load(
                    self.served.path,
                    n_ctx=load.n_ctx,
                    threads=load.threads_batch,
                    model=self.engine.model_handle,
                )
        try:
            return self._embedder.embed(req.inputs)
        except (InvalidArgument, ContextOverflow) as exc:
            code = "context_length_exceeded" if isinstance(exc, ContextOverflow) else None
            raise ApiError(400, str(exc), param="input", code=code) from None

    def close_embedder(self) -> None:
        """Free the embeddings context: before the engine, whose weights it uses."""
        with self._embedder_lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None

    # ------------------------------------------------------------------ checks
    def params(
        self, prompt: list[int], s: Sampling, max_tokens: int | None, what: str, **extra: Any
    ) -> GenerationParams:
        """The engine's parameters; 400 when the prompt (``what``) and reply cannot fit."""
        budget = max_tokens if max_tokens is not None else self.default_max_tokens
        slot = self.engine.n_ctx_slot
        if len(prompt) + budget > slot:
            raise ApiError(
                400,
                f"this request needs {len(prompt)} prompt tokens + {budget} max_tokens = "
                f"{len(prompt) + budget} tokens, but each slot holds {slot} "
                f"(--ctx {self.engine.n_ctx} over --parallel {self.engine.n_parallel}); "
                "shorten the prompt, lower max_tokens, or restart with a larger --ctx",
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

    def chat_job(self, req: ChatCompletionRequest) -> Job:
        model = self.served.model_id
        fmt = self.chat_format
        if fmt is None:
            raise ApiError(
                400,
                f"{self.served.path.name} has no chat template; use /v1/completions "
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
        return Job(prompt, params, model, family)

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

    def completion_job(self, req: CompletionRequest) -> Job:
        model = self.served.model_id
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
        return Job(prompt, params, model)

    # ------------------------------------------------------------------ generation
    def submit(self, job: Job) -> Any:
        try:
            return self.engine.stream(job.prompt, job.params)
        except LocalLLMError as exc:
            raise ApiError(400, str(exc)) from None

    async def collect(self, request: Request, job: Job) -> tuple[GenerationDone | None, list]:
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
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                return None, logprobs
            return task.result(), logprobs
        finally:
            gone.cancel()
            stream.cancel()


async def wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
