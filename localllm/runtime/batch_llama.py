"""The batch engine's llama.cpp objects: the model and its N-sequence context, a sampler
chain per request, grammars, logprobs.

The context is the one llama-cpp-python's ``Llama`` creates, plus ``n_seq_max = N`` and a
non-unified KV cache (each sequence its own ``n_ctx / N`` cells, as llama-server). The
sampler chain is the one ``Llama._init_sampler`` builds (llama-cpp-python 0.3.36), so a
request sampled here draws what ``localllm chat`` draws with the same settings and seed:
logit bias, penalties over the last 64 generated tokens (the prompt is not fed to
them, as in ``Llama``), then greedy at temperature 0, else top-k, typical (p = 1, a
no-op kept for the same chain), top-p, min-p, temperature and a seeded draw. A grammar
is kept beside the chain, not in it (:class:`RequestSampler`).
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from localllm.errors import InvalidArgument, ModelLoadError
from localllm.runtime.batch_records import GenerationParams, TokenLogprob, TopLogprob
from localllm.runtime.devices import rpc_load_devices
from localllm.runtime.library import RepackChoice, choose_repack, import_llama_cpp
from localllm.runtime.log import (
    install_log_capture,
    load_model_file,
    log_mark,
    log_since,
    set_log_echo,
)
from localllm.runtime.params import LoadOptions, context_fields, rope_fields

__all__ = [
    "PENALTY_LAST_N",
    "RequestSampler",
    "check_engine_options",
    "context_params",
    "json_grammar",
    "load_model_and_context",
    "model_params",
    "put_token",
    "request_sampler",
    "schema_rules",
    "token_logprob",
]

PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size


def json_grammar(schema: dict[str, Any] | None) -> str:
    """GBNF for any JSON object (``schema`` None) or for a JSON schema (InvalidArgument)."""
    from llama_cpp import llama_grammar

    if schema is None:
        return llama_grammar.JSON_GBNF
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError) as exc:
        raise InvalidArgument(f"cannot turn this JSON schema into a grammar: {exc}") from None


def schema_rules(schemas: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """GBNF rules, one named rule per ``(name, JSON schema)`` and the rules they use
    (``space`` among them), for a caller to compose under its own ``root``.

    InvalidArgument names the first schema the converter cannot take.
    """
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    for name, schema in schemas:
        try:
            resolved = converter.resolve_refs(schema, name)
            rule = converter.visit(resolved, name)
            if rule != name:  # a primitive ("string", "object") is named by its type
                converter._add_rule(name, rule)
        except (ValueError, KeyError, TypeError, AssertionError, RecursionError) as exc:
            raise InvalidArgument(
                f"{name}: cannot turn this JSON schema into a grammar: {exc}"
            ) from None
    return converter.format_grammar()


def put_token(batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
    """Entry ``i`` of a ``llama_batch``: one token of one sequence."""
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq
    batch.logits[i] = logits


class RequestSampler:
    """One request's sampler: its chain, and its grammar kept apart from it, as llama.cpp's
    ``common_sampler`` keeps it. The chain picks from every token; the grammar checks only
    the pick, and only a refused pick has it filter all candidates for the chain to pick
    again. The same token at temperature 0; with sampling, a draw from the grammar's
    tokens. A grammar inside the chain checked all 49k tokens of SmolLM2 at every step:
    a JSON reply at 0.48x the speed of free text (benchmarks/grammar.md)."""

    def __init__(self, lc: Any, chain: Any, grammar: Any, n_vocab: int) -> None:
        self._lc, self.chain, self.grammar, self._n_vocab = lc, chain, grammar, n_vocab
        self._candidates: Any = None  # llama_token_data[n_vocab], made on the first pick
        self._view: Any = None
        self._ids: Any = None

    def sample(self, ctx: Any, index: int) -> int:
        """Sample output ``index`` of ``ctx`` and accept the token (the chain's state and
        the grammar's advance)."""
        lc = self._lc
        if self.grammar is None:
            return int(lc.llama_sampler_sample(self.chain, ctx, index))
        token = self._pick(ctx, index, constrained=False)
        one = lc.llama_token_data(token, 1.0, 0.0)
        single = lc.llama_token_data_array(ctypes.pointer(one), 1, -1, False)
        lc.llama_sampler_apply(self.grammar, ctypes.byref(single))
        if one.logit == float("-inf"):  # the grammar refuses it: pick among what it allows
            token = self._pick(ctx, index, constrained=True)
        lc.llama_sampler_accept(self.grammar, token)
        lc.llama_sampler_accept(self.chain, token)
        return token

    def _pick(self, ctx: Any, index: int, *, constrained: bool) -> int:
        import numpy as np

        lc, n = self._lc, self._n_vocab
        if self._candidates is None:
            self._candidates = (lc.llama_token_data * n)()
            self._view = np.frombuffer(
                self._candidates, np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
            )
            self._ids = np.arange(n, dtype=np.int32)
        view = self._view  # refilled: the chain reorders and truncates it in place
        view["id"] = self._ids
        view["logit"] = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, index), shape=(n,))
        view["p"] = 0.0
        cur = lc.llama_token_data_array(self._candidates, n, -1, False)
        if constrained:
            lc.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        lc.llama_sampler_apply(self.chain, ctypes.byref(cur))  # no accept: sample() does
        return int(cur.data[cur.selected].id)

    def free(self) -> None:
        self._lc.llama_sampler_free(self.chain)
        if self.grammar is not None:
            self._lc.llama_sampler_free(self.grammar)


