"""Embeddings: a model's pooled hidden state for each text, as llama.cpp's llama-embedding.

A context of its own (``embeddings = True``), apart from any generation context: pooling
is the GGUF's ``{arch}.pooling_type`` when it names one, else mean (a chat model has
none). Several inputs are decoded in one batch as separate sequences (the KV cache is
cleared before each batch; nothing is kept between calls), each sequence's pooled vector
read with ``llama_get_embeddings_seq`` and L2-normalized, as OpenAI's vectors are.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localllm.errors import ContextOverflow, InvalidArgument, LocalLLMError, ModelLoadError
from localllm.runtime import compute_thread
from localllm.runtime.dry_run import DryRunSettings, context_params
from localllm.runtime.library import import_llama_cpp
from localllm.runtime.log import install_log_capture, load_model_file, set_log_echo

__all__ = [
    "POOLING_NAMES",
    "Embedder",
    "EmbeddingError",
    "EmbeddingResult",
    "embed_file",
    "embeddings_settings",
    "pooling_type",
]

POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
POOLING_MEAN = 1  # LLAMA_POOLING_TYPE_MEAN
MAX_SEQUENCES = 16  # inputs decoded together in one batch (llama.cpp allows 256)
_CTX_PAD = 256  # llama.cpp's padding of n_ctx (a multiple of MAX_SEQUENCES)


def pooling_type(value: object) -> int:
    """The pooling of an embeddings context: the GGUF's ``{arch}.pooling_type`` when it
    names one (mean, cls, last), else mean (a chat model names none)."""
    try:
        pooling = int(str(value)) if value is not None else 0
    except ValueError:
        pooling = 0
    return pooling if pooling in (1, 2, 3) else POOLING_MEAN


def embeddings_settings(n_ctx: int, pooling: int) -> DryRunSettings:
    """The context :meth:`Embedder.load` makes, and the one ``serve`` plans for it: ``n_ctx``
    cells (rounded up to 256) shared by up to MAX_SEQUENCES inputs, each input whole in
    one ubatch (pooling reads a sequence's tokens from one ubatch), llama.cpp's flash
    attention and SWA defaults.

    Why 256: llama.cpp pads the context to it, and an input as long as the context must
    still fit one ubatch; and a ubatch that MAX_SEQUENCES does not divide trips a
    GGML_ASSERT (ggml_can_mul_mat) when the context reserves its pooling graph, which
    aborted the process at --ctx 1000 or 300 (tests/test_embeddings.py)."""
    cells = -(-n_ctx // _CTX_PAD) * _CTX_PAD
    return DryRunSettings(
        n_ctx=cells,
        n_seq=MAX_SEQUENCES,
        n_batch=cells,
        n_ubatch=cells,
        flash_attn="auto",
        swa_full=True,
        kv_unified=True,
        embeddings=pooling,
    )


class EmbeddingError(LocalLLMError):
    """llama.cpp failed while computing embeddings."""


@dataclass(frozen=True)
class EmbeddingResult:
    """One vector per input, in order, and the tokens they took."""

    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int
    pooling: str  # mean | cls | last


class Embedder:
    """A model loaded for embeddings. Thread-safe: one batch at a time."""

    def __init__(
        self, lc: Any, model: Any, ctx: Any, path: Path, pooling: int, owns_model: bool = True
    ) -> None:
        self._lc, self._model, self._ctx = lc, model, ctx
        self.owns_model = owns_model  # False: the weights are a generation engine's, kept
        self.path = path
        self.pooling = POOLING_NAMES.get(pooling, str(pooling))
        self._vocab = lc.llama_model_get_vocab(model)
        self.n_ctx = int(lc.llama_n_ctx(ctx))
        self.n_embd = int(lc.llama_model_n_embd_out(model))
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self._n_seq = int(lc.llama_n_seq_max(ctx))
        self._batch = lc.llama_batch_init(self.n_ctx, 0, self._n_seq)
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls, path: str | Path, *, n_ctx: int = 4096, threads: int | None = None, model: Any = None
    ) -> Embedder:
        """Load ``path`` with a ``n_ctx``-token embeddings context (inputs longer are refused).

        ``model``: ``path``'s weights already loaded (a serving engine's ``model_handle``):
        the context is made on them, not on a second copy (repacked weights are a copy)."""
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"no such model file: {path}")
        if n_ctx < 8:
            raise InvalidArgument(f"an embeddings context of {n_ctx} tokens is too small")
        lc = import_llama_cpp()
        install_log_capture()
        set_log_echo(False)
        owns_model = model is None
        if owns_model:
            model, _log = load_model_file(lc, path, lc.llama_model_default_params())
        n_ctx = min(n_ctx, int(lc.llama_model_n_ctx_train(model)) or n_ctx)
        pooling = _gguf_pooling(lc, model)
        params = context_params(lc, embeddings_settings(n_ctx, pooling))
        threads = threads or lc.llama_context_default_params().n_threads
        params.n_threads = params.n_threads_batch = threads
        ctx = lc.llama_init_from_model(model, params)
        if not ctx:
            if owns_model:
                lc.llama_model_free(model)
            raise ModelLoadError(f"llama.cpp could not create an embeddings context for {path}")
        return cls(lc, model, ctx, path, pooling, owns_model)

    def tokenize(self, text: str) -> list[int]:
        """As llama-embedding: BOS/EOS as the vocabulary adds them, control tokens parsed."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            buf = (self._lc.llama_token * cap)()
            n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, cap, True, True)
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def embed(self, inputs: Sequence[str | Sequence[int]]) -> EmbeddingResult:
        """The normalized vectors of ``inputs`` (texts or token ids); ContextOverflow names
        an input over the context, InvalidArgument an empty one or a bad token id."""
        tokens = [self.tokenize(x) if isinstance(x, str) else list(x) for x in inputs]
        for i, toks in enumerate(tokens):
            if not toks:
                raise InvalidArgument(f"input {i} is empty: nothing to embed")
            if len(toks) > self.n_ctx:
                raise ContextOverflow(
                    f"input {i} is {len(toks)} tokens, over the embeddings context of "
                    f"{self.n_ctx}; shorten it (it is never truncated)"
                )
            bad = [t for t in toks if not 0 <= t < self.n_vocab]
            if bad:
                raise InvalidArgument(
                    f"input {i}: token id {bad[0]} is not in the vocabulary (0..{self.n_vocab - 1})"
                )
        vectors: list[tuple[float, ...]] = []
        with self._lock:
            group: list[list[int]] = []
            for toks in tokens:
                if group and (
                    sum(map(len, group)) + len(toks) > self.n_ctx or len(group) >= self._n_seq
                ):
                    vectors += self._decode(group)
                    group = []
                group.append(toks)
            vectors += self._decode(group)
        return EmbeddingResult(tuple(vectors), sum(map(len, tokens)), self.pooling)

    def _decode(self, group: list[list[int]]) -> list[tuple[float, ...]]:
        import numpy as np

        lc, batch = self._lc, self._batch
        lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
        n = 0
        for seq, toks in enumerate(group):
            for pos, token in enumerate(toks):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True
                n += 1
        batch.n_tokens = n
        if compute_thread.decode(lc, self._ctx, batch) != 0:
            raise EmbeddingError(f"llama.cpp could not decode {n} tokens for embeddings")
        out = []
        for seq in range(len(group)):
            ptr = lc.llama_get_embeddings_seq(self._ctx, seq)
            if not ptr:
                raise EmbeddingError("llama.cpp returned no pooled embedding")
            vec = np.ctypeslib.as_array(
                ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_embd,)
            ).astype(np.float64)
            norm = float(np.linalg.norm(vec))
            out.append(tuple((vec / norm if norm > 0 else vec).tolist()))
        return out

    def close(self) -> None:
        if self._ctx is not None:
            self._lc.llama_batch_free(self._batch)
            self._lc.llama_free(self._ctx)
            if self.owns_model:
                self._lc.llama_model_free(self._model)
            self._ctx = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def embed_file(
    path: Path, texts: Sequence[str], *, n_ctx: int = 4096, threads: int | None = None
) -> EmbeddingResult:
    """Load ``path`` for embeddings, embed ``texts``, free it."""
    with Embedder.load(path, n_ctx=n_ctx, threads=threads) as embedder:
        return embedder.embed(texts)


def _meta(lc: Any, model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = lc.llama_model_meta_val_str(model, key.encode(), buf, 256)
    return buf.value.decode("utf-8", errors="replace") if n >= 0 else None


def _gguf_pooling(lc: Any, model: Any) -> int:
    arch = _meta(lc, model, "general.architecture")
    return pooling_type(_meta(lc, model, f"{arch}.pooling_type") if arch else None)
