"""RoPE plans against the formulas, on synthetic GGUF headers (no model loaded)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from support.gguf_files import ARCHS, write_gguf
from support.llama_log import parse_applied_rope

from localllm.errors import InvalidArgument
from localllm.gguf.spec import ModelSpec, read_model_spec
from localllm.plan.rope import DEFAULT_METHOD, ROPE_METHODS, plan_rope
from localllm.runtime import LoadOptions, RopeParams


def _spec(tmp_path: Path, model: str = "llama-2-7b", **overrides: object) -> ModelSpec:
    return read_model_spec(write_gguf(tmp_path / f"{model}.gguf", model, overrides=overrides))


@pytest.mark.parametrize("method", [None, *ROPE_METHODS])
@pytest.mark.parametrize("n_ctx", [1, 2048, 4096])
def test_within_trained_length_nothing_changes(tmp_path: Path, method, n_ctx) -> None:
    spec = _spec(tmp_path)  # llama-2-7b: trained 4096
    plan = plan_rope(spec, n_ctx, method)
    assert plan.method == "none"
    assert plan.params == RopeParams()
    assert plan.factor == 1.0
    assert plan.warning is None
    assert not plan.extended
    assert str(n_ctx) in plan.description


def test_default_method_beyond_trained_length(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    plan = plan_rope(spec, 8192)
    assert plan.method == DEFAULT_METHOD
    assert plan.extended and plan.factor == 2.0
    assert plan.warning is None


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3-8b", "mistral-7b-v0.1"])
@pytest.mark.parametrize("factor", [1.5, 2.0, 4.0])
def test_linear_is_position_interpolation(tmp_path: Path, model: str, factor: float) -> None:
    spec = _spec(tmp_path, model)
    target = int(spec.n_ctx_train * factor)
    plan = plan_rope(spec, target, "linear")
    assert plan.params.scaling == "linear"
    assert plan.params.freq_scale == pytest.approx(spec.n_ctx_train / target)
    assert plan.params.freq_base == 0.0  # the file's base is kept
    assert plan.factor == pytest.approx(target / spec.n_ctx_train)


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3-8b", "mha-tiny"])
@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_ntk_raises_the_base(tmp_path: Path, model: str, factor: float) -> None:
    spec = _spec(tmp_path, model)
    d = ARCHS[model]["n_embd"] // ARCHS[model]["n_heads"]
    plan = plan_rope(spec, int(spec.n_ctx_train * factor), "ntk")
    expected = ARCHS[model]["rope_base"] * factor ** (d / (d - 2))
    assert plan.params.freq_base == pytest.approx(expected, rel=1e-12)
    assert plan.params.scaling is None and plan.params.freq_scale == 0.0
    assert f"{factor:g}^({d}/{d - 2})" in plan.description


def test_ntk_uses_the_rotary_dimension_count(tmp_path: Path) -> None:
    # A partial-rotary model: 32 of the 128 head dims rotate.
    spec = _spec(tmp_path, "llama-2-7b", **{"llama.rope.dimension_count": 32})
    plan = plan_rope(spec, 8192, "ntk")
    assert plan.params.freq_base == pytest.approx(10000.0 * 2 ** (32 / 30))


def test_yarn_sets_the_original_context_and_llama_defaults(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "llama-3-8b")  # trained 8192
    plan = plan_rope(spec, 32768, "yarn")
    p = plan.params
    assert p.scaling == "yarn"
    assert p.freq_scale == pytest.approx(0.25)
    assert p.yarn_orig_ctx == 8192
    # Negative is llama.cpp's "not set": it picks 1.0 for YaRN itself. What llama.cpp then
    # computes is held against explicit values in test_rope_llama.py.
    assert p.yarn_ext_factor < 0
    assert (p.yarn_beta_fast, p.yarn_beta_slow) == (32.0, 1.0)
    assert "original context 8192" in plan.description


def test_yarn_overrides_are_applied(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "llama-3-8b")
    plan = plan_rope(spec, 16384, "yarn", yarn_orig_ctx=4096, yarn_beta_fast=16.0)
    assert plan.params.yarn_orig_ctx == 4096
    assert plan.params.yarn_beta_fast == 16.0


def test_scaling_already_in_the_file_compounds(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        "llama-2-7b",
        **{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
    )
    plan = plan_rope(spec, 8192, "linear")
    assert plan.params.freq_scale == pytest.approx(1 / (4.0 * 2.0))


def test_yarn_file_keeps_its_original_context(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        "llama-3-8b",
        **{
            "llama.rope.scaling.type": "yarn",
            "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 2048,
        },
    )
    plan = plan_rope(spec, 16384, "yarn")
    assert plan.params.yarn_orig_ctx == 2048
    assert plan.params.freq_scale == pytest.approx(1 / (4.0 * 2.0))


def test_none_past_trained_length_warns(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    plan = plan_rope(spec, 8192, "none")
    assert plan.method == "none"
    assert plan.params == RopeParams()
    assert plan.warning is not None and "4096" in plan.warning and "8192" in plan.warning


@pytest.mark.parametrize("method", ["bogus", "NTK", ""])
def test_unknown_method_is_refused(tmp_path: Path, method: str) -> None:
    with pytest.raises(InvalidArgument, match="none, linear, ntk, yarn"):
        plan_rope(_spec(tmp_path), 8192, method)


@pytest.mark.parametrize("n_ctx", [0, -1])
def test_context_must_be_positive(tmp_path: Path, n_ctx: int) -> None:
    with pytest.raises(InvalidArgument, match="positive"):
        plan_rope(_spec(tmp_path), n_ctx)


@pytest.mark.parametrize("method", ROPE_METHODS)
def test_every_plan_is_a_valid_runtime_option(tmp_path: Path, method: str) -> None:
    plan = plan_rope(_spec(tmp_path), 16384, method)
    LoadOptions(n_ctx=plan.n_ctx, rope=plan.params).validate()
    assert plan.description.endswith(".")
    assert plan.as_json()["method"] == method


def test_parse_applied_rope_reads_llama_context_lines() -> None:
    lines = [
        "print_info: n_ctx_orig_yarn       = 8192",
        "print_info: freq_base_train       = 100000.0",
        "llama_context: freq_base             = 204522.3",
        "llama_context: freq_scale            = 0.25",
        "llama_init_from_model: n_ctx_train adjusted to 32768",
    ]
    applied = parse_applied_rope(lines)
    assert applied.freq_base == 204522.3
    assert applied.freq_scale == 0.25
    assert applied.n_ctx_orig_yarn == 8192
    assert applied.n_ctx_train_adjusted == 32768
    assert math.isclose(parse_applied_rope([]).freq_base or 0.0, 0.0)
