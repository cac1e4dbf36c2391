"""The compute buffer, replayed: ggml's graph allocator walked over llama.cpp's graph.

llama.cpp sizes its compute buffer by reserving the graph of a full micro-batch
(``sched_reserve``): ggml-alloc (ggml/src/ggml-alloc.c) first places every graph input,
then walks the nodes in order, putting each new tensor in the best-fitting free block
(else at the end of the buffer), reusing a parent's memory for an in-place op whose
parent has no other consumer left, and freeing each tensor after its last consumer. The
buffer is the highest address the walk reaches, holes included. This module replays
that walk exactly, over the tensors of the graph llama.cpp builds (src/models/llama.cpp,
llama-graph.cpp's attention and feed-forward builders, llama-kv-cache.cpp's inputs), at
their real sizes. Weights and KV-cache views live in other buffers and take no room.

Replayed today: the llama architecture (Llama 2/3, Mistral, SmolLM2 GGUFs) and qwen2
(q/k/v biases); held to llama.cpp's dry run within 0.1% across ctx 512-32768, ubatch
32-2048, flash attention on and off. Other architectures get :mod:`localllm.memory`'s
estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["REPLAYED_ARCHITECTURES", "GraphShape", "replay_compute_bytes"]

# Architectures whose graph is replayed here, and whether q/k/v have biases.
REPLAYED_ARCHITECTURES = {"llama": False, "qwen2": True}
_ALIGNMENT = 32  # TENSOR_ALIGNMENT of the CPU buffer type
_F32, _F16, _I32, _I64 = 4, 2, 4, 8
# After the first layers the allocator's walk repeats itself layer by layer; the last
# layer (which keeps only the output rows) differs. Replaying this many is exact.
_LAYERS_REPLAYED = 4


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
class _Tensor:
    size: int
    srcs: tuple[_Tensor, ...] = ()
    inplace: bool = False  # ggml_op_can_inplace: add, mul, scale, rms_norm, rope, soft_max...
    view_of: _Tensor | None = None  # a view: no memory of its own
    external: bool = False  # weights, KV cache: another buffer
    output: bool = False  # never freed, never reused
    children: int = 0
    views: int = 0
    allocated: bool = False
    addr: int = 0


@dataclass
class _Graph:
    nodes: list[_Tensor] = field(default_factory=list)
    inputs: list[_Tensor] = field(default_factory=list)

    def input(self, size: int) -> _Tensor:
        t = _Tensor(size)
        self.inputs.append(t)
        return t

    def op(self, size: int, *srcs: _Tensor, inplace: bool = False, output: bool = False) -> _Tensor:
        t = _Tensor(size, srcs, inplace=inplace, output=output)
        self.nodes.append(t)
        return t

    def view(self, src: _Tensor) -> _Tensor:
        t = _Tensor(src.size, (src,), view_of=src.view_of or src, external=src.external)
        self.nodes.append(t)
        return t


def _walk(graph: _Graph) -> int:
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


def _release(alloc: _Allocator, t: _Tensor) -> None:
    if not t.output:
        alloc.free(t.addr, t.size)
        t.allocated = False


def _place(alloc: _Allocator, node: _Tensor) -> None:
    node.allocated = True
    if node.inplace:
        for p in node.srcs:
            # A view is never the allocator's own tensor (ggml_gallocr_is_own): no reuse.
            own = p.view_of is None and p.allocated and not p.output
            if own and p.size == node.size and p.children == 1 and not p.views:
                node.addr, p.allocated = p.addr, False
                return
    node.addr = alloc.alloc(node.size)


# --------------------------------------------------------------- llama's graph


def _llama_graph(
    g: GraphShape, n_tokens: int, n_kv: int, flash_attn: bool, n_outputs: int
) -> _Graph:
    """llama.cpp's pp graph of the llama architecture (src/models/llama.cpp)."""
    bias = REPLAYED_ARCHITECTURES[g.architecture]
    t = n_tokens
    n_q, n_k = g.n_head * g.head_dim, g.n_head_kv * g.head_dim
    act = g.n_embd * t * _F32
    out_act = g.n_embd * n_outputs * _F32  # rows kept for the output
    graph = _Graph()
    weight = _Tensor(0, external=True)
    # The inputs, in the order the graph first reaches them: tokens; the embeddings input
    # (a batch of vectors instead of tokens; never used here, never freed); positions;
    # KV slot indices (without FA the V cache is transposed: one index per element).
    tokens = graph.input(t * _I32)
    graph.input(act)
    pos = graph.input(t * _I32)
    k_idxs = graph.input(t * _I64)
    v_idxs = graph.input(t * _I64 * (1 if flash_attn else n_k))
    mask = graph.input(n_kv * t * (_F16 if flash_attn else _F32))
    out_ids = graph.input(n_outputs * _I32)
    layers = min(g.n_layer, _LAYERS_REPLAYED)
    inp = graph.op(act, weight, tokens)  # get_rows of the token embeddings
    for il in range(layers):
        residual = inp
        cur = graph.op(act, inp, inplace=True)  # rms_norm
        cur = graph.op(act, cur, weight, inplace=True)  # x norm weight
        q = graph.op(n_q * t * _F32, weight, cur)
        if bias:
            q = graph.op(q.size, q, weight, inplace=True)
        q = graph.op(q.size, graph.view(q), pos, inplace=True)  # rope (over a reshape)
        v = graph.op(n_k * t * _F32, weight, cur)
        if bias:
            v = graph.op(v.size, v, weight, inplace=True)
        k = graph.op(n_k * t * _F32, weight, cur)
        if bias:
            k = graph.op(k.size, k, weight, inplace=True)
        k = graph.op(k.size, graph.view(k), pos, inplace=True)
        _set_rows(graph, k, k_idxs, weight)
        _set_rows(graph, v, v_idxs, weight)
        out = _attention(graph, g, q, mask, weight, t, n_kv, flash_attn)
        out = graph.op(act, weight, out)  # attn_output
        rows = t
        if il == layers - 1:  # the last layer keeps the output rows only
            out = graph.op(out_act, out, out_ids)
            residual = graph.op(out_act, residual, out_ids)
            rows, act = n_outputs, out_act
        ffn_inp = graph.op(act, out, residual, inplace=True)
        cur = graph.op(act, ffn_inp, inplace=True)
        cur = graph.op(act, cur, weight, inplace=True)
        gate = graph.op(g.n_ff * rows * _F32, weight, cur)
        up = graph.op(g.n_ff * rows * _F32, weight, cur)
        cur = graph.op(g.n_ff * rows * _F32, gate, up)  # swiglu: a new tensor
        cur = graph.op(act, weight, cur)
        inp = graph.op(act, cur, ffn_inp, inplace=True)
    cur = graph.op(out_act, inp, inplace=True)
    cur = graph.op(out_act, cur, weight, inplace=True, output=True)  # result_norm: an output
    graph.op(g.n_vocab * n_outputs * _F32, weight, cur, output=True)  # the logits
    return graph


