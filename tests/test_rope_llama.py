"""RoPE plans against what llama.cpp reports it applied, on the real SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest
from llama_log import parse_applied_rope

from localllm.gguf_meta import read_model_spec
from localllm.rope import ROPE_METHODS, plan_rope
from localllm.runtime import LoadOptions, load_model

pytestmark = pytest.mark.slow


def _applied(path: Path, n_ctx: int, method: str | None):
    spec = read_model_spec(path)
    plan = plan_rope(spec, n_ctx, method)
    # A small batch keeps the compute buffer (and the test) small at a long context.
    model = load_model(path, LoadOptions(n_ctx=n_ctx, n_batch=32, n_ubatch=32, rope=plan.params))
    try:
        return spec, plan, parse_applied_rope(model.load_log)
    finally:
        model.close()


@pytest.mark.parametrize("method", ROPE_METHODS)
def test_llama_cpp_applies_the_plan(smollm2_path: Path, method: str) -> None:
    target = 12288  # 1.5x SmolLM2's trained 8192
    spec, plan, applied = _applied(smollm2_path, target, method)
    assert plan.method == method
    expected_base = plan.params.freq_base or spec.rope_freq_base
    expected_scale = plan.params.freq_scale or 1.0
    # llama.cpp logs the base with one decimal and the scale with %g (6 digits).
    assert applied.freq_base == pytest.approx(expected_base, abs=0.051)
    assert applied.freq_scale == pytest.approx(expected_scale, rel=1e-5)
    if method == "yarn":
        # llama.cpp re-derives the trained length from our original context and scale.
        assert applied.n_ctx_train_adjusted == int(plan.params.yarn_orig_ctx / expected_scale)
    else:
        assert applied.n_ctx_train_adjusted is None


def test_within_trained_length_llama_cpp_keeps_the_file(smollm2_path: Path) -> None:
    spec, plan, applied = _applied(smollm2_path, 2048, None)
    assert plan.method == "none"
    assert applied.freq_base == pytest.approx(spec.rope_freq_base)
    assert applied.freq_scale == 1.0
    assert applied.n_ctx_orig_yarn == spec.n_ctx_train
