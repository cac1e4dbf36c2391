"""The compute buffer, replayed: ggml's graph allocator walked over llama.cpp's graph.

llama.cpp sizes its compute buffer by reserving the graph of a full micro-batch
(``sched_reserve``): ggml-alloc (ggml/src/ggml-alloc.c) first places every graph input,
then walks the nodes in order, putting each new tensor in the best-fitting free block
(else at the end of the buffer), reusing a parent's memory for an in-place op whose
parent has no other consumer left, and freeing each tensor after its last consumer. The
buffer is the highest address the walk reaches, holes included. This module replays
that walk exactly, over the tensors of the graph llama.cpp builds, at their real sizes,
in the order ``ggml_build_forward_expand`` records them (checked against the node list
``GGML_SCHED_DEBUG=2`` prints). Weights and KV-cache views live in other buffers and take
no room.

Here: the allocator, the graph pieces every architecture shares (llama-graph.cpp's norm,
KV store, attention, feed-forward and mixture-of-experts builders) and the llama graph
(Llama 2/3, Mistral, Mixtral, SmolLM2 GGUFs; qwen2 adds q/k/v biases).
:mod:`localllm.plan.graph_archs` builds the other architectures' graphs from these pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "F32",
    "Batch",
    "Graph",
    "GraphShape",
    "KvInputs",
    "Tensor",
    "attend",
    "dense_ffn",
    "embed",
    "kv_inputs",
    "last_rows",
    "llama_graph",
    "moe_ffn",
    "norm",
    "output_head",
    "start_batch",
    "walk",
]

_ALIGNMENT = 32  # TENSOR_ALIGNMENT of the CPU buffer type
F32 = 4
_F16, _I32, _I64 = 2, 4, 8


@dataclass(frozen=True)
class GraphShape:
    """What sizes the tensors of one architecture's graph."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    head_dim_v: int = 0  # 0: head_dim
    swa_layers: tuple[bool, ...] = ()  # per layer: attends over the sliding-window cache
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0  # one expert's feed-forward width (0: n_ff)
    n_expert_shared: int = 0
    n_layer_dense_lead: int = 0  # leading layers with a dense feed-forward
    expert_weights_norm: bool = True  # the chosen experts' weights divided by their sum
    expert_weights_scaled: bool = False  # ... and scaled (a scale other than 0 or 1)
    kv_lora_rank: int = 0  # MLA: the cached latent's width
    q_lora_rank: int = 0
    n_rot: int = 0  # MLA: the rotated part of each head
    head_dim_k_mla: int = 0  # MLA: a query head's width (nope + rope)
    head_dim_v_mla: int = 0  # MLA: a value head's width
    ssm_d_conv: int = 0
    ssm_d_inner: int = 0
    ssm_d_state: int = 0
    ssm_dt_rank: int = 0
    attention_layers: tuple[bool, ...] = ()  # hybrids: the layers with attention
    moe_layers: tuple[bool, ...] = ()  # the layers with experts (empty: all, if any)

    @property
    def v_dim(self) -> int:
        return self.head_dim_v or self.head_dim

    def is_swa(self, il: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[il]

    def is_moe(self, il: int) -> bool:
        return bool(self.n_expert) and (not self.moe_layers or self.moe_layers[il])


# ----------------------------------------------------------------- the allocator


class _Allocator:
    """ggml_dyn_tallocr: free blocks sorted by address, the last one the open end."""

    def __init__(self) -> None:
        self.blocks: list[list[int]] = [[0, 1 << 62]]  # [offset, size]
        self.max_size = 0

    def alloc(self, size: int) -> int:
        size = -(-size // _ALIGNMENT) * _ALIGNMENT
        best, best_size = -1, 0
        for i, (_, block_size) in enumerate(self.blocks[:-1]):  # best fit, ties: the later
            if block_size >= size and (best == -1 or block_size <= best_size):
                best, best_size = i, block_size
        block = self.blocks[best]  # -1: the open end
        addr = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del self.blocks[best]
        self.max_size = max(self.max_size, addr + size)
        return addr

    def free(self, addr: int, size: int) -> None:
        size = -(-size // _ALIGNMENT) * _ALIGNMENT
        if size == 0:
            return
        blocks = self.blocks
        for i, block in enumerate(blocks):
            if block[0] + block[1] == addr:  # after this block: merge, maybe with the next
                block[1] += size
                if i + 1 < len(blocks) and block[0] + block[1] == blocks[i + 1][0]:
                    block[1] += blocks.pop(i + 1)[1]
                return
            if addr + size == block[0]:  # before this block: merge, maybe with the previous
                block[0], block[1] = addr, block[1] + size
                if i > 0 and blocks[i - 1][0] + blocks[i - 1][1] == block[0]:
                    blocks[i - 1][1] += blocks.pop(i)[1]
                return
        at = next((i for i, b in enumerate(blocks) if b[0] > addr), len(blocks))
        blocks.insert(at, [addr, size])


@dataclass(eq=False)
class Tensor:
    """One tensor of the graph: its bytes and what the allocator needs to know of it."""

    size: int
    srcs: tuple[Tensor, ...] = ()
    inplace: bool = False  # ggml_op_can_inplace: add, mul, scale, rms_norm, rope, soft_max...
    view_of: Tensor | None = None  # a view: no memory of its own
    external: bool = False  # weights, KV cache: another buffer
    output: bool = False  # never freed, never reused
    children: int = 0
    views: int = 0
    allocated: bool = False
    addr: int = 0


@dataclass
class Graph:
    """Inputs (placed first) and nodes in the order ggml records them."""

    nodes: list[Tensor] = field(default_factory=list)
    inputs: list[Tensor] = field(default_factory=list)
    weight: Tensor = field(default_factory=lambda: Tensor(0, external=True))

    def input(self, size: int) -> Tensor:
        t = Tensor(size)
        self.inputs.append(t)
        return t

    def op(self, size: int, *srcs: Tensor, inplace: bool = False, output: bool = False) -> Tensor:
        t = Tensor(size, srcs, inplace=inplace, output=output)
        self.nodes.append(t)
        return t

    def view(self, src: Tensor, size: int | None = None) -> Tensor:
        base = src.view_of or src
        t = Tensor(src.size if size is None else size, (src,), view_of=base, external=src.external)
        self.nodes.append(t)
        return t

    def store(self, *srcs: Tensor) -> None:
        """A write into another buffer (set_rows into the KV cache, a state copy)."""
        self.nodes.append(Tensor(0, srcs, external=True))


def walk(graph: Graph) -> int:
    """ggml_gallocr_alloc_graph_impl: the buffer size the graph needs."""
    alloc = _Allocator()
    for t in graph.inputs:  # inputs first, so nothing overwrites them
        t.addr, t.allocated = alloc.alloc(t.size), True
    for node in graph.nodes:
        if node.view_of is not None:
            node.view_of.views += 1
        for src in node.srcs:
            src.children += 1
    for node in graph.nodes:
        if node.view_of is None and not node.external:
            _place(alloc, node)
        for parent in node.srcs:
            parent.children -= 1
            if parent.children or parent.views:
                continue
            if parent.view_of is not None:
                base = parent.view_of
                base.views -= 1
                if not base.views and not base.children and base.allocated:
                    _release(alloc, base)
            elif parent.allocated:
                _release(alloc, parent)
    return alloc.max_size


def _release(alloc: _Allocator, t: Tensor) -> None:
    if not t.output:
        alloc.free(t.addr, t.size)
        t.allocated = False


def _place(alloc: _Allocator, node: Tensor) -> None:
    node.allocated = True
    if node.inplace:
        for p in node.srcs:
            # A view is never the allocator's own tensor (ggml_gallocr_is_own): no reuse.
            own = p.view_of is None and p.allocated and not p.output
            if own and p.size == node.size and p.children == 1 and not p.views:
                node.addr, p.allocated = p.addr, False
                return
    node.addr = alloc.alloc(node.size)


# ------------------------------------------------------------ shared graph pieces


@dataclass(frozen=True)
class KvInputs:
    """One attention cache's graph inputs: slot indices, mask, and the cells it spans."""

    k_idxs: Tensor
    v_idxs: Tensor
    mask: Tensor
    n_kv: int


@dataclass
class Batch:
    """The micro-batch a graph is built for and its shared inputs."""

    graph: Graph
    shape: GraphShape
    tokens: int
    outputs: int  # rows kept after the last layer
    flash_attn: bool
    n_seq: int = 1  # KV streams (one per sequence)
    out_ids: Tensor | None = None
    pos: Tensor | None = None
    s_copy: Tensor | None = None  # recurrent states: which rows each sequence reads
    caches: dict[bool, KvInputs] = field(default_factory=dict)  # by "sliding window"

    @property
    def act(self) -> int:
        return self.shape.n_embd * self.tokens * F32


def kv_inputs(b: Batch, n_kv: int, v_width: int) -> KvInputs:
    """llm_graph_input_attn_kv: K and V slot indices (without FA the V cache is
    transposed: one index per element; MLA caches no V: ``v_width`` 0) and the mask
    (f16 for FA, f32 without)."""
    g, t = b.graph, b.tokens
    k_idxs = g.input(t * _I64)
    v_idxs = g.input(t * _I64 * (1 if b.flash_attn else v_width)) if v_width else k_idxs
    mask = g.input(n_kv * t * (_F16 if b.flash_attn else F32))
    return KvInputs(k_idxs, v_idxs, mask, n_kv)


def start_batch(
    g: GraphShape, n_tokens: int, n_outputs: int, flash_attn: bool, caches: dict[bool, int],
    n_seq: int = 1, *, pos: bool = True,
) -> Batch:  # fmt: skip
    """The inputs, in the order the graph first reaches them: tokens; the embeddings input
    (a batch of vectors instead of tokens; never used here, never freed); positions; per
    cache its KV slot indices and mask; the output rows."""
    b = Batch(Graph(), g, n_tokens, n_outputs, flash_attn, n_seq)
    b.graph.input(n_tokens * _I32)
    b.graph.input(b.act)
    if g.ssm_d_inner:  # one state row per sequence
        b.s_copy = b.graph.input(n_seq * _I32)
    if pos:
        b.pos = b.graph.input(n_tokens * _I32)
    v_width = 0 if g.kv_lora_rank else g.n_head_kv * g.v_dim
    for swa, n_kv in caches.items():
        b.caches[swa] = kv_inputs(b, n_kv, v_width)
    b.out_ids = b.graph.input(n_outputs * _I32)
    return b


def embed(b: Batch) -> Tensor:
    """get_rows of the token embeddings."""
    return b.graph.op(b.act, b.graph.weight, b.graph.inputs[0])


def norm(b: Batch, x: Tensor, *, output: bool = False) -> Tensor:
    """build_norm (RMS): rms_norm then the weight's mul, both in place when they can."""
    cur = b.graph.op(x.size, x, inplace=True)
    return b.graph.op(x.size, cur, b.graph.weight, inplace=True, output=output)


def attend(
    b: Batch, q: Tensor, k: Tensor, v: Tensor, swa: bool, *, v_contiguous: bool = True,
    softcap: bool = False, n_head: int = 0, v_head: int = 0,
) -> Tensor:  # fmt: skip
    """build_attn with a KV cache: K and V rows stored (views of the cache: nothing
    allocated; a V that is a strided view is made contiguous first without FA), then
    build_attn_mha: flash attention, or KQ, (soft-capping,) softmax and KQV with the
    scores materialised. Returns the heads' output, [n_head * v_head, tokens]."""
    g, kv, t = b.graph, b.caches[swa], b.tokens
    n_head, v_head = n_head or b.shape.n_head, v_head or b.shape.v_dim
    g.store(g.view(k), kv.k_idxs, g.weight)
    if not b.flash_attn and not v_contiguous:
        v = g.op(v.size, v)  # ggml_cont_2d of the fused QKV's strided V
    g.store(g.view(v), kv.v_idxs, g.weight)
    q_view = g.view(q)  # permuted
    out = n_head * v_head * t * F32
    if b.flash_attn:
        return g.view(g.op(out, q_view, g.weight, g.weight, kv.mask))
    kq = g.op(kv.n_kv * t * n_head * F32, g.weight, q_view)
    if softcap:  # scale, tanh, scale: all in place
        for _ in range(3):
            kq = g.op(kq.size, kq, inplace=True)
    kq = g.op(kq.size, kq, kv.mask, inplace=True)  # soft_max_ext
    kqv = g.op(out, g.weight, kq)
    return g.op(out, g.view(kqv))  # cont of the permuted heads


def last_rows(b: Batch, il: int, *xs: Tensor) -> tuple[Tensor, ...]:
    """On the last layer, get_rows keeps the output rows of each tensor (a new tensor)."""
    if il != b.shape.n_layer - 1:
        return xs
    rows = b.shape.n_embd * b.outputs * F32
    out = tuple(b.graph.op(rows, x, b.out_ids) for x in xs)  # type: ignore[arg-type]
    b.tokens = b.outputs
    return out


def dense_ffn(b: Batch, x: Tensor, n_ff: int = 0, *, fused_up: bool = False) -> Tensor:
    """build_ffn with a gate (LLM_FFN_PAR): gate, up, swiglu/geglu (a new tensor), down.
    ``fused_up``: one up matrix of twice the width, split by the GLU (Phi-3)."""
    g, width = b.graph, (n_ff or b.shape.n_ff) * b.tokens * F32
    if fused_up:
        cur = g.op(width, g.op(2 * width, g.weight, x))  # swiglu of the two halves
    else:
        gate = g.op(width, g.weight, x)
        up = g.op(width, g.weight, x)
        cur = g.op(width, gate, up)
    return g.op(b.shape.n_embd * b.tokens * F32, g.weight, cur)


def moe_ffn(b: Batch, x: Tensor, *, n_ff: int = 0) -> Tensor:
    """build_moe_ffn (softmax gating): router logits and probabilities, the top-k
    experts, their (normalised) weights, gate/up/down for each token's k experts
    (mul_mat_id), weighted, then the k slices summed."""
    g, s, t = b.graph, b.shape, b.tokens
    n_used, width = s.n_expert_used, (n_ff or s.n_ff_exp or s.n_ff)
    norm_w, w_scale = s.expert_weights_norm, s.expert_weights_scaled
    probs = g.op(s.n_expert * t * F32, g.op(s.n_expert * t * F32, g.weight, x), inplace=True)
    probs_view = g.view(probs)
    argsort = g.op(s.n_expert * t * _I32, probs)
    top_k = g.view(argsort)
    weights = g.op(n_used * t * F32, probs_view, top_k)  # get_rows
    if norm_w:
        flat = g.view(weights)
        total = g.op(t * F32, flat)  # sum_rows
        total = g.op(total.size, total, inplace=True)  # clamp
        weights = g.op(weights.size, flat, total, inplace=True)  # div: src is a view
        weights = g.view(weights)
    if w_scale:
        weights = g.op(weights.size, weights, inplace=True)
    cur = g.view(x)
    gate = g.op(width * n_used * t * F32, g.weight, cur, top_k)
    up = g.op(width * n_used * t * F32, g.weight, cur, top_k)
    act = g.op(gate.size, gate, up)  # swiglu_split: a new tensor
    experts = g.op(s.n_embd * n_used * t * F32, g.weight, act, top_k)
    experts = g.op(experts.size, experts, weights, inplace=True)
    slices = [g.view(experts, s.n_embd * t * F32) for _ in range(n_used)]
    out = slices[0]
    for piece in slices[1:]:
        out = g.op(s.n_embd * t * F32, out, piece, inplace=True)
    return out if n_used > 1 else g.op(out.size, out)


def output_head(b: Batch, x: Tensor, *, softcap: bool = False) -> None:
    """The final norm (an output: never freed) and the logits (soft-capped: 3 in place)."""
    cur = norm(b, x, output=True)
    size = b.shape.n_vocab * b.outputs * F32
    if not softcap:
        b.graph.op(size, b.graph.weight, cur, output=True)
        return
    logits = b.graph.op(size, b.graph.weight, cur)
    logits = b.graph.op(size, logits, inplace=True)
    logits = b.graph.op(size, logits, inplace=True)
    b.graph.op(size, logits, inplace=True, output=True)


# --------------------------------------------------------------- llama's graph


def llama_graph(b: Batch, bias: bool) -> Graph:
    """llama.cpp's pp graph of the llama architecture (src/models/llama.cpp; Mixtral's
    experts through build_moe_ffn) and qwen2 (q/k/v biases)."""
    g, s, t = b.graph, b.shape, b.tokens
    n_q, n_k = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    inp = embed(b)
    for il in range(s.n_layer):
        residual = inp
        cur = norm(b, inp)
        q = g.op(n_q * t * F32, g.weight, cur)
        if bias:
            q = g.op(q.size, q, g.weight, inplace=True)
        q = g.op(q.size, g.view(q), b.pos, inplace=True)  # rope (over a reshape)
        v = g.op(n_k * t * F32, g.weight, cur)
        if bias:
            v = g.op(v.size, v, g.weight, inplace=True)
        k = g.op(n_k * t * F32, g.weight, cur)
        if bias:
            k = g.op(k.size, k, g.weight, inplace=True)
        k = g.op(k.size, g.view(k), b.pos, inplace=True)
        out = attend(b, q, k, v, s.is_swa(il))
        out = g.op(b.act, g.weight, out)  # attn_output
        out, residual = last_rows(b, il, out, residual)
        ffn_inp = g.op(b.act, out, residual, inplace=True)
        cur = norm(b, ffn_inp)
        cur = moe_ffn(b, cur) if s.is_moe(il) else dense_ffn(b, cur)
        inp = g.op(b.act, cur, ffn_inp, inplace=True)
    output_head(b, inp)
    return g
