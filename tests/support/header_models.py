"""Header-only GGUFs at real scale: published model shapes, no weights, sparse on disk.

Each file holds the real keys and the full tensor table (names, shapes, ggml types and
offsets, as llama.cpp's loader checks them) of a published model; the data region is
not written, the file is only extended to its full size (a sparse file: a few hundred
KiB on disk for a 70B). llama.cpp's dry run (``no_alloc``) loads such a file without
reading a byte of weights.

Shapes are those of the published config.json files (Hugging Face model cards of Meta,
Mistral AI, Qwen, Google, Microsoft, DeepSeek, state-spaces) laid out the way llama.cpp's
own converter writes them (convert_hf_to_gguf.py / conversion/*.py at the pinned commit)
and its loader expects them (src/models/<arch>.cpp, ``load_arch_tensors``).

The vocabulary is the minimum llama.cpp loads: ``tokenizer.ggml.model = "none"`` with
``{arch}.vocab_size`` (llama-vocab.cpp then adds that many dummy tokens), so logits and
the output buffer have the real vocabulary's width without a token list in the header.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "HEADER_MODELS",
    "HeaderModel",
    "gemma_header",
    "header_model",
    "llama_header",
]

Shape = tuple[int, ...]  # ggml order: ne0 (the contiguous row) first


@dataclass(frozen=True)
class HeaderModel:
    """One model's GGUF header: its keys and its tensor table (name, ggml shape)."""

    name: str
    arch: str
    kv: Mapping[str, Any]
    tensors: tuple[tuple[str, Shape], ...]
    source: str  # the published config the shapes come from


# ---------------------------------------------------------------------------- builders

Tensors = list[tuple[str, Shape]]


def _common_kv(arch: str, name: str, f: Mapping[str, Any]) -> dict[str, Any]:
    """The keys every architecture here needs, from a model's published facts ``f``."""
    return {
        "general.name": name,
        f"{arch}.block_count": f["n_layer"],
        f"{arch}.context_length": f["n_ctx"],
        f"{arch}.embedding_length": f["n_embd"],
        f"{arch}.feed_forward_length": f["n_ff"],
        f"{arch}.attention.head_count": f["n_head"],
        f"{arch}.attention.head_count_kv": f["n_head_kv"],
        f"{arch}.attention.layer_norm_rms_epsilon": f.get("rms_eps", 1e-5),
        f"{arch}.rope.freq_base": f.get("rope_base", 10000.0),
        f"{arch}.vocab_size": f["n_vocab"],
        "tokenizer.ggml.model": "none",
    }


def _embeddings(n_embd: int, n_vocab: int, *, tied: bool) -> Tensors:
    out = [("token_embd.weight", (n_embd, n_vocab)), ("output_norm.weight", (n_embd,))]
    return out if tied else [*out, ("output.weight", (n_embd, n_vocab))]


def _gated_ffn(i: int, n_embd: int, n_ff: int) -> Tensors:
    return [
        (f"blk.{i}.ffn_gate.weight", (n_embd, n_ff)),
        (f"blk.{i}.ffn_up.weight", (n_embd, n_ff)),
        (f"blk.{i}.ffn_down.weight", (n_ff, n_embd)),
    ]


def _moe_ffn(i: int, n_embd: int, n_ff: int, n_expert: int) -> Tensors:
    return [
        (f"blk.{i}.ffn_gate_inp.weight", (n_embd, n_expert)),
        (f"blk.{i}.ffn_gate_exps.weight", (n_embd, n_ff, n_expert)),
        (f"blk.{i}.ffn_up_exps.weight", (n_embd, n_ff, n_expert)),
        (f"blk.{i}.ffn_down_exps.weight", (n_ff, n_embd, n_expert)),
    ]


