"""The graphs of the architectures beyond llama, replayed through ggml's allocator.

Each builder follows src/models/<arch>.cpp at the pinned commit, with the nodes in the
order llama.cpp records them (``GGML_SCHED_DEBUG=2`` prints that order); the pieces they
share (norms, the KV store and attention, feed-forward and experts) are
:mod:`localllm.plan.graph_memory`'s. :func:`replay_compute_bytes` is the entry point.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from localllm.errors import LocalLLMError
from localllm.gguf.header import read_header
from localllm.gguf.kv_layout import MemoryLayout
from localllm.gguf.spec import ModelSpec
from localllm.plan.graph_memory import (
    F32,
    Batch,
    Graph,
    GraphShape,
    Tensor,
    attend,
    dense_ffn,
    embed,
    last_rows,
    llama_graph,
    moe_ffn,
    norm,
    output_head,
    start_batch,
    walk,
)

__all__ = ["REPLAYED_ARCHITECTURES", "graph_shape", "replay_compute_bytes"]


def _phi3(b: Batch) -> Graph:
    """src/models/phi3.cpp: fused QKV (Q, K, V are strided views of one product, so the
    ropes allocate), Q scaled, fused gate/up split by one swiglu."""
    g, s = b.graph, b.shape
    n_q = s.n_head * s.head_dim
    n_k = s.n_head_kv * s.head_dim
    inp = embed(b)
    for il in range(s.n_layer):
        residual = inp
        cur = norm(b, inp)
        qkv = g.op((n_q + 2 * n_k) * b.tokens * F32, g.weight, cur)
        q = g.op(n_q * b.tokens * F32, g.view(qkv), b.pos, inplace=True)  # rope of a view
        q = g.op(q.size, q, inplace=True)  # scale
        k = g.op(n_k * b.tokens * F32, g.view(qkv), b.pos, inplace=True)
        v = g.view(qkv, n_k * b.tokens * F32)
        out = attend(b, q, k, v, s.is_swa(il), v_contiguous=False)
        out = g.op(b.act, g.weight, out)
        out, residual = last_rows(b, il, out, residual)
        cur = g.op(b.act, out, residual, inplace=True)
        residual = cur
        cur = dense_ffn(b, norm(b, cur), fused_up=True)
        inp = g.op(b.act, residual, cur, inplace=True)
    output_head(b, inp)
    return g


def _gemma(b: Batch, version: int) -> Graph:
    """src/models/gemma2.cpp and gemma3.cpp: scaled embeddings, post-attention and
    post-FFN norms, GELU gate; Gemma 2 soft-caps the scores and the logits, Gemma 3
    normalises Q and K (rms_norm of a reshape: a new tensor)."""
    g, s = b.graph, b.shape
    n_q, n_k = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    inp = g.op(b.act, embed(b), inplace=True)  # inp_scaled
    for il in range(s.n_layer):
        cur = norm(b, inp)
        q = g.op(n_q * b.tokens * F32, g.weight, cur)
        if version == 3:
            q = norm(b, g.view(q))
        q = g.op(q.size, q if version == 3 else g.view(q), b.pos, inplace=True)  # rope
        q = g.op(q.size, q, inplace=True)  # scale
        k = g.op(n_k * b.tokens * F32, g.weight, cur)
        if version == 3:
            k = norm(b, g.view(k))
        k = g.op(k.size, k if version == 3 else g.view(k), b.pos, inplace=True)
        v = g.op(n_k * b.tokens * F32, g.weight, cur)
        out = attend(b, q, k, v, s.is_swa(il), softcap=version == 2)
        out = g.op(b.act, g.weight, out)
        out, inp = last_rows(b, il, out, inp)
        sa_out = g.op(b.act, norm(b, out), inp, inplace=True)
        cur = norm(b, dense_ffn(b, norm(b, sa_out)))
        inp = g.op(b.act, cur, sa_out, inplace=True)
    output_head(b, inp, softcap=version == 2)
    return g


def _mla_attention(b: Batch, cur: Tensor) -> Tensor:
    """deepseek2.cpp's MLA with the absorption: Q's non-rotated part times wk_b, the
    latent (normed) and its rotated part concatenated as the one cached K row; attention
    as MQA over the latent, decompressed by wv_b."""
    g, s, t = b.graph, b.shape, b.tokens
    n_head, lora, rot = s.n_head, s.kv_lora_rank, s.n_rot
    if s.q_lora_rank:
        q = norm(b, g.op(s.q_lora_rank * t * F32, g.weight, cur))
        q = g.op(n_head * s.head_dim_k_mla * t * F32, g.weight, q)
    else:
        q = g.op(n_head * s.head_dim_k_mla * t * F32, g.weight, cur)
    absorbed = g.op(lora * n_head * t * F32, g.weight, g.view(g.view(q)))
    q_pe = g.op(rot * n_head * t * F32, g.view(q), b.pos, inplace=True)  # rope of a view
    q_cat = g.op((lora + rot) * n_head * t * F32, g.view(absorbed), q_pe)  # concat
    kv_pe = g.op((lora + rot) * t * F32, g.weight, cur)
    kv = norm(b, g.view(kv_pe, lora * t * F32))
    kv = g.view(kv)
    k_pe = g.op(rot * t * F32, g.view(kv_pe), b.pos, inplace=True)
    k = g.op((lora + rot) * t * F32, kv, k_pe)  # concat
    kvc = b.caches[False]
    g.store(g.view(k), kvc.k_idxs, g.weight)
    q_view, n_kv = g.view(q_cat), kvc.n_kv
    v_mla = s.head_dim_v_mla * n_head * t * F32
    if b.flash_attn:
        out = g.op(lora * n_head * t * F32, q_view, g.weight, g.weight, kvc.mask)
        out = g.op(v_mla, g.weight, g.view(out))
        return g.view(g.op(v_mla, g.view(out)))
    # The latent V read out of the K cache, transposed and made contiguous: in the
    # cache's type (f16, the default; an 8-bit cache halves this one tensor).
    v = g.op(n_kv * lora * b.n_seq * 2, g.weight)
    kq = g.op(n_kv * t * n_head * F32, g.weight, q_view)
    kq = g.op(kq.size, kq, kvc.mask, inplace=True)
    kqv = g.op(lora * n_head * t * F32, v, kq)
    kqv = g.op(v_mla, g.weight, kqv)
    return g.op(v_mla, g.view(kqv))


def _deepseek2(b: Batch) -> Graph:
    """src/models/deepseek2.cpp (MLA): leading dense layers, then routed experts plus
    shared ones (build_ffn of their summed width)."""
    g, s = b.graph, b.shape
    inp = embed(b)
    for il in range(s.n_layer):
        residual = inp
        out = g.op(b.act, g.weight, _mla_attention(b, norm(b, inp)))  # wo
        out, residual = last_rows(b, il, out, residual)
        ffn_inp = g.op(b.act, out, residual, inplace=True)
        cur = norm(b, ffn_inp)
        if il < s.n_layer_dense_lead:
            cur = dense_ffn(b, cur)
        else:
            moe = moe_ffn(b, cur)
            shared = dense_ffn(b, cur, s.n_ff_exp * s.n_expert_shared)
            cur = g.op(b.act, moe, shared, inplace=True)
        inp = g.op(b.act, cur, ffn_inp, inplace=True)
    output_head(b, inp)
    return g


def _mamba_layer(b: Batch, cur: Tensor) -> Tensor:
    """mamba-base.cpp's build_mamba_layer: the sequences' conv states (get_rows), the
    input projection, conv over the states and the new tokens, the selective scan (its
    output holds y and the new states), gated by z, the output projection."""
    g, s, t, n_seqs = b.graph, b.shape, b.tokens, b.n_seq
    d_inner, d_state = s.ssm_d_inner, s.ssm_d_state
    inner = d_inner * t * F32
    g.store(g.weight)  # the zeroed state: in the cache's buffer
    conv = g.op((s.ssm_d_conv - 1) * d_inner * n_seqs * F32, g.weight, b.s_copy)
    g.store(g.op(0, g.weight, b.s_copy), g.weight)  # the other states' rows: none
    xz = g.op(2 * inner, g.weight, g.view(cur))
    conv_x = g.op((s.ssm_d_conv - 1 + t // n_seqs) * d_inner * n_seqs * F32,
                  g.view(conv), g.view(g.view(xz, inner)))  # fmt: skip
    g.store(g.view(conv_x), g.weight)  # the last d_conv - 1 columns: the new conv state
    g.store(g.weight)
    x = g.op(inner, conv_x, g.weight)  # ssm_conv
    x = g.op(inner, x, g.weight, inplace=True)  # + bias
    x = g.op(inner, x, inplace=True)  # silu
    x_db = g.op((s.ssm_dt_rank + 2 * d_state) * t * F32, g.weight, x)
    dt = norm(b, g.view(x_db, s.ssm_dt_rank * t * F32))
    dt = g.op(inner, g.weight, dt)
    dt = g.op(inner, dt, g.weight, inplace=True)
    bc = [norm(b, g.view(x_db, d_state * t * F32)) for _ in range(2)]
    y_ssm = g.op(inner + d_state * d_inner * n_seqs * F32, g.view(g.weight), g.view(x), dt,
                 g.weight, *bc, b.s_copy)  # fmt: skip
    g.store(g.op(0, g.weight, b.s_copy), g.weight)
    g.store(g.view(y_ssm), g.weight)  # the new SSM states
    z = g.op(inner, g.view(xz))  # cont
    y = g.op(inner, x, g.weight, inplace=True)  # x * D
    y = g.op(inner, g.view(y_ssm, inner), y, inplace=True)
    y = g.op(inner, z, y)  # swiglu_split(z, y)
    return g.op(b.act, g.weight, y)


def _jamba(b: Batch) -> Graph:
    """src/models/jamba.cpp: Mamba layers and attention layers (no RoPE), a dense or
    experts' feed-forward (softmax gating, weights not normalised) after each."""
    g, s = b.graph, b.shape
    n_q, n_k = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    inp = embed(b)
    for il in range(s.n_layer):
        cur = norm(b, inp)
        if s.attention_layers[il]:
            q = g.op(n_q * b.tokens * F32, g.weight, cur)
            v = g.op(n_k * b.tokens * F32, g.weight, cur)
            k = g.op(n_k * b.tokens * F32, g.weight, cur)
            cur = g.op(b.act, g.weight, attend(b, g.view(q), g.view(k), v, False))
        else:
            cur = _mamba_layer(b, cur)
        inp, cur = last_rows(b, il, inp, cur)  # add(inpL, cur) reaches inpL's rows first
        ffn_inp = g.op(b.act, inp, cur, inplace=True)
        cur = norm(b, ffn_inp)
        cur = moe_ffn(b, cur) if s.is_moe(il) else dense_ffn(b, cur)
        inp = g.op(b.act, ffn_inp, cur, inplace=True)
    output_head(b, inp)
    return g


