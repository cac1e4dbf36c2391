"""Which layers of a model keep what in llama.cpp's memory, read from the GGUF keys.

llama.cpp decides this at load, per architecture (``load_arch_hparams`` in
src/models/<arch>.cpp, ``llama_model::create_memory``, llama-hparams.cpp): which layers
keep a KV cache and how wide its K and V rows are (heads x key/value length, per layer;
MLA keeps only the compressed latent as K), which attend to a sliding window and so live
in a cache sized to it, which keep a recurrent state instead (with Qwen4-exp's PLE
history row), which add an indexer key cache (sparse attention), and DeepSeek-V4's
compressed K caches and compressor states. This module holds those rules, so the arithmetic of
:mod:`localllm.plan.memory` can size every cache without loading the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localllm.gguf.spec import RECURRENT_ARCHITECTURES, ModelSpec

__all__ = [
    "AttentionLayer",
    "CompressedCache",
    "CompressorState",
    "MemoryLayout",
    "layout_from_header",
    "layout_from_spec",
    "recurrent_widths",
]


@dataclass(frozen=True)
class AttentionLayer:
    """One layer's row in an attention cache: K and V elements per cell."""

    index: int
    k: int
    v: int  # 0: MLA, where V is read out of the cached latent
    swa: bool = False


@dataclass(frozen=True)
class CompressedCache:
    """A K-only cache of one row per ``ratio`` positions (DeepSeek-V4's CSA/HCA, its indexer).

    llama_kv_cache_dsv4 sizes it ``pad256(max(1, ceil(cells / ratio)))`` cells per stream.
    """

    kind: str  # compressed | indexer
    ratio: int
    layers: tuple[AttentionLayer, ...]


@dataclass(frozen=True)
class CompressorState:
    """DeepSeek-V4's compressor state of the layers with one ratio: an f32 kv and an f32
    score tensor per layer, ``width`` x ``rows`` per stream (llama_dsv4_comp_state)."""

    ratio: int
    rows: int
    width: int
    layers: int


@dataclass(frozen=True)
class MemoryLayout:
    """What every layer of a model keeps in llama.cpp's memory modules."""

    architecture: str
    attention: tuple[AttentionLayer, ...] = ()
    n_swa: int = 0  # the sliding window, in tokens (0: none)
    swa_type: str = "none"  # none | standard | chunked
    indexer: tuple[AttentionLayer, ...] = ()  # sparse attention's key cache, full size
    recurrent_layers: int = 0
    r_elements: int = 0  # per layer and sequence: conv / token-shift state (f32)
    s_elements: int = 0  # per layer and sequence: SSM / wkv / delta-rule state (f32)
    v_max: int = 0  # widest V row of any layer: the transposed V cache's width without FA
    unmodelled: str | None = None  # a memory module localllm does not size (approximate)
    n_expert: int = 0  # mixture of experts: a different feed-forward graph (compute buffer)
    p_layers: int = 0  # recurrent layers that also keep a PLE history row (Qwen4-exp)
    p_elements: int = 0  # per such layer and sequence (f32): llama-hparams' ple_conv_state
    compressed: tuple[CompressedCache, ...] = ()  # DeepSeek-V4
    compressor_states: tuple[CompressorState, ...] = ()  # DeepSeek-V4

    @property
    def has_swa(self) -> bool:
        return self.swa_type != "none" and any(layer.swa for layer in self.attention)


# Architectures llama.cpp creates no memory for (encoders, diffusion models).
_NO_MEMORY = frozenset(
    {
        "bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2",
        "jina-bert-v3", "eurobert", "wavtokenizer-dec", "gemma-embedding", "dream", "llada",
        "llada-moe", "rnd1",
    }
)  # fmt: skip
_RECURRENT = RECURRENT_ARCHITECTURES
# Hybrids whose recurrent layers are the ones without KV heads.
_RECURRENT_WHERE_NO_KV = frozenset(
    {"jamba", "granitehybrid", "plamo2", "lfm2", "lfm2moe", "kimi-linear", "kimi-k3",
     "bailingmoe3", "glm5-next"}
)  # fmt: skip
# Hybrids with one full-attention layer every N (N: their default interval).
_RECURRENT_INTERVAL = {"qwen3next": 4, "qwen35": 4, "qwen35moe": 4, "qwen4exp": 4, "minimax-01": 8}


