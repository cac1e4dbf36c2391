"""A draft model for speculative decoding (``--draft MODEL``): its own context and KV cache.

Each of the engine's slots has a sequence here too. To draft for a slot, the draft
sequence is brought up to the slot's tokens (the common prefix kept, the rest decoded),
then the draft model continues greedily, one token per decode, while it is confident
(llama.cpp's ``p_min``). Its vocabulary must be the target's: llama.cpp's
``common_speculative_are_compatible`` rules, checked at load.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localllm.errors import InvalidArgument, ModelLoadError
from localllm.runtime import compute_thread
from localllm.runtime.batch_jobs import common_prefix
from localllm.runtime.batch_llama import context_params, model_params
from localllm.runtime.log import load_model_file
from localllm.runtime.params import LoadOptions

__all__ = ["DRAFT_P_MIN", "DraftModel", "vocab_mismatch"]

DRAFT_P_MIN = 0.75  # llama.cpp's --draft-p-min: stop drafting below this confidence
VOCAB_MAX_SIZE_DIFFERENCE = 128  # llama.cpp's SPEC_VOCAB_MAX_SIZE_DIFFERENCE
VOCAB_CHECK_START_TOKEN_ID = 5  # llama.cpp's SPEC_VOCAB_CHECK_START_TOKEN_ID


def vocab_mismatch(lc: Any, target: Any, draft: Any) -> str | None:
    """Why ``draft``'s vocabulary cannot draft for ``target``'s, None when it can."""
    vt, vd = lc.llama_model_get_vocab(target), lc.llama_model_get_vocab(draft)
    if lc.llama_vocab_type(vt) != lc.llama_vocab_type(vd):
        return "its tokenizer type differs from the target's"
    for what, add, tok in (
        ("BOS", lc.llama_vocab_get_add_bos, lc.llama_vocab_bos),
        ("EOS", lc.llama_vocab_get_add_eos, lc.llama_vocab_eos),
    ):
        if add(vt) != add(vd) or (add(vt) and tok(vt) != tok(vd)):
            return f"its {what} token differs from the target's"
    nt, nd = int(lc.llama_vocab_n_tokens(vt)), int(lc.llama_vocab_n_tokens(vd))
    if abs(nt - nd) > VOCAB_MAX_SIZE_DIFFERENCE:
        return f"its vocabulary has {nd} tokens, the target's {nt}"
    for i in range(VOCAB_CHECK_START_TOKEN_ID, min(nt, nd)):
        if lc.llama_vocab_get_text(vt, i) != lc.llama_vocab_get_text(vd, i):
            return f"token {i} differs from the target's"
    return None


class DraftModel:
    """The draft model's context: one sequence per engine slot."""

    def __init__(self, lc: Any, model: Any, ctx: Any, n_batch: int) -> None:
        self._lc, self._model, self._ctx = lc, model, ctx
        self._mem = lc.llama_get_memory(ctx)
        self._n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model)))
        self._n_batch = n_batch
        self._batch = lc.llama_batch_init(n_batch, 0, 1)
        self._held: dict[int, list[int]] = {}
        self.n_ctx_slot = int(lc.llama_n_ctx_seq(ctx))

    @classmethod
    def load(
        cls, lc: Any, target: Any, path: Path, options: LoadOptions, parallel: int
    ) -> DraftModel:
        """Load ``path`` as a draft for ``target`` (InvalidArgument when the vocabularies
        differ), with a context as large as the target's."""
        if not path.is_file():
            raise ModelLoadError(f"no such draft model file: {path}")
        model, _ = load_model_file(lc, path, model_params(lc, options, True))
        problem = vocab_mismatch(lc, target, model)
        if problem is not None:
            lc.llama_model_free(model)
            raise InvalidArgument(
                f"--draft {path.name} cannot draft for this model: {problem}; "
                "use a draft model of the same family (the same tokenizer)"
            )
        ctx = lc.llama_init_from_model(model, context_params(lc, options, parallel))
        if not ctx:
            lc.llama_model_free(model)
            raise ModelLoadError(f"llama.cpp could not create a context for {path.name}")
        return cls(lc, model, ctx, options.n_batch)

    def draft(self, seq: int, history: Sequence[int], limit: int) -> list[int]:
        """Up to ``limit`` tokens the draft model expects after ``history``."""
        import numpy as np

        lc = self._lc
        held = self._held.setdefault(seq, [])
        if len(history) + limit >= self.n_ctx_slot:
            return []
        keep = min(common_prefix(held, history), len(history) - 1)
        if keep < len(held):
            lc.llama_memory_seq_rm(self._mem, seq, keep, -1)
            del held[keep:]
        if not self._decode(seq, held, list(history[keep:])):
            return []
        out: list[int] = []
        while len(out) < limit:
            logits = np.ctypeslib.as_array(
                lc.llama_get_logits_ith(self._ctx, -1), shape=(self._n_vocab,)
            )
            token = int(logits.argmax())
            shifted = np.exp(logits - logits[token])
            if 1.0 / float(shifted.sum()) < DRAFT_P_MIN:
                break
            out.append(token)
            if len(out) == limit or not self._decode(seq, held, [token]):
                break
        return out

    def _decode(self, seq: int, held: list[int], tokens: list[int]) -> bool:
        lc, b = self._lc, self._batch
        for start in range(0, len(tokens), self._n_batch):
            chunk = tokens[start : start + self._n_batch]
            for i, token in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = token, len(held) + i, 1
                b.seq_id[i][0] = seq
                b.logits[i] = i == len(chunk) - 1
            b.n_tokens = len(chunk)
            if compute_thread.decode(lc, self._ctx, b) != 0:
                lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
                held.clear()
                return False
            held.extend(chunk)
        return True

    def close(self) -> None:
        lc = self._lc
        lc.llama_batch_free(self._batch)
        lc.llama_free(self._ctx)
        lc.llama_model_free(self._model)
