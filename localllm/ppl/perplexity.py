"""Perplexity of a model on a text, computed the way llama.cpp's llama-perplexity does.

The method (tools/perplexity/perplexity.cpp, ``perplexity()``):

- the whole text is tokenized once, with BOS if the vocabulary adds one;
- it is cut into ``n_chunk = len(tokens) // ctx`` chunks of ``ctx`` tokens (``--chunks``
  caps that); a text of fewer than ``2 * ctx`` tokens is refused;
- each chunk is evaluated in a fresh KV cache from position 0, its first token replaced
  by BOS (when the vocabulary adds one);
- only the second half is scored: positions ``first = ctx // 2`` to ``ctx - 2`` each
  score the log-probability of the next token, ``ctx - first - 1`` per chunk;
- ``ppl = exp(mean(nll))``, its error ``ppl * sqrt((mean(nll**2) - mean(nll)**2) / (n - 1))``.

The built-in text (used when no file is given) is Python's own ``pydoc_data.topics``:
the reference pages of the language, about 120k tokens of English, present wherever
CPython is, so the demo, the tests and the benchmark need no download.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from localllm.errors import InvalidArgument
from localllm.flags import check_count, check_rope_method, check_threads, threads_warning
from localllm.generation import Notice
from localllm.gguf.spec import ModelSpec, read_model_spec
from localllm.plan.preload import LoadPlan, check_load_fits, plan_load
from localllm.plan.rope import RopePlan, plan_rope
from localllm.plan.split import check_split_load
from localllm.runtime.devices import split_applies
from localllm.runtime.llama import LoadedModel, load_model
from localllm.runtime.logits import bos_policy, score_chunk
from localllm.runtime.params import LoadOptions
from localllm.store.resolver import require_local_file, resolve_model

__all__ = [
    "BUILTIN_TEXT_NAME",
    "MIN_CTX",
    "PerplexityProgress",
    "PerplexityResult",
    "builtin_text",
    "iter_perplexity",
    "perplexity_stats",
    "read_text",
]

BUILTIN_TEXT_NAME = "pydoc"
# llama-perplexity's default batch: chunks longer than this are decoded in pieces.
PPL_BATCH = 2048
# Below this a chunk scores too few tokens for an error estimate.
MIN_CTX = 8


def builtin_text() -> str:
    """Python's pydoc topics (the language reference pages) joined in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"


def read_text(file: str | os.PathLike[str] | None) -> tuple[str, str]:
    """The text to score and a name for it: the file, or the built-in pydoc text."""
    if file is None or str(file) == BUILTIN_TEXT_NAME:
        return builtin_text(), "pydoc_data.topics (built-in)"
    path = Path(file).expanduser()
    if not path.exists():
        raise InvalidArgument(
            f"no such text file: {file}; give an existing file, or omit --file for the "
            "built-in pydoc text"
        )
    if path.is_dir():
        raise InvalidArgument(f"{file} is a directory; give a text file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {file}: {exc.strerror}") from None
    text = raw.decode("utf-8", errors="replace")
    if not text.strip():
        raise InvalidArgument(f"{file} is empty; perplexity needs text to score")
    return text, str(path)


@dataclass(frozen=True)
class PerplexityProgress:
    """Emitted after every decoded batch, for a progress bar."""

    tokens_done: int  # tokens decoded so far
    tokens_total: int  # chunks x ctx
    chunk: int  # 1-based chunk being decoded
    chunks: int
    ppl: float | None  # running estimate over what was scored so far
    tokens_per_second: float


@dataclass(frozen=True)
class PerplexityResult:
    """The final estimate and how it was obtained."""

    ppl: float
    ppl_stderr: float
    ctx: int
    chunks: int
    tokens: int  # tokens scored (the ppl averages over these)
    tokens_evaluated: int  # chunks x ctx
    text_tokens: int  # the whole text, tokenized
    text: str  # where the text came from
    model: str
    rope: RopePlan
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_evaluated / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "ppl": self.ppl,
            "ppl_stderr": self.ppl_stderr,
            "ctx": self.ctx,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "rope": self.rope.as_json(),
            "tokens_evaluated": self.tokens_evaluated,
            "text_tokens": self.text_tokens,
            "text": self.text,
            "model": self.model,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
        }


def perplexity_stats(nll: float, nll2: float, count: int) -> tuple[float, float]:
    """(ppl, stderr of ppl) from the sums, exactly as perplexity.cpp finishes them."""
    mean = nll / count
    ppl = math.exp(mean)
    var = nll2 / count - mean * mean
    if var <= 0 or count < 2:
        return ppl, 0.0
    return ppl, math.sqrt(var / (count - 1)) * ppl


