"""RoPE plans against what llama.cpp reports it applied, on the real SmolLM2.

The expected figures are hand arithmetic from SmolLM2's published config (trained on
8192 tokens, rope_theta 100000, head dim 64) and llama.cpp's own log and logits, never the
plan's own fields.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support.llama_log import parse_applied_rope

from localllm.gguf.spec import read_model_spec
from localllm.plan.rope import ROPE_METHODS, plan_rope
from localllm.runtime import LoadOptions, RopeParams, load_model

pytestmark = pytest.mark.slow

TRAINED, BASE, HEAD_DIM = 8192, 100000.0, 64  # HuggingFaceTB/SmolLM2-135M config.json


def _applied(path: Path, n_ctx: int, method: str | None):
    spec = read_model_spec(path)
    plan = plan_rope(spec, n_ctx, method)
    # A small batch keeps the compute buffer (and the test) small at a long context.
    model = load_model(path, LoadOptions(n_ctx=n_ctx, n_batch=32, n_ubatch=32, rope=plan.params))
    try:
        return plan, parse_applied_rope(model.load_log)
    finally:
        model.close()


@pytest.mark.parametrize("method", ROPE_METHODS)
def test_llama_cpp_applies_the_plan(smollm2_path: Path, method: str) -> None:
    target = 12288  # 1.5x SmolLM2's trained 8192
    plan, applied = _applied(smollm2_path, target, method)
    assert plan.method == method
    s = target / TRAINED
    expected_base = BASE * s ** (HEAD_DIM / (HEAD_DIM - 2)) if method == "ntk" else BASE
    expected_scale = 1 / s if method in ("linear", "yarn") else 1.0
    # llama.cpp logs the base with one decimal and the scale with %g (6 digits).
    assert applied.freq_base == pytest.approx(expected_base, abs=0.051)
    assert applied.freq_scale == pytest.approx(expected_scale, rel=1e-5)
    assert applied.n_ctx_orig_yarn == TRAINED  # the file's, as llama.cpp read it
    if method == "yarn":
        # llama.cpp re-derives the trained length from the original context and the scale.
        assert applied.n_ctx_train_adjusted == target
    else:
        assert applied.n_ctx_train_adjusted is None


def test_within_trained_length_llama_cpp_keeps_the_file(smollm2_path: Path) -> None:
    plan, applied = _applied(smollm2_path, 2048, None)
    assert plan.method == "none"
    assert applied.freq_base == pytest.approx(BASE)
    assert applied.freq_scale == 1.0
    assert applied.n_ctx_orig_yarn == TRAINED


def _last_logits(path: Path, rope: RopeParams) -> np.ndarray:
    """The next-token logits after a short prompt, with ``rope`` handed to llama.cpp."""
    options = LoadOptions(n_ctx=256, n_batch=64, n_ubatch=64, rope=rope, logits_all=True)
    model = load_model(path, options)
    try:
        tokens = model.tokenize("The quick brown fox jumps over the lazy dog. " * 4)
        model.llama.eval(tokens)
        return np.array(model.llama.scores[len(tokens) - 1], dtype=np.float64)
    finally:
        model.close()


def test_yarn_plan_leaves_llama_cpp_at_ext_factor_1_beta_32_and_1(smollm2_path: Path) -> None:
    """llama.cpp does not log its YaRN ext factor or betas: its logits tell them. The plan
    at 2x computes exactly what the README's values (ext factor 1, beta fast 32, beta slow
    1) set explicitly compute, and not what another ext factor or beta does."""
    plan = plan_rope(read_model_spec(smollm2_path), 2 * TRAINED, "yarn")
    explicit = RopeParams(
        scaling="yarn", freq_scale=0.5, yarn_orig_ctx=TRAINED,
        yarn_ext_factor=1.0, yarn_attn_factor=1.0, yarn_beta_fast=32.0, yarn_beta_slow=1.0,
    )  # fmt: skip
    ours = _last_logits(smollm2_path, plan.params)
    assert np.array_equal(ours, _last_logits(smollm2_path, explicit))
    for other in (
        replace(explicit, yarn_ext_factor=0.0),
        replace(explicit, yarn_beta_fast=8.0, yarn_beta_slow=4.0),
    ):
        assert np.abs(ours - _last_logits(smollm2_path, other)).max() > 1e-3, other