@dataclass(frozen=True)
class _SwaRule:
    """How an architecture reads its sliding window (load_arch_hparams)."""

    period: int = 0  # default pattern period; 0: every layer
    dense_first: bool = False  # the full-attention layer opens each period
    default_window: int = 0
    needs_window_key: bool = False  # SWA only when sliding_window > 0 is in the file
    fixed_window: int = 0  # llama.cpp overrides the file's window with this
    swa_type: str = "standard"
    pattern_key: bool = True  # load_swa_pattern: the file's sliding_window_pattern wins


_SWA_RULES: dict[str, _SwaRule] = {
    "gemma2": _SwaRule(2, default_window=4096),
    "gemma3": _SwaRule(6, needs_window_key=True),
    "gemma3n": _SwaRule(5),
    "gemma4": _SwaRule(),
    "cohere2": _SwaRule(4),
    "cohere2moe": _SwaRule(4, dense_first=True),
    "gpt-oss": _SwaRule(2),
    "olmo2": _SwaRule(4, needs_window_key=True),
    "afmoe": _SwaRule(4, needs_window_key=True),
    "exaone-moe": _SwaRule(4, default_window=128),
    "smallthinker": _SwaRule(4, dense_first=True, needs_window_key=True, fixed_window=4096),
    "laguna": _SwaRule(4, dense_first=True, needs_window_key=True),
    "mellum": _SwaRule(4, needs_window_key=True),
    "muse-glimmer": _SwaRule(4),
    "plamo3": _SwaRule(8, needs_window_key=True),
    "granite_swa": _SwaRule(),
    "maple": _SwaRule(),
    "mimo2": _SwaRule(),
    "spark2_5": _SwaRule(),
    "step35": _SwaRule(),
    "dots3note": _SwaRule(),
    "deepseek4": _SwaRule(
        pattern_key=False
    ),  # every trunk layer slides; the compressed caches see further
    "llama4": _SwaRule(4, fixed_window=8192, swa_type="chunked"),
}


class _Keys:
    """The header's keys through ``{arch}.`` names, per-layer arrays expanded."""

    def __init__(self, kv: Mapping[str, Any], arch: str, n_layer: int) -> None:
        self.kv, self.arch, self.n_layer = kv, arch, n_layer

    def raw(self, name: str) -> Any:
        return self.kv.get(f"{self.arch}.{name}")

    def int(self, name: str, default: int = 0) -> int:
        value = self.raw(name)
        if isinstance(value, list):
            value = max(value) if value else default
        if isinstance(value, bool) or not isinstance(value, int | float):
            return default
        return int(value)

    def per_layer(self, name: str, default: Sequence[int]) -> list[int]:
        value = self.raw(name)
        if isinstance(value, list) and value:
            return [int(v) for v in value[: self.n_layer]] + [0] * (self.n_layer - len(value))
        if isinstance(value, int | float) and not isinstance(value, bool):
            return [int(value)] * self.n_layer
        return list(default)


