"""A model's vocabulary on llama.cpp's C API: tokenize, token bytes, special tokens."""

from __future__ import annotations

import ctypes
from typing import Any

__all__ = ["Vocabulary"]


class Vocabulary:
    """The vocabulary of a loaded ``llama_model*`` (the batch engine is one)."""

    def __init__(self, lc: Any, model: Any) -> None:
        self._lc = lc
        self._vocab = lc.llama_model_get_vocab(model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special`` parses control tokens such as <|im_start|>."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            buf = (self._lc.llama_token * cap)()
            n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (control tokens are empty, as chat prints them)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = self._lc.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._lc.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def token_text(self, token: int) -> str:
        """A special token's text (``<s>``, ``<|im_end|>``), "" for none (-1)."""
        if token == -1:
            return ""
        return self._lc.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    @property
    def bos_text(self) -> str:
        return self.token_text(self._lc.llama_vocab_bos(self._vocab))

    @property
    def eos_text(self) -> str:
        return self.token_text(self._lc.llama_vocab_eos(self._vocab))