def request_sampler(lc: Any, vocab: Any, n_vocab: int, p: GenerationParams) -> RequestSampler:
    """A new sampler for one request (the caller frees it)."""
    grammar = None
    if p.grammar is not None:
        grammar = _grammar_sampler(lc, vocab, p.grammar, p.grammar_triggers)
        if not grammar:
            raise InvalidArgument(f"llama.cpp could not parse the grammar for {p.grammar_for}")
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        lc.llama_sampler_chain_add(chain, sampler)

    if p.logit_bias:
        biases = (lc.llama_logit_bias * len(p.logit_bias))(*p.logit_bias)
        add(lc.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), biases))
    add(
        lc.llama_sampler_init_penalties(
            n_vocab, PENALTY_LAST_N, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
        )
    )
    if p.temperature == 0:
        add(lc.llama_sampler_init_greedy())
    else:
        add(lc.llama_sampler_init_top_k(p.top_k))
        add(lc.llama_sampler_init_typical(1.0, 1))
        add(lc.llama_sampler_init_top_p(p.top_p, 1))
        add(lc.llama_sampler_init_min_p(p.min_p, 1))
        add(lc.llama_sampler_init_temp(p.temperature))
        add(lc.llama_sampler_init_dist(p.seed if p.seed is not None else lc.LLAMA_DEFAULT_SEED))
    return RequestSampler(lc, chain, grammar, n_vocab)


def _grammar_sampler(lc: Any, vocab: Any, grammar: str, triggers: Sequence[str]) -> Any:
    """The grammar sampler; with ``triggers`` (regexes over the whole reply so far) a lazy
    one that leaves the text free until a pattern matches, then constrains from the
    pattern's first group on (llama.cpp's tool-call triggers)."""
    if not triggers:
        return lc.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    patterns = (ctypes.c_char_p * len(triggers))(*(t.encode() for t in triggers))
    return lc.llama_sampler_init_grammar_lazy_patterns(
        vocab, grammar.encode(), b"root", patterns, len(triggers), None, 0
    )