def validate_request(ctx: int, chunks: int | None, rope: str | None = None) -> None:
    """Reject bad flag values before anything is read or loaded."""
    check_rope_method(rope)
    if ctx <= 0:
        raise InvalidArgument(f"--ctx {ctx} must be a positive token count, e.g. --ctx 512")
    if ctx < MIN_CTX:
        raise InvalidArgument(f"--ctx {ctx} is too small to score; use at least {MIN_CTX}")
    check_count(ctx, "--ctx")
    if chunks is not None and chunks <= 0:
        raise InvalidArgument(f"--chunks {chunks} must be positive (omit it to use every chunk)")


def iter_perplexity(
    model_ref: str | None,
    file: str | os.PathLike[str] | None,
    ctx: int,
    rope: str | None = None,
    chunks: int | None = None,
    options: LoadOptions | None = None,
    memory_check: bool = True,
) -> Iterator[RopePlan | Notice | PerplexityProgress | PerplexityResult]:
    """Score the text in chunks of ``ctx`` tokens.

    Yields the RoPE plan first (before the model loads), any notice about the load, then
    progress after every decoded batch, and last the result.
    """
    validate_request(ctx, chunks, rope)
    check_threads((options or LoadOptions()).n_threads)
    text, text_name = read_text(file)
    resolved = resolve_model(model_ref)
    path = require_local_file(resolved)
    spec = read_model_spec(path)
    plan = plan_rope(spec, ctx, rope)
    yield plan
    n_batch = min(PPL_BATCH, ctx)
    options = replace(
        options or LoadOptions(),
        n_ctx=ctx,
        n_batch=n_batch,
        n_ubatch=min(512, n_batch),
        rope=plan.params,
    )
    if memory_check and split_applies(options):
        check_split_load(resolved.alias or path.name, path, options)
    elif memory_check:
        check_load_fits(_memory_plan(resolved.alias or path.name, spec, options, plan))
    if message := threads_warning(options.n_threads):
        yield Notice(message)
    model = load_model(path, options)
    try:
        if model.repack.note:
            yield Notice(model.repack.note)
        tokens = model.tokenize(text, add_bos=True, special=False)
        n_chunks = _chunk_count(len(tokens), ctx, chunks, text_name)
        sums = _Sums()
        yield from _score_chunks(model, tokens, ctx, n_chunks, n_batch, sums)
        ppl, stderr = perplexity_stats(sums.nll, sums.nll2, sums.count)
        yield PerplexityResult(
            ppl=ppl,
            ppl_stderr=stderr,
            ctx=ctx,
            chunks=n_chunks,
            tokens=sums.count,
            tokens_evaluated=n_chunks * ctx,
            text_tokens=len(tokens),
            text=text_name,
            model=path.name,
            rope=plan,
            seconds=sums.busy,
        )
    finally:
        model.close()


def _chunk_count(n_tokens: int, ctx: int, chunks: int | None, text_name: str) -> int:
    """Chunks of ``ctx`` tokens to score (--chunks caps them); two at least, as llama.cpp."""
    if n_tokens < 2 * ctx:
        raise InvalidArgument(
            f"{text_name} is {n_tokens} tokens; --ctx {ctx} needs at least "
            f"{2 * ctx} (two chunks): use a smaller --ctx or a longer text"
        )
    return min(chunks, n_tokens // ctx) if chunks is not None else n_tokens // ctx


def _memory_plan(label: str, spec: ModelSpec, options: LoadOptions, rope: RopePlan) -> LoadPlan:
    return plan_load(
        label,
        spec,
        n_ctx=options.n_ctx,
        flash_attn=options.flash_attn,
        ubatch=options.n_ubatch,
        rope=rope.method,
        swa_full=options.swa_full,
        n_batch=options.n_batch,
        repack=options.repack,
    )


@dataclass
class _Sums:
    """Running sums over the scored positions, as perplexity.cpp keeps them."""

    nll: float = 0.0
    nll2: float = 0.0
    count: int = 0
    done: int = 0
    busy: float = 0.0


def _score_chunks(
    model: LoadedModel, tokens: list[int], ctx: int, n_chunks: int, n_batch: int, sums: _Sums
) -> Iterator[PerplexityProgress]:
    """Each chunk from a fresh KV cache, its first token BOS, its second half scored."""
    bos = bos_policy(model)
    first = ctx // 2
    total = n_chunks * ctx
    for index in range(n_chunks):
        chunk = tokens[index * ctx : (index + 1) * ctx]
        if bos is not None:
            chunk[0] = bos
        for scored in score_chunk(model, chunk, first, n_batch):
            sums.nll += scored.nll
            sums.nll2 += scored.nll2
            sums.count += scored.n_scored
            sums.done += scored.n_evaluated
            sums.busy += scored.seconds
            yield PerplexityProgress(
                tokens_done=sums.done,
                tokens_total=total,
                chunk=index + 1,
                chunks=n_chunks,
                ppl=math.exp(sums.nll / sums.count) if sums.count else None,
                tokens_per_second=sums.done / sums.busy if sums.busy > 0 else 0.0,
            )