def _attention(
    i: int, n_embd: int, n_q: int, n_kv: int, *, bias: bool = False, qk_norm: int = 0
) -> Tensors:
    out = [
        (f"blk.{i}.attn_norm.weight", (n_embd,)),
        (f"blk.{i}.attn_q.weight", (n_embd, n_q)),
        (f"blk.{i}.attn_k.weight", (n_embd, n_kv)),
        (f"blk.{i}.attn_v.weight", (n_embd, n_kv)),
        (f"blk.{i}.attn_output.weight", (n_q, n_embd)),
    ]
    if bias:
        out += [(f"blk.{i}.attn_{x}.bias", (n,)) for x, n in (("q", n_q), ("k", n_kv), ("v", n_kv))]
    if qk_norm:
        out += [(f"blk.{i}.attn_{x}_norm.weight", (qk_norm,)) for x in ("q", "k")]
    return out


def _mamba_block(i: int, n_embd: int, d_conv: int, d_state: int, dt_rank: int, *,
                 norms: bool) -> Tensors:  # fmt: skip
    """One Mamba(-1) layer, d_inner = 2 * n_embd; Jamba adds RMS norms on dt, B and C."""
    d_inner = 2 * n_embd
    out = [
        (f"blk.{i}.attn_norm.weight", (n_embd,)),
        (f"blk.{i}.ssm_in.weight", (n_embd, 2 * d_inner)),
        (f"blk.{i}.ssm_conv1d.weight", (d_conv, d_inner)),
        (f"blk.{i}.ssm_conv1d.bias", (d_inner,)),
        (f"blk.{i}.ssm_x.weight", (d_inner, dt_rank + 2 * d_state)),
        (f"blk.{i}.ssm_dt.weight", (dt_rank, d_inner)),
        (f"blk.{i}.ssm_dt.bias", (d_inner,)),
        (f"blk.{i}.ssm_a", (d_state, d_inner)),
        (f"blk.{i}.ssm_d", (d_inner,)),
        (f"blk.{i}.ssm_out.weight", (d_inner, n_embd)),
    ]
    if norms:
        out += [(f"blk.{i}.ssm_dt_norm.weight", (dt_rank,)),
                (f"blk.{i}.ssm_b_norm.weight", (d_state,)),
                (f"blk.{i}.ssm_c_norm.weight", (d_state,))]  # fmt: skip
    return out


def _ssm_kv(arch: str, d_conv: int, d_inner: int, d_state: int, dt_rank: int) -> dict[str, Any]:
    return {
        f"{arch}.ssm.conv_kernel": d_conv,
        f"{arch}.ssm.inner_size": d_inner,
        f"{arch}.ssm.state_size": d_state,
        f"{arch}.ssm.time_step_rank": dt_rank,
    }


def llama_header(name: str, *, source: str = "test", **facts: Any) -> HeaderModel:
    """A llama-architecture header: Llama-2, Mistral-7B (a declared window), Mixtral (experts).

    ``facts``: n_layer, n_embd, n_head, n_head_kv, n_ff, and optionally n_vocab (32000),
    n_ctx (4096), rope_base, sliding_window, n_expert with n_expert_used.
    """
    f = {"n_vocab": 32000, "n_ctx": 4096, **facts}
    arch, n_embd, n_expert = "llama", f["n_embd"], f.get("n_expert", 0)
    hd = n_embd // f["n_head"]
    kv = _common_kv(arch, name, f)
    kv[f"{arch}.rope.dimension_count"] = hd
    if f.get("sliding_window"):
        kv[f"{arch}.attention.sliding_window"] = f["sliding_window"]
    if n_expert:
        kv[f"{arch}.expert_count"] = n_expert
        kv[f"{arch}.expert_used_count"] = f["n_expert_used"]
    tensors = _embeddings(n_embd, f["n_vocab"], tied=False)
    for i in range(f["n_layer"]):
        tensors += _attention(i, n_embd, f["n_head"] * hd, f["n_head_kv"] * hd)
        tensors.append((f"blk.{i}.ffn_norm.weight", (n_embd,)))
        if n_expert:
            tensors += _moe_ffn(i, n_embd, f["n_ff"], n_expert)
        else:
            tensors += _gated_ffn(i, n_embd, f["n_ff"])
    return HeaderModel(name, arch, kv, tuple(tensors), source)


