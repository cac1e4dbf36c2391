"""A model kept loaded through llama-cpp-python's ``Llama``: tokenize, format, stream a chat.

Keeping one ``Llama`` alive is what lets llama-cpp-python reuse the KV prefix of the
previous chat turn; callers load once and stream many times.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from localllm.errors import ContextOverflow, ModelLoadError
from localllm.generation import GenerationStats, TextChunk
from localllm.runtime.devices import rpc_load_devices
from localllm.runtime.library import RepackChoice, choose_repack, import_llama_cpp
from localllm.runtime.log import (
    install_log_capture,
    log_mark,
    log_since,
    parse_buffer_report,
    set_log_echo,
)
from localllm.runtime.params import LoadOptions, SamplingOptions, context_fields, rope_fields

__all__ = ["LoadedModel", "load_model"]


class LoadedModel:
    """A model with its context, kept loaded for a whole session."""

    def __init__(
        self, llama: Any, path: Path, options: LoadOptions, log: list[str], repack: RepackChoice
    ):
        self.llama = llama
        self.path = path
        self.options = options
        self.load_log = log
        self.buffers = parse_buffer_report(log)
        self.repack = repack

    # -- facts
    @property
    def n_ctx(self) -> int:
        return int(self.llama.n_ctx())

    @property
    def n_swa(self) -> int:
        """The sliding window of the model's SWA layers, in tokens (0: none)."""
        import llama_cpp

        return int(llama_cpp.llama_model_n_swa(self.llama._model.model))

    def window_moved_past(self, prompt: Sequence[int]) -> bool:
        """Whether reusing the cached prefix of ``prompt`` would be wrong: the SWA cache
        (sized to the window) no longer holds tokens the first new token attends to.

        llama-cpp-python reuses the longest common prefix without checking; llama-server
        checks ``llama_memory_seq_pos_min`` first, and so does this: a token at position
        p attends to positions above p - n_swa, so the cache must still reach back there.
        """
        if self.options.swa_full or self.kv_used == 0 or self.n_swa <= 0:
            return False
        import llama_cpp

        cached = self.llama._input_ids
        n_past = min(self.llama.longest_token_prefix(cached, prompt), len(prompt) - 1)
        if n_past <= 0:
            return False
        memory = llama_cpp.llama_get_memory(self.llama._ctx.ctx)
        pos_min = int(llama_cpp.llama_memory_seq_pos_min(memory, 0))
        return pos_min > max(0, n_past - self.n_swa)

    @property
    def kv_used(self) -> int:
        """Cells of the KV cache that hold tokens of the current conversation."""
        return int(self.llama.n_tokens)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return list(self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llama.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        """A special token's text (``<s>``, ``</s>``, ``<|im_end|>``), "" for none (-1)."""
        return "" if token == -1 else str(self.llama._model.token_get_text(token))

    @property
    def bos_text(self) -> str:
        return self.token_text(self.llama.token_bos())

    @property
    def eos_text(self) -> str:
        return self.token_text(self.llama.token_eos())

    def prompt_tokens(self, prompt: str, *, add_bos: bool) -> list[int]:
        """A formatted prompt as tokens: special tokens parsed, BOS as the vocabulary asks."""
        return self.tokenize(prompt, add_bos=add_bos, special=True)

    # -- generation
    # Long: one try/finally around llama-cpp-python's generator, which must be closed now
    # (not at garbage collection mid-turn); splitting it would split that guarantee.
    def stream_completion(
        self,
        prompt: Sequence[int],
        sampling: SamplingOptions,
        *,
        stop_strings: Sequence[str] = (),
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[TextChunk | GenerationStats]:
        """Continue ``prompt`` (tokens); streams text, the last item is the stats.

        This is what llama-cpp-python's chat completion does once it has formatted the
        chat: the same ``create_completion`` call, so a chat reply is the same either way.
        ``stop`` is polled after each chunk: when it returns true the reply ends there
        (finish reason "interrupted") with the KV cache consistent for the next turn.
        """
        sampling.validate()
        import llama_cpp

        reevaluated = self.window_moved_past(prompt)
        if reevaluated:
            self.reset()  # the whole prompt is evaluated again, its window complete
        llama_cpp.llama_perf_context_reset(self.llama._ctx.ctx)
        if sampling.seed is not None:
            self.llama.set_seed(sampling.seed)
        eos = self.llama.token_eos()
        start = time.perf_counter()
        pieces: list[str] = []
        finish = "interrupted"
        stream: Any = None
        first: float | None = None
        try:
            stream = self.llama.create_completion(
                prompt=list(prompt),
                stream=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                min_p=sampling.min_p,
                repeat_penalty=sampling.repeat_penalty,
                max_tokens=sampling.max_tokens,
                seed=sampling.seed,
                stop=list(stop_strings),
                stopping_criteria=llama_cpp.StoppingCriteriaList(
                    [lambda tokens, _logits: eos != -1 and tokens[-1] == eos]
                ),
            )
            for chunk in stream:
                choice = chunk["choices"][0]
                if text := choice.get("text"):
                    first = first or time.perf_counter()
                    pieces.append(text)
                    yield TextChunk(text)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                elif stop is not None and stop():
                    break
        except ValueError as exc:
            # llama-cpp-python raises ValueError when the prompt exceeds the context.
            raise ContextOverflow(str(exc)) from None
        finally:
            if stream is not None:
                # Finish llama-cpp-python's generator now, not at garbage collection
                # in the middle of a later turn.
                stream.close()
        stats = self._stats("".join(pieces), finish, (first or time.perf_counter()) - start)
        yield replace(stats, window_reevaluated=reevaluated)

    def _stats(self, text: str, finish: str, ttft: float) -> GenerationStats:
        import llama_cpp

        perf = llama_cpp.llama_perf_context(self.llama._ctx.ctx)
        generated = int(perf.n_eval)
        # One sampled token is evaluated per step; the last sampled token is not.
        return GenerationStats(
            text=text,
            finish_reason=finish,
            prompt_tokens=max(self.kv_used - generated, 0),
            prompt_evaluated=int(perf.n_p_eval),
            generated_tokens=generated + (1 if text else 0),
            prompt_seconds=perf.t_p_eval_ms / 1000.0,
            generation_seconds=perf.t_eval_ms / 1000.0,
            ttft_seconds=ttft,
            kv_used=self.kv_used,
            kv_cells=self.n_ctx,
        )

    def reset(self) -> None:
        """Forget the conversation held in the KV cache."""
        self.llama.reset()
        self.llama._ctx.kv_cache_clear()

    def close(self) -> None:
        self.llama.close()


_PARAMS_PATCH_LOCK = threading.Lock()


class _NoFormatter:
    """Stands in for llama-cpp-python's Jinja2ChatFormatter while ``Llama()`` loads.

    ``Llama()`` compiles every chat template in the GGUF with an unguarded Jinja
    environment (constant folding included: ``{{ 'x' * 300000000 }}`` costs seconds and
    hundreds of MB at load). localllm renders templates itself, through the guarded
    renderer, and never uses those handlers.
    """

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def to_chat_handler(self) -> None:
        return None


@contextmanager
def _patched_llama(llama_cpp: Any, **model_fields: Any) -> Iterator[None]:
    """Make ``Llama()`` load with extra ``llama_model_params`` fields, templates unread.

    ``Llama()`` has no argument for some fields (use_extra_bufts) and drops unknown
    keywords silently, so the defaults it starts from are patched while it loads.
    """
    low, formats = llama_cpp.llama_cpp, llama_cpp.llama_chat_format
    original_params, original_formatter = (
        low.llama_model_default_params,
        formats.Jinja2ChatFormatter,
    )

    def patched() -> Any:
        params = original_params()
        for name, value in model_fields.items():
            setattr(params, name, value)
        return params

    with _PARAMS_PATCH_LOCK:
        low.llama_model_default_params = patched
        formats.Jinja2ChatFormatter = _NoFormatter
        try:
            yield
        finally:
            low.llama_model_default_params = original_params
            formats.Jinja2ChatFormatter = original_formatter


def load_model(path: str | os.PathLike[str], options: LoadOptions) -> LoadedModel:
    """Load a GGUF through llama.cpp with ``options``; failures become ModelLoadError."""
    options.validate()
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no such model file: {path}")
    llama_cpp = import_llama_cpp()
    install_log_capture()
    set_log_echo(options.verbose)
    repack = choose_repack(options.repack)
    mark = log_mark()
    try:
        with (
            _patched_llama(llama_cpp, use_extra_bufts=repack.repack),
            rpc_load_devices(options.rpc),
        ):
            llama = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=options.n_ctx,
                n_batch=options.n_batch,
                n_ubatch=options.n_ubatch,
                n_threads=options.threads,
                n_threads_batch=options.threads_batch,
                n_gpu_layers=options.n_gpu_layers,
                tensor_split=list(options.tensor_split) or None,
                seed=options.seed,
                flash_attn=options.flash_attn,
                swa_full=options.swa_full,
                logits_all=options.logits_all,
                verbose=options.verbose,
                **context_fields(options.type_k, options.type_v),
                **rope_fields(options.rope),
            )
    except (ValueError, RuntimeError, OSError) as exc:
        errors = [line for line in log_since(mark) if "error" in line.lower()]
        reason = errors[-1].strip() if errors else str(exc)
        raise ModelLoadError(f"llama.cpp could not load {path.name}: {reason}") from None
    return LoadedModel(llama, path, options, log_since(mark), repack)
