"""Architecture presets for the lecture's models: kv-calc sizes them without any file.

Facts are the published configs (Meta and Mistral AI model cards, config.json). Where
the catalog holds the same model (its chat/instruct twin), ``catalog_twin`` names it;
a test keeps the two in agreement, and its default quant's size stands for the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from localllm.gguf.spec import ModelSpec

__all__ = ["PRESETS", "Preset", "llama_param_count", "lookup_preset"]


@dataclass(frozen=True)
class Preset:
    spec: ModelSpec
    catalog_twin: str | None  # catalog alias with the same architecture


def llama_param_count(spec: ModelSpec) -> int:
    """Parameters of a Llama-architecture model with untied input and output embeddings."""
    if spec.vocab_size is None or spec.n_ff is None:
        raise ValueError(f"{spec.name}: vocab size and FFN width are needed to count params")
    e, q = spec.n_embd, spec.n_heads * spec.head_dim
    kv = spec.n_kv_heads * spec.head_dim
    per_layer = 2 * e + e * q + 2 * e * kv + q * e + 3 * e * spec.n_ff
    return 2 * spec.vocab_size * e + spec.n_layers * per_layer + e


def _preset(
    name: str,
    *,
    layers: int,
    heads: int,
    kv_heads: int,
    embd: int,
    ff: int,
    vocab: int,
    ctx: int,
    rope_base: float,
    twin: str | None,
    sliding_window: int = 0,
) -> Preset:
    spec = ModelSpec(
        name=name,
        architecture="llama",
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv_heads,
        head_dim=embd // heads,
        n_embd=embd,
        n_ctx_train=ctx,
        n_ff=ff,
        vocab_size=vocab,
        rope_freq_base=rope_base,
        sliding_window=sliding_window,
        source="preset",
    )
    return Preset(spec=_with_params(spec), catalog_twin=twin)


def _with_params(spec: ModelSpec) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, n_params=llama_param_count(spec))


PRESETS: dict[str, Preset] = {
    p.spec.name: p
    for p in (
        _preset("llama-2-7b", layers=32, heads=32, kv_heads=32, embd=4096, ff=11008,
                vocab=32000, ctx=4096, rope_base=10000.0, twin="llama-2-7b-chat"),
        _preset("llama-2-13b", layers=40, heads=40, kv_heads=40, embd=5120, ff=13824,
                vocab=32000, ctx=4096, rope_base=10000.0, twin="llama-2-13b-chat"),
        _preset("llama-2-70b", layers=80, heads=64, kv_heads=8, embd=8192, ff=28672,
                vocab=32000, ctx=4096, rope_base=10000.0, twin="llama-2-70b-chat"),
        # Mistral 7B v0.1: trained with a 4096-token sliding window over a 32k context.
        _preset("mistral-7b", layers=32, heads=32, kv_heads=8, embd=4096, ff=14336,
                vocab=32000, ctx=32768, rope_base=10000.0, twin="mistral-7b-instruct-v0.1",
                sliding_window=4096),
        _preset("llama-3-8b", layers=32, heads=32, kv_heads=8, embd=4096, ff=14336,
                vocab=128256, ctx=8192, rope_base=500000.0, twin="llama-3-8b-instruct"),
        _preset("llama-3-70b", layers=80, heads=64, kv_heads=8, embd=8192, ff=28672,
                vocab=128256, ctx=8192, rope_base=500000.0, twin=None),
    )
}  # fmt: skip


def lookup_preset(name: str | None) -> Preset | None:
    """The preset called ``name`` (case-insensitive), if there is one."""
    return PRESETS.get(name.strip().lower()) if name else None