def _qwen2_7b() -> HeaderModel:
    """Qwen2.5-7B-Instruct: GQA 28/4 with q/k/v biases."""
    f = dict(n_layer=28, n_embd=3584, n_head=28, n_head_kv=4, n_ff=18944, n_vocab=152064,
             n_ctx=32768, rope_base=1000000.0, rms_eps=1e-6)  # fmt: skip
    n_embd, n_kv = f["n_embd"], f["n_head_kv"] * f["n_embd"] // f["n_head"]
    tensors = _embeddings(n_embd, f["n_vocab"], tied=False)
    for i in range(f["n_layer"]):
        tensors += _attention(i, n_embd, n_embd, n_kv, bias=True)
        tensors += [(f"blk.{i}.ffn_norm.weight", (n_embd,)), *_gated_ffn(i, n_embd, f["n_ff"])]
    kv = _common_kv("qwen2", "qwen2.5-7b", f)
    return HeaderModel("qwen2.5-7b", "qwen2", kv, tuple(tensors), "Qwen/Qwen2.5-7B-Instruct")


def _gemma(arch: str, name: str, f: Mapping[str, Any], extra: dict[str, Any],
           source: str) -> HeaderModel:  # fmt: skip
    """Gemma 2 and 3: key_length 256 (not n_embd / n_head), tied output, post-norms."""
    n_embd, hd = f["n_embd"], f["head_dim"]
    kv = {**_common_kv(arch, name, f), **extra}
    kv[f"{arch}.attention.key_length"] = kv[f"{arch}.attention.value_length"] = hd
    kv[f"{arch}.attention.sliding_window"] = f["window"]
    tensors = _embeddings(n_embd, f["n_vocab"], tied=True)
    for i in range(f["n_layer"]):
        tensors += _attention(i, n_embd, f["n_head"] * hd, f["n_head_kv"] * hd,
                              qk_norm=hd if arch == "gemma3" else 0)  # fmt: skip
        tensors += [
            (f"blk.{i}.post_attention_norm.weight", (n_embd,)),
            (f"blk.{i}.ffn_norm.weight", (n_embd,)),
            *_gated_ffn(i, n_embd, f["n_ff"]),
            (f"blk.{i}.post_ffw_norm.weight", (n_embd,)),
        ]
    return HeaderModel(name, arch, kv, tuple(tensors), source)


def gemma_header(name: str, arch: str = "gemma3", **facts: Any) -> HeaderModel:
    """A Gemma 2 or 3 header of any size (tests that need a small sliding-window model).

    ``facts``: n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab, n_ctx, window.
    """
    f = {"rms_eps": 1e-6, **facts}
    return _gemma(arch, name, f, {}, "test")


def _gemma2_9b() -> HeaderModel:
    # Every other layer attends to a 4096-token window.
    f = dict(n_layer=42, n_embd=3584, n_head=16, n_head_kv=8, head_dim=256, n_ff=14336,
             n_vocab=256000, n_ctx=8192, window=4096, rms_eps=1e-6)  # fmt: skip
    extra = {"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0}
    return _gemma("gemma2", "gemma-2-9b", f, extra, "google/gemma-2-9b-it")


def _gemma3_4b() -> HeaderModel:
    # 5 of every 6 layers attend to a 1024-token window (sliding_window_pattern 6).
    f = dict(n_layer=34, n_embd=2560, n_head=8, n_head_kv=4, head_dim=256, n_ff=10240,
             n_vocab=262208, n_ctx=131072, window=1024, rope_base=1e6, rms_eps=1e-6)  # fmt: skip
    extra = {"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}
    return _gemma("gemma3", "gemma-3-4b", f, extra, "google/gemma-3-4b-it (text model)")


def _phi3_mini() -> HeaderModel:
    """Phi-3-mini-4k: fused QKV and gate/up, MHA; declares a 2047 window llama.cpp ignores."""
    f = dict(n_layer=32, n_embd=3072, n_head=32, n_head_kv=32, n_ff=8192, n_vocab=32064,
             n_ctx=4096)  # fmt: skip
    n_embd, n_ff = f["n_embd"], f["n_ff"]
    kv = _common_kv("phi3", "phi-3-mini-4k", f)
    kv["phi3.rope.dimension_count"] = n_embd // f["n_head"]
    kv["phi3.attention.sliding_window"] = 2047
    tensors = _embeddings(n_embd, f["n_vocab"], tied=False)
    for i in range(f["n_layer"]):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (n_embd,)),
            (f"blk.{i}.attn_qkv.weight", (n_embd, 3 * n_embd)),
            (f"blk.{i}.attn_output.weight", (n_embd, n_embd)),
            (f"blk.{i}.ffn_norm.weight", (n_embd,)),
            (f"blk.{i}.ffn_up.weight", (n_embd, 2 * n_ff)),
            (f"blk.{i}.ffn_down.weight", (n_ff, n_embd)),
        ]
    return HeaderModel(
        "phi-3-mini-4k", "phi3", kv, tuple(tensors), "microsoft/Phi-3-mini-4k-instruct"
    )