def _set_rows(graph: _Graph, cur: _Tensor, idxs: _Tensor, cache: _Tensor) -> None:
    """Rows written into the KV cache: a view of the cache, nothing allocated."""
    graph.nodes.append(_Tensor(0, (graph.view(cur), idxs, cache), external=True))


def _attention(
    graph: _Graph, g: GraphShape, q: _Tensor, mask: _Tensor, cache: _Tensor, t: int,
    n_kv: int, flash_attn: bool,
) -> _Tensor:  # fmt: skip
    """build_attn_mha: flash attention, or KQ, softmax and KQV with the scores materialised."""
    n_q = g.n_head * g.head_dim
    q_view = graph.view(q)  # permuted
    if flash_attn:
        return graph.view(graph.op(n_q * t * _F32, q_view, cache, cache, mask))
    kq = graph.op(n_kv * t * g.n_head * _F32, cache, q_view)
    kq = graph.op(kq.size, kq, mask, inplace=True)  # soft_max_ext
    kqv = graph.op(n_q * t * _F32, cache, kq)
    return graph.op(n_q * t * _F32, graph.view(kqv))  # cont of the permuted heads


def replay_compute_bytes(
    g: GraphShape, n_tokens: int, n_kv: int, flash_attn: bool, n_outputs: int | None = None
) -> int | None:
    """The compute buffer llama.cpp reserves for ``n_tokens`` over ``n_kv`` cells per stream,
    or None for an architecture whose graph is not replayed.

    ``n_outputs``: the rows of logits (the micro-batch before llama.cpp rounds the token
    count up to a multiple of the sequences); default ``n_tokens``.
    """
    if g.architecture not in REPLAYED_ARCHITECTURES or g.n_layer <= 0:
        return None
    outputs = n_outputs if n_outputs is not None else n_tokens
    return _walk(_llama_graph(g, n_tokens, n_kv, flash_attn, outputs))
