"""Context-extension plans: how to stretch RoPE past the trained context.

From a model's GGUF facts (trained context, RoPE base, rotary dimensions, any scaling
already in the file) and a target context, :func:`plan_rope` picks the llama.cpp
parameters for one method and says in one sentence what it did:

- ``none``: RoPE as the file sets it (past the trained length the model degrades);
- ``linear``: position interpolation (Chen et al. 2023), freq scale = trained / target;
- ``ntk``: "NTK-aware" scaling, base x s^(d/(d-2)) for s = target / trained, d rotary dims;
- ``yarn``: YaRN (Peng et al. 2023) with the original context set and llama.cpp's
  defaults for the rest (ext factor 1, beta fast 32, beta slow 1) unless given.

Scaling already in the file compounds: a file at linear x4 asked for twice its
context gets freq scale 1/8, the way llama.cpp combines them.
"""

from __future__ import annotations

from dataclasses import dataclass

from localllm.errors import InvalidArgument
from localllm.flags import ROPE_METHODS, check_rope_method
from localllm.gguf.spec import ModelSpec
from localllm.runtime.params import RopeParams

__all__ = [
    "DEFAULT_METHOD",
    "ROPE_METHODS",
    "RopePlan",
    "ntk_base_multiplier",
    "plan_rope",
]

# Chosen from benchmarks/rope_extension.md: SmolLM2-135M at 2x its trained context scores
# ppl 9.74 with YaRN (9.78 at the trained length), 10.29 NTK, 31.7 linear, 76.8 none.
DEFAULT_METHOD = "yarn"

# llama.cpp's YaRN defaults (llama-hparams.h): what "not given" resolves to.
YARN_DEFAULT_EXT_FACTOR = 1.0
YARN_DEFAULT_BETA_FAST = 32.0
YARN_DEFAULT_BETA_SLOW = 1.0


@dataclass(frozen=True)
class RopePlan:
    """What to hand llama.cpp for a target context, and the sentence that explains it."""

    method: str  # none | linear | ntk | yarn (what is applied)
    n_ctx: int  # the target context asked for
    n_ctx_train: int
    factor: float  # n_ctx / n_ctx_train when extending, else 1.0
    params: RopeParams  # pass as LoadOptions(rope=plan.params)
    description: str  # one plain sentence saying what was done
    warning: str | None  # e.g. "none" past the trained length

    @property
    def extended(self) -> bool:
        """Whether the target context is past the trained length."""
        return self.n_ctx > self.n_ctx_train

    def as_json(self) -> dict[str, object]:
        p = self.params
        return {
            "method": self.method,
            "n_ctx": self.n_ctx,
            "n_ctx_train": self.n_ctx_train,
            "factor": self.factor,
            "scaling": p.scaling,
            "freq_base": p.freq_base,
            "freq_scale": p.freq_scale,
            "yarn_orig_ctx": p.yarn_orig_ctx,
            "description": self.description,
            "warning": self.warning,
        }


def ntk_base_multiplier(factor: float, rotary_dims: int) -> float:
    """NTK-aware scaling: the RoPE base grows by s^(d/(d-2)) (bloc97, 2023)."""
    if rotary_dims <= 2:
        raise InvalidArgument(f"NTK scaling needs more than 2 rotary dimensions, got {rotary_dims}")
    return factor ** (rotary_dims / (rotary_dims - 2))


def _file_freq_scale(spec: ModelSpec) -> float:
    """The freq scale the file already applies (llama.cpp: 1 / rope.scaling.factor)."""
    if spec.rope_scaling_type in ("none",) or not spec.rope_scaling_factor:
        return 1.0
    return 1.0 / spec.rope_scaling_factor


def _fmt(value: float) -> str:
    return f"{value:.4g}" if value < 1000 else f"{value:,.0f}"