def _deepseek2_lite() -> HeaderModel:
    """DeepSeek-V2-Lite: MLA (kv_lora_rank 512, rope 64), 64 routed + 2 shared experts."""
    # The converter writes MLA as MQA over the compressed latent: one KV head of
    # kv_lora_rank + rope elements for K, kv_lora_rank for V (conversion/deepseek.py).
    f = dict(n_layer=27, n_embd=2048, n_head=16, n_head_kv=1, n_ff=10944, n_vocab=102400,
             n_ctx=163840, rms_eps=1e-6)  # fmt: skip
    arch, n_embd, n_head = "deepseek2", f["n_embd"], f["n_head"]
    lora, rope, nope, v_dim, n_expert, n_ff_exp, n_shared = 512, 64, 128, 128, 64, 1408, 2
    kv = _common_kv(arch, "deepseek-v2-lite", f)
    # fmt: off
    kv.update({
        f"{arch}.leading_dense_block_count": 1, f"{arch}.attention.kv_lora_rank": lora,
        f"{arch}.attention.key_length": lora + rope, f"{arch}.attention.value_length": lora,
        f"{arch}.attention.key_length_mla": nope + rope,
        f"{arch}.attention.value_length_mla": v_dim, f"{arch}.rope.dimension_count": rope,
        f"{arch}.expert_feed_forward_length": n_ff_exp, f"{arch}.expert_count": n_expert,
        f"{arch}.expert_used_count": 6, f"{arch}.expert_shared_count": n_shared,
        f"{arch}.expert_weights_scale": 1.0, f"{arch}.rope.scaling.type": "yarn",
        f"{arch}.rope.scaling.factor": 40.0,
        f"{arch}.rope.scaling.original_context_length": 4096,
        f"{arch}.rope.scaling.yarn_log_multiplier": 0.0707,
    })
    # fmt: on
    tensors = _embeddings(n_embd, f["n_vocab"], tied=False)
    for i in range(f["n_layer"]):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (n_embd,)),
            (f"blk.{i}.attn_kv_a_norm.weight", (lora,)),
            (f"blk.{i}.attn_q.weight", (n_embd, n_head * (nope + rope))),
            (f"blk.{i}.attn_kv_a_mqa.weight", (n_embd, lora + rope)),
            (f"blk.{i}.attn_k_b.weight", (nope, lora, n_head)),
            (f"blk.{i}.attn_v_b.weight", (lora, v_dim, n_head)),
            (f"blk.{i}.attn_output.weight", (n_head * v_dim, n_embd)),
            (f"blk.{i}.ffn_norm.weight", (n_embd,)),
        ]
        if i == 0:  # the one leading dense layer
            tensors += _gated_ffn(i, n_embd, f["n_ff"])
            continue
        tensors += _moe_ffn(i, n_embd, n_ff_exp, n_expert)
        tensors += [
            (f"blk.{i}.ffn_gate_shexp.weight", (n_embd, n_ff_exp * n_shared)),
            (f"blk.{i}.ffn_up_shexp.weight", (n_embd, n_ff_exp * n_shared)),
            (f"blk.{i}.ffn_down_shexp.weight", (n_ff_exp * n_shared, n_embd)),
        ]
    return HeaderModel("deepseek-v2-lite", arch, kv, tuple(tensors), "deepseek-ai/DeepSeek-V2-Lite")