_BUILDERS: dict[str, Callable[[Batch], Graph]] = {
    "llama": lambda b: llama_graph(b, bias=False),
    "qwen2": lambda b: llama_graph(b, bias=True),
    "phi3": _phi3,
    "gemma2": lambda b: _gemma(b, 2),
    "gemma3": lambda b: _gemma(b, 3),
    "deepseek2": _deepseek2,
    "jamba": _jamba,
}
REPLAYED_ARCHITECTURES = frozenset(_BUILDERS)


def replay_compute_bytes(
    g: GraphShape,
    n_tokens: int,
    n_kv: int,
    flash_attn: bool,
    n_outputs: int | None = None,
    *,
    n_kv_swa: int | None = None,
    n_seq: int = 1,
) -> int | None:
    """The compute buffer llama.cpp reserves for ``n_tokens`` over ``n_kv`` cells per stream
    (``n_kv_swa``: the sliding-window cache's cells per stream; ``n_seq`` streams), or None for an
    architecture whose graph is not replayed.

    ``n_outputs``: the rows of logits (the micro-batch before llama.cpp rounds the token
    count up to a multiple of the sequences); default ``n_tokens``.
    """
    builder = _BUILDERS.get(g.architecture)
    if builder is None or g.n_layer <= 0:
        return None
    caches: dict[bool, int] = {}  # in the order the layers first reach them
    for il in range(g.n_layer):
        if g.attention_layers and not g.attention_layers[il]:
            continue
        swa = g.is_swa(il)
        caches.setdefault(swa, n_kv_swa if swa and n_kv_swa is not None else n_kv)
    outputs = n_outputs if n_outputs is not None else n_tokens
    batch = start_batch(
        g, n_tokens, outputs, flash_attn, caches, n_seq, pos=g.architecture != "jamba"
    )
    return walk(builder(batch))