def token_logprob(
    logits_ptr: Any, n_vocab: int, token: int, top: int, piece: Callable[[int], bytes]
) -> TokenLogprob:
    """``token``'s log-probability under the model's distribution (before any sampler
    narrows it), with the ``top`` likeliest alternatives."""
    import numpy as np

    logits = np.ctypeslib.as_array(logits_ptr, shape=(n_vocab,)).astype(np.float64)
    peak = logits.max()
    lse = peak + np.log(np.exp(logits - peak).sum())
    alternatives = []
    if top > 0:
        best = np.argpartition(logits, -top)[-top:]
        for t in sorted(best.tolist(), key=lambda t: -logits[t]):
            alternatives.append(TopLogprob(t, piece(t), float(logits[t] - lse)))
    return TokenLogprob(token, piece(token), float(logits[token] - lse), tuple(alternatives))


def check_engine_options(options: LoadOptions, parallel: int, max_parallel: int) -> None:
    """The load options an engine of ``parallel`` slots can use (InvalidArgument if not)."""
    options.validate()
    if not 1 <= parallel <= max_parallel:
        raise InvalidArgument(f"parallel {parallel} must be between 1 and {max_parallel}")
    if options.n_ctx < parallel:
        raise InvalidArgument(
            f"a context of {options.n_ctx} tokens cannot be split over {parallel} slots"
        )
    if options.n_batch < parallel:
        # Each step carries one token per generating slot.
        raise InvalidArgument(
            f"batch size {options.n_batch} must be at least --parallel {parallel}"
        )


def load_model_and_context(
    path: Path, options: LoadOptions, parallel: int
) -> tuple[Any, Any, Any, list[str], RepackChoice]:
    """llama_cpp, the model, its context of ``parallel`` sequences, the load log, repack."""
    if not path.is_file():
        raise ModelLoadError(f"no such model file: {path}")
    lc = import_llama_cpp()
    install_log_capture()
    set_log_echo(options.verbose)
    repack = choose_repack(options.repack)
    mparams = model_params(lc, options, repack.repack)
    split = None
    if options.tensor_split:  # kept alive by this frame while the model loads
        split = (ctypes.c_float * lc.LLAMA_MAX_DEVICES)(*options.tensor_split)
        mparams.tensor_split = split
    with rpc_load_devices(options.rpc):
        model, log = load_model_file(lc, path, mparams)
    del split
    mark = log_mark()
    ctx = lc.llama_init_from_model(model, context_params(lc, options, parallel))
    if not ctx:
        lc.llama_model_free(model)
        raise ModelLoadError(
            f"llama.cpp could not create a {options.n_ctx}-token context with {parallel} "
            f"slots for {path.name}: {_last_error(mark)}"
        )
    return lc, model, ctx, log + log_since(mark), repack


def model_params(lc: Any, options: LoadOptions, repack: bool) -> Any:
    """llama_model_params for ``options``: GPU layers and repacking."""
    mparams = lc.llama_model_default_params()
    mparams.n_gpu_layers = 0x7FFFFFFF if options.n_gpu_layers == -1 else options.n_gpu_layers
    mparams.use_extra_bufts = repack
    return mparams


def context_params(lc: Any, options: LoadOptions, parallel: int) -> Any:
    """llama_context_params as llama-cpp-python's Llama sets them, plus N sequences."""
    params = lc.llama_context_default_params()
    params.n_ctx = options.n_ctx
    params.n_batch = options.n_batch
    params.n_ubatch = min(options.n_batch, options.n_ubatch)
    params.n_seq_max = parallel
    params.kv_unified = False  # one KV stream per slot: ctx/N cells each, as llama-server
    params.swa_full = options.swa_full
    params.n_threads = options.threads
    params.n_threads_batch = options.threads_batch
    params.flash_attn_type = (
        lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if options.flash_attn
        else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    for name, value in {
        **context_fields(options.type_k, options.type_v),
        **rope_fields(options.rope),
    }.items():
        setattr(params, name, value)
    params.no_perf = False
    return params


def _last_error(mark: int) -> str:
    errors = [line.strip() for line in log_since(mark) if "error" in line.lower()]
    return errors[-1] if errors else "see llama.cpp's log (--verbose)"