def _mamba_2_8b() -> HeaderModel:
    """Mamba-2.8B: 64 recurrent layers, no attention; d_inner = 2 * n_embd."""
    # context_length: the converter's "infinite" 2^20; no attention heads.
    f = dict(n_layer=64, n_embd=2560, n_head=0, n_head_kv=0, n_ff=0, n_vocab=50280,
             n_ctx=1 << 20)  # fmt: skip
    n_embd, d_state, d_conv, dt_rank = f["n_embd"], 16, 4, 160
    kv = {
        **_common_kv("mamba", "mamba-2.8b", f),
        **_ssm_kv("mamba", d_conv, 2 * n_embd, d_state, dt_rank),
    }
    tensors = _embeddings(n_embd, f["n_vocab"], tied=True)
    for i in range(f["n_layer"]):
        tensors += _mamba_block(i, n_embd, d_conv, d_state, dt_rank, norms=False)
    return HeaderModel("mamba-2.8b", "mamba", kv, tuple(tensors), "state-spaces/mamba-2.8b-hf")


def _jamba_v0_1() -> HeaderModel:
    """Jamba-v0.1: a hybrid, attention every 8th layer (offset 4), Mamba elsewhere, MoE on odd."""
    attention = [i % 8 == 4 for i in range(32)]
    f = dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=[8 if a else 0 for a in attention],
             n_ff=14336, n_vocab=65536, n_ctx=262144, rms_eps=1e-6)  # fmt: skip
    arch, n_embd, n_expert, d_state, d_conv, dt_rank = "jamba", f["n_embd"], 16, 16, 4, 256
    kv = {
        **_common_kv(arch, "jamba-v0.1", f),
        **_ssm_kv(arch, d_conv, 2 * n_embd, d_state, dt_rank),
    }
    kv[f"{arch}.expert_count"], kv[f"{arch}.expert_used_count"] = n_expert, 2
    tensors = _embeddings(n_embd, f["n_vocab"], tied=False)
    for i in range(f["n_layer"]):
        if attention[i]:
            tensors += _attention(i, n_embd, n_embd, 8 * n_embd // f["n_head"])
        else:
            tensors += _mamba_block(i, n_embd, d_conv, d_state, dt_rank, norms=True)
        tensors.append((f"blk.{i}.ffn_norm.weight", (n_embd,)))
        if i % 2:
            tensors += _moe_ffn(i, n_embd, f["n_ff"], n_expert)
        else:
            tensors += _gated_ffn(i, n_embd, f["n_ff"])
    return HeaderModel("jamba-v0.1", arch, kv, tuple(tensors), "ai21labs/Jamba-v0.1")


# fmt: off
_LLAMAS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=32, n_ff=11008,
                       source="meta-llama/Llama-2-7b-hf"),
    "llama-2-13b": dict(n_layer=40, n_embd=5120, n_head=40, n_head_kv=40, n_ff=13824,
                        source="meta-llama/Llama-2-13b-hf"),
    "llama-2-70b": dict(n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672,
                        source="meta-llama/Llama-2-70b-hf"),
    "mistral-7b-v0.1": dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336,
                            n_ctx=32768, sliding_window=4096, source="mistralai/Mistral-7B-v0.1"),
    "mixtral-8x7b": dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336,
                         n_ctx=32768, rope_base=1000000.0, n_expert=8, n_expert_used=2,
                         source="mistralai/Mixtral-8x7B-v0.1"),
}
# fmt: on

HEADER_MODELS: dict[str, Callable[[], HeaderModel]] = {
    **{name: (lambda n=name: llama_header(n, **_LLAMAS[n])) for name in _LLAMAS},
    "qwen2.5-7b": _qwen2_7b,
    "gemma-2-9b": _gemma2_9b,
    "gemma-3-4b": _gemma3_4b,
    "phi-3-mini-4k": _phi3_mini,
    "deepseek-v2-lite": _deepseek2_lite,
    "mamba-2.8b": _mamba_2_8b,
    "jamba-v0.1": _jamba_v0_1,
}


def header_model(name: str) -> HeaderModel:
    """The header of one of :data:`HEADER_MODELS`."""
    try:
        return HEADER_MODELS[name]()
    except KeyError:
        raise ValueError(
            f"no header model {name!r}; use one of {', '.join(HEADER_MODELS)}"
        ) from None