def recurrent_widths(
    key: Callable[[str], int], arch: str, n_embd: int, n_head: int
) -> tuple[int, int]:
    """Elements of one layer's R and S rows: llama-hparams.cpp's n_embd_r / n_embd_s.

    ``key(name)`` reads ``{arch}.name`` as an int (0 when absent).
    """
    d_inner, d_state, d_conv = key("ssm.inner_size"), key("ssm.state_size"), key("ssm.conv_kernel")
    if head := key("wkv.head_size"):  # RWKV: token shift and wkv state
        return (key("token_shift_count") or 2) * n_embd, n_embd * head
    if l_cache := key("shortconv.l_cache"):  # LFM2 short convolutions
        return n_embd * (l_cache - 1), d_state * d_inner
    if head := key("kda.head_dim"):  # Kimi delta attention: Q, K, V convs; head x head state
        return 3 * (d_conv - 1 if d_conv else 3) * n_head * head, head * head * n_head
    conv = (d_conv - 1) * (d_inner + 2 * key("ssm.group_count") * d_state) if d_conv else 0
    if arch == "minimax-01":  # linear attention: a key_length x key_length state per head
        head = key("attention.key_length") or (n_embd // n_head if n_head else 0)
        return conv, head * head * n_head
    return conv, d_state * d_inner


def _swa_flags(keys: _Keys, rule: _SwaRule, n_layer: int) -> list[bool]:
    pattern = keys.raw("attention.sliding_window_pattern") if rule.pattern_key else None
    if isinstance(pattern, list):
        return [bool(v) for v in pattern[:n_layer]] + [False] * (n_layer - len(pattern))
    period = int(pattern) if isinstance(pattern, int) else rule.period
    if period == 0:
        return [True] * n_layer
    if rule.dense_first:
        return [il % period != 0 for il in range(n_layer)]
    return [il % period < period - 1 for il in range(n_layer)]


def _window(
    keys: _Keys, arch: str, n_layer: int, recurrent: list[bool]
) -> tuple[str, int, list[bool]]:
    """The SWA type, the window and which layers slide, as llama.cpp's loader sets them."""
    none: tuple[str, int, list[bool]] = ("none", 0, [False] * n_layer)
    found = keys.raw("attention.sliding_window")
    window = keys.int("attention.sliding_window")
    if arch == "lfm2":  # every attention layer slides when the file gives a window
        return ("standard", window, [not r for r in recurrent]) if window > 0 else none
    if arch == "exaone4":  # only the 64-layer (32B) model slides
        if n_layer != 64:
            return none
        return "standard", window or 4096, _swa_flags(keys, _SwaRule(4), n_layer)
    if arch == "llama4" and found is not None and window == 0:
        return none
    rule = _SWA_RULES.get(arch)
    if rule is None or (rule.needs_window_key and window <= 0):
        return none
    window = rule.fixed_window or window or rule.default_window
    return rule.swa_type, window, _swa_flags(keys, rule, n_layer)


def _recurrent_flags(keys: _Keys, arch: str, n_layer: int, kv_heads: list[int]) -> list[bool]:
    if arch in _RECURRENT:
        return [True] * n_layer
    listed = keys.raw("attention.recurrent_layers")
    if isinstance(listed, list):
        return [bool(v) for v in listed[:n_layer]] + [False] * (n_layer - len(listed))
    if arch in _RECURRENT_WHERE_NO_KV:
        return [h == 0 for h in kv_heads]
    if arch in ("nemotron_h", "nemotron_h_moe"):
        n_ff = keys.per_layer("feed_forward_length", [0] * n_layer)
        return [h == 0 and f == 0 for h, f in zip(kv_heads, n_ff, strict=True)]
    if arch == "falcon-h1":
        return [True] * n_layer
    if arch in _RECURRENT_INTERVAL:
        every = keys.int("full_attention_interval", _RECURRENT_INTERVAL[arch]) or 1
        return [(il + 1) % every != 0 for il in range(n_layer)]
    return [False] * n_layer


def _attention_filter(keys: _Keys, arch: str, recurrent: list[bool]) -> list[bool]:
    """Layers of the attention cache: what create_memory's filters and has_kv() let in."""
    n = len(recurrent)
    if arch == "falcon-h1":
        return [True] * n
    if arch in ("nemotron_h", "nemotron_h_moe"):
        n_ff = keys.per_layer("feed_forward_length", [0] * n)
        return [not r and f == 0 for r, f in zip(recurrent, n_ff, strict=True)]
    keep = [not r for r in recurrent]
    if arch == "gemma3n":  # hparams.n_layer_kv_from_start = 20: later layers reuse those caches
        keep = [k and il < 20 for il, k in enumerate(keep)]
    elif arch == "gemma4":
        shared = keys.int("attention.shared_kv_layers")
        keep = [k and il < n - shared for il, k in enumerate(keep)]
    return keep


def _indexer_layers(keys: _Keys, arch: str, attention: list[int]) -> list[int]:
    """Layers with an indexer key cache (sparse attention: DSA, MSA, QSA)."""
    if not keys.int("attention.indexer.key_length"):
        return []
    types = keys.per_layer("attention.indexer.types", [1] * keys.n_layer)
    if arch in ("deepseek32",):
        return attention
    if arch in ("glm-dsa", "dots3note", "glm5-next"):
        return [il for il in attention if types[il]]
    if arch == "hy_v4":
        return [il for il in attention if types[il]] if keys.int("attention.indexer.top_k") else []
    if arch == "minimax-m3":
        lead = keys.int("leading_dense_block_count")
        return [il for il in attention if il >= lead]
    if arch == "qwen4exp":
        return attention
    return []


def layout_from_header(kv: Mapping[str, Any]) -> MemoryLayout:
    """The memory layout llama.cpp builds for a GGUF with these keys (the header's kv)."""
    arch = str(kv.get("general.architecture") or "")
    n_layer_all = int(kv.get(f"{arch}.block_count") or 0)
    keys = _Keys(kv, arch, n_layer_all)
    if arch in _NO_MEMORY or n_layer_all <= 0:
        return MemoryLayout(arch)
    n_layer = n_layer_all - keys.int("nextn_predict_layers")  # MTP heads: not the trunk's
    n_embd = keys.int("embedding_length")
    heads = keys.per_layer("attention.head_count", [0] * n_layer_all)
    kv_heads = keys.per_layer("attention.head_count_kv", heads)
    n_head = max(heads) if heads else 0
    key_len = keys.int("attention.key_length", n_embd // n_head if n_head else 0)
    value_len = keys.int("attention.value_length", n_embd // n_head if n_head else 0)
    key_swa = keys.int("attention.key_length_swa", key_len)
    value_swa = keys.int("attention.value_length_swa", value_len)
    mla = bool(keys.raw("attention.key_length_mla") and keys.raw("attention.value_length_mla"))
    mla = mla or arch == "deepseek4"  # dsv4_make_k_only: K-only rows, as MLA
    recurrent = _recurrent_flags(keys, arch, n_layer_all, kv_heads)
    swa_type, n_swa, swa = _window(keys, arch, n_layer_all, recurrent)
    keep = _attention_filter(keys, arch, recurrent)
    attention = []
    for il in range(n_layer):
        if not keep[il]:
            continue
        k_len, v_len = (key_swa, value_swa) if swa[il] else (key_len, value_len)
        v = 0 if mla else kv_heads[il] * v_len
        attention.append(AttentionLayer(il, kv_heads[il] * k_len, v, swa[il]))
    v_max = 0 if mla else max(h * (value_swa if s else value_len)
                              for h, s in zip(kv_heads, swa, strict=True))  # fmt: skip
    index_k = keys.int("attention.indexer.key_length")
    if arch == "glm5-next" and keys.int("attention.indexer.kpool"):
        index_k *= 3  # key, gate and pooled values per token
    index_v = 0 if mla or arch == "qwen4exp" else value_len
    indexer = [AttentionLayer(il, index_k, index_v) for il in
               _indexer_layers(keys, arch, [a.index for a in attention])]  # fmt: skip
    n_recurrent = sum(recurrent[:n_layer])
    r = s = 0
    if n_recurrent:
        r, s = recurrent_widths(lambda name: keys.int(name), arch, n_embd, n_head)
    p_layers, p_elements = _ple_rows(keys, arch, n_embd, recurrent[:n_layer])
    head_k = key_swa if swa[0] else key_len  # llama.cpp's n_embd_head_k(): layer 0's
    compressed, states = _dsv4_caches(keys, arch, tuple(attention), head_k)
    return MemoryLayout(
        architecture=arch,
        attention=tuple(attention),
        n_swa=n_swa if swa_type != "none" else 0,
        swa_type=swa_type,
        indexer=tuple(indexer),
        recurrent_layers=n_recurrent,
        r_elements=r,
        s_elements=s,
        v_max=v_max,
        n_expert=keys.int("expert_count"),
        p_layers=p_layers,
        p_elements=p_elements,
        compressed=compressed,
        compressor_states=states,
    )


def _ple_rows(keys: _Keys, arch: str, n_embd: int, recurrent: list[bool]) -> tuple[int, int]:
    """Recurrent layers with a PLE history row and its elements (llama-hparams'
    ple_conv_state: (conv_kernel - 1) x ngram x hyper-connections x n_embd); Qwen4-exp only."""
    listed = keys.raw("ple.layers")
    if arch != "qwen4exp" or not isinstance(listed, list) or not listed:
        return 0, 0
    ngram, kernel = keys.int("ple.ngram_size"), keys.int("ple.conv_kernel")
    if (ngram - 1) * keys.int("ple.heads_per_ngram") <= 0 or kernel <= 0:
        return 0, 0
    # The loader refuses a PLE layer that is not recurrent; count only those anyway.
    layers = sum(1 for il in set(listed) if 0 <= il < len(recurrent) and recurrent[il])
    return layers, (kernel - 1) * ngram * keys.int("hyper_connection.count") * n_embd


_DSV4_CSA, _DSV4_HCA = 4, 128  # llama-kv-cache-dsv4.cpp's compression ratios


def _dsv4_caches(
    keys: _Keys, arch: str, attention: tuple[AttentionLayer, ...], head_k: int
) -> tuple[tuple[CompressedCache, ...], tuple[CompressorState, ...]]:
    """DeepSeek-V4's compressed K caches and compressor states (llama_kv_cache_dsv4);
    none for other architectures.

    Layers with compress ratio 4 (CSA) keep a compressed K and a lightning-indexer key
    (one head of indexer.key_length) per 4 positions; ratio 128 (HCA) a compressed K per
    128. Each has a compressor state: CSA 8 rows of 2 x head_k, HCA 128 rows of head_k,
    the indexer 8 rows of 2 x its key length.
    """
    if arch != "deepseek4":
        return (), ()
    ratios = keys.per_layer("attention.compress_ratios", [0] * keys.n_layer)
    csa = tuple(a for a in attention if ratios[a.index] == _DSV4_CSA)
    hca = tuple(a for a in attention if ratios[a.index] == _DSV4_HCA)
    index_k = keys.int("attention.indexer.key_length")
    lid = tuple(AttentionLayer(a.index, index_k, 0, a.swa) for a in csa)
    caches = (
        CompressedCache("compressed", _DSV4_CSA, csa),
        CompressedCache("compressed", _DSV4_HCA, hca),
        CompressedCache("indexer", _DSV4_CSA, lid),
    )
    states = (
        CompressorState(_DSV4_CSA, 2 * _DSV4_CSA, 2 * head_k, len(csa)),
        CompressorState(_DSV4_HCA, _DSV4_HCA, head_k, len(hca)),
        CompressorState(_DSV4_CSA, 2 * _DSV4_CSA, 2 * index_k, len(csa)),
    )
    return caches, states


def layout_from_spec(spec: ModelSpec) -> MemoryLayout:
    """A layout from architecture facts alone (presets, flags): every layer alike.

    A declared sliding window counts only for architectures whose llama.cpp loader
    applies it with one window for all layers; a llama-architecture file (Mistral-7B
    v0.1) declares one that llama.cpp ignores.
    """
    per_layer = spec.n_kv_heads_per_layer or (spec.n_kv_heads,) * spec.n_layers
    attention = tuple(
        AttentionLayer(il, h * spec.head_dim, h * spec.value_dim)
        for il, h in enumerate(per_layer)
        if h > 0
    )
    v_max = max((layer.v for layer in attention), default=0)
    return MemoryLayout(spec.architecture, attention, v_max=v_max)
