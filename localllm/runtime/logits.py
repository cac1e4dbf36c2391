"""Score token chunks with llama.cpp's low-level batch API, the way llama-perplexity does.

Going below ``Llama.eval`` matters for speed: the batch asks llama.cpp for logits only
at the positions that are scored (the second half of a chunk), and each batch's
log-probabilities are reduced to two sums at once, so a 32k-token chunk never holds
16k x vocab floats in memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from localllm.errors import ModelLoadError
from localllm.runtime.llama import LoadedModel

__all__ = ["BatchScored", "bos_policy", "score_chunk"]

# Rows of logits turned into log-probabilities at a time: bounds numpy's temporaries.
_ROWS_PER_STEP = 256


@dataclass(frozen=True)
class BatchScored:
    """One decoded batch of a chunk: sums over the positions it scored."""

    n_evaluated: int  # tokens decoded in this batch
    n_scored: int  # positions whose next token was scored
    nll: float  # sum of -log p(next token)
    nll2: float  # sum of squares of the same
    seconds: float  # wall time of the decode and the scoring


def bos_policy(model: LoadedModel) -> int | None:
    """The BOS id when the vocabulary adds one (llama_vocab_get_add_bos), else None."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(model.llama._model.model)
    if not llama_cpp.llama_vocab_get_add_bos(vocab):
        return None
    return int(llama_cpp.llama_vocab_bos(vocab))


def score_chunk(
    model: LoadedModel, tokens: Sequence[int], first: int, n_batch: int
) -> Iterator[BatchScored]:
    """Decode ``tokens`` from position 0 in a fresh KV cache; score positions >= ``first``.

    Position ``i`` (for ``first <= i < len(tokens) - 1``) is scored by the log-softmax
    its logits give to ``tokens[i + 1]``, as llama-perplexity's ``process_logits`` does.
    """
    import ctypes

    import llama_cpp
    import numpy as np

    n = len(tokens)
    if n > model.n_ctx:
        raise ModelLoadError(f"a chunk of {n} tokens does not fit the context of {model.n_ctx}")
    if n_batch > model.llama.n_batch:
        raise ModelLoadError(f"batch {n_batch} exceeds the context's batch {model.llama.n_batch}")
    ctx = model.llama._ctx.ctx
    n_vocab = int(model.llama.n_vocab())
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    try:
        for start in range(0, n, n_batch):
            t0 = time.perf_counter()
            size = min(n_batch, n - start)
            batch.n_tokens = size
            wanted: list[int] = []
            for k in range(size):
                pos = start + k
                batch.token[k] = tokens[pos]
                batch.pos[k] = pos
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = 0
                # The last token's logits predict nothing inside the chunk.
                need = first <= pos < n - 1
                batch.logits[k] = 1 if need else 0
                if need:
                    wanted.append(pos)
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise ModelLoadError(
                    f"llama_decode failed (code {rc}) at position {start} of a {n}-token chunk"
                )
            nll = nll2 = 0.0
            if wanted:
                pointer = llama_cpp.llama_get_logits(ctx)
                flat = np.ctypeslib.as_array(
                    ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
                    shape=(len(wanted) * n_vocab,),
                )
                targets = np.asarray([tokens[p + 1] for p in wanted], dtype=np.int64)
                nll, nll2 = _nll_sums(flat.reshape(len(wanted), n_vocab), targets)
            yield BatchScored(size, len(wanted), nll, nll2, time.perf_counter() - t0)
    finally:
        llama_cpp.llama_batch_free(batch)


def _nll_sums(logits: Any, targets: Any) -> tuple[float, float]:
    """Sum and sum of squares of -log softmax(logits)[target], row by row."""
    import numpy as np

    nll = nll2 = 0.0
    for lo in range(0, len(targets), _ROWS_PER_STEP):
        rows = logits[lo : lo + _ROWS_PER_STEP]
        # llama.cpp: max in float, exp in float, sum in double.
        top = rows.max(axis=1)
        shifted = rows - top[:, None]
        log_sum = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64))
        picked = shifted[np.arange(len(rows)), targets[lo : lo + _ROWS_PER_STEP]]
        values = log_sum - picked.astype(np.float64)
        nll += float(values.sum())
        nll2 += float((values * values).sum())
    return nll, nll2