def plan_rope(
    spec: ModelSpec,
    n_ctx: int,
    method: str | None = None,
    *,
    yarn_orig_ctx: int | None = None,
    yarn_ext_factor: float | None = None,
    yarn_attn_factor: float | None = None,
    yarn_beta_fast: float | None = None,
    yarn_beta_slow: float | None = None,
) -> RopePlan:
    """The RoPE plan for running ``spec`` at ``n_ctx`` tokens.

    Within the trained length nothing changes (method ``none``, default params) unless
    a method is named; beyond it ``method`` (default :data:`DEFAULT_METHOD`) applies.
    """
    check_rope_method(method)
    if n_ctx <= 0:
        raise InvalidArgument(f"context size {n_ctx} must be a positive token count")
    train = spec.n_ctx_train
    extended = n_ctx > train
    if method is None:
        method = DEFAULT_METHOD if extended else "none"
    factor = n_ctx / train if extended else 1.0
    warning = None
    if method != "none" and not extended:
        # Scaling inside the trained length would only blur positions the model knows.
        params = RopeParams()
        description = (
            f"{n_ctx} tokens fit in the trained context of {train}, "
            f"so no {method} scaling is applied and RoPE stays as the model sets it."
        )
        method, factor = "none", 1.0
    elif method == "none":
        params, description, warning = _plan_none(n_ctx, train, factor)
    elif method == "linear":
        params, description = _plan_linear(spec, n_ctx, factor)
    elif method == "ntk":
        params, description = _plan_ntk(spec, n_ctx, factor)
    else:
        yarn = _YarnOverrides(
            yarn_orig_ctx, yarn_ext_factor, yarn_attn_factor, yarn_beta_fast, yarn_beta_slow
        )
        params, description = _plan_yarn(spec, n_ctx, factor, yarn)
    return RopePlan(method, n_ctx, train, factor, params, description, warning)


def _plan_none(n_ctx: int, train: int, factor: float) -> tuple[RopeParams, str, str | None]:
    if n_ctx <= train:
        return (
            RopeParams(),
            f"{n_ctx} tokens fit in the trained context of {train}; RoPE unchanged.",
            None,
        )
    description = (
        f"RoPE left unscaled at {n_ctx} tokens, {factor:.3g}x the trained context of {train}."
    )
    warning = (
        f"--rope none past the trained context ({n_ctx} > {train} tokens): positions "
        f"beyond {train} are unseen in training and quality will degrade; "
        f"--rope {DEFAULT_METHOD} extends the context"
    )
    return RopeParams(), description, warning


def _plan_linear(spec: ModelSpec, n_ctx: int, factor: float) -> tuple[RopeParams, str]:
    scale = _file_freq_scale(spec) / factor
    description = (
        f"Linear position interpolation: positions compressed {factor:.3g}x "
        f"(freq scale {_fmt(scale)}) so {n_ctx} tokens map onto the trained {spec.n_ctx_train}."
    )
    return RopeParams(scaling="linear", freq_scale=scale), description


def _plan_ntk(spec: ModelSpec, n_ctx: int, factor: float) -> tuple[RopeParams, str]:
    base = spec.rope_freq_base
    dims = spec.rope_dim or spec.head_dim
    new_base = base * ntk_base_multiplier(factor, dims)
    description = (
        f"NTK-aware scaling: RoPE base raised from {_fmt(base)} to {_fmt(new_base)} "
        f"(x{factor ** (dims / (dims - 2)):.4g} = {factor:.3g}^({dims}/{dims - 2})) "
        f"to reach {n_ctx} tokens, positions unchanged."
    )
    # The file's own scaling type and scale stay; only the base moves.
    return RopeParams(freq_base=new_base), description


@dataclass(frozen=True)
class _YarnOverrides:
    orig_ctx: int | None
    ext_factor: float | None
    attn_factor: float | None
    beta_fast: float | None
    beta_slow: float | None


def _plan_yarn(
    spec: ModelSpec, n_ctx: int, factor: float, given: _YarnOverrides
) -> tuple[RopeParams, str]:
    # A file already at YaRN keeps its original context; the factors compound.
    orig = given.orig_ctx or spec.rope_orig_ctx or spec.n_ctx_train
    scale = _file_freq_scale(spec) / factor
    params = RopeParams(
        scaling="yarn",
        freq_scale=scale,
        yarn_orig_ctx=orig,
        yarn_ext_factor=given.ext_factor if given.ext_factor is not None else -1.0,
        yarn_attn_factor=given.attn_factor if given.attn_factor is not None else 1.0,
        yarn_beta_fast=given.beta_fast if given.beta_fast is not None else YARN_DEFAULT_BETA_FAST,
        yarn_beta_slow=given.beta_slow if given.beta_slow is not None else YARN_DEFAULT_BETA_SLOW,
    )
    description = (
        f"YaRN x{1 / scale:.3g} (freq scale {_fmt(scale)}, original context {orig}, "
        f"beta fast {params.yarn_beta_fast:g}, beta slow {params.yarn_beta_slow:g}) "
        f"to reach {n_ctx} tokens."
    )
    return params, description