# ------------------------------------------------------------ shape from the model


@functools.lru_cache(maxsize=32)
def _header(path: str, _mtime_ns: int, _size: int) -> tuple[Mapping[str, Any], frozenset[str]]:
    header = read_header(Path(path))
    return header.kv, frozenset(t.name for t in header.tensors)


def _model_header(spec: ModelSpec) -> tuple[Mapping[str, Any], frozenset[str]]:
    """The GGUF's keys and tensor names, when the spec came from a file still there
    (experts, MLA, SSM sizes are not in ModelSpec); empty otherwise."""
    if not spec.path:
        return {}, frozenset()
    try:
        st = os.stat(spec.path)
        return _header(spec.path, st.st_mtime_ns, st.st_size)
    except (OSError, LocalLLMError):
        return {}, frozenset()


def graph_shape(spec: ModelSpec, layout: MemoryLayout | None = None) -> GraphShape | None:
    """The sizes of ``spec``'s graph, or None when it is not replayed (or a size the graph
    needs is unknown: a mixture of experts without its GGUF)."""
    arch = spec.architecture
    if arch not in _BUILDERS or not spec.n_ff or not spec.vocab_size:
        return None
    keys, tensors = _model_header(spec)

    def key(name: str, default: int = 0) -> int:
        value = keys.get(f"{arch}.{name}", default)
        return int(value) if isinstance(value, (int, float)) else default

    def flag(name: str, default: bool) -> bool:
        value = keys.get(f"{arch}.{name}", default)
        return bool(value)

    n_expert = key("expert_count") or (layout.n_expert if layout else 0)
    if n_expert and not key("expert_used_count"):
        return None
    moe: tuple[bool, ...] = ()
    if n_expert and tensors:  # jamba: experts on some layers only (tensors present)
        moe = tuple(f"blk.{il}.ffn_gate_inp.weight" in tensors for il in range(spec.n_layers))
    per_layer_kv = spec.n_kv_heads_per_layer or ()
    if arch == "jamba" and (not per_layer_kv or not key("ssm.inner_size")):
        return None
    swa: tuple[bool, ...] = ()
    if layout is not None and layout.has_swa:
        by_index = {a.index: a.swa for a in layout.attention}
        swa = tuple(by_index.get(il, False) for il in range(spec.n_layers))
    return GraphShape(
        arch, spec.n_layers, spec.n_embd, spec.n_heads, spec.n_kv_heads, spec.head_dim,
        spec.n_ff, spec.vocab_size, head_dim_v=spec.head_dim_v or 0, swa_layers=swa,
        n_expert=n_expert, n_expert_used=key("expert_used_count"),
        n_ff_exp=key("expert_feed_forward_length"), n_expert_shared=key("expert_shared_count"),
        n_layer_dense_lead=key("leading_dense_block_count"),
        # llama's graph always normalises; deepseek2 reads the key (default off)
        expert_weights_norm=flag("expert_weights_norm", arch != "deepseek2"),
        expert_weights_scaled=float(keys.get(f"{arch}.expert_weights_scale", 0.0)) not in (0, 1),
        kv_lora_rank=key("attention.kv_lora_rank"), q_lora_rank=key("attention.q_lora_rank"),
        n_rot=key("rope.dimension_count"), head_dim_k_mla=key("attention.key_length_mla"),
        head_dim_v_mla=key("attention.value_length_mla"), moe_layers=moe,
        ssm_d_conv=key("ssm.conv_kernel"), ssm_d_inner=key("ssm.inner_size"),
        ssm_d_state=key("ssm.state_size"), ssm_dt_rank=key("ssm.time_step_rank"),
        attention_layers=tuple(n > 0 for n in per_layer_kv) if arch == "jamba" else (),
    )  # fmt: skip
