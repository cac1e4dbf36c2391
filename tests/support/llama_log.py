"""Test helper: what llama.cpp logs it applied for RoPE, read from its load log.

An independent reference for localllm.plan.rope's plans: the tests compare the plan with what
llama.cpp itself reports after creating the context.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AppliedRope:
    """The RoPE settings llama.cpp reports it applied when it created the context."""

    freq_base: float | None
    freq_scale: float | None
    n_ctx_orig_yarn: int | None  # from the model's load log (the file's value)
    n_ctx_train_adjusted: int | None  # set when llama.cpp saw a custom YaRN scale


def parse_applied_rope(lines: Sequence[str]) -> AppliedRope:
    """Read freq_base / freq_scale and the YaRN notes out of llama.cpp's load log."""
    base = scale = None
    orig = adjusted = None
    for line in lines:
        if "llama_context" in line or "llama_init_from_model" in line:
            if m := re.search(r"freq_base\s*=\s*([\d.eE+-]+)", line):
                base = float(m[1])
            elif m := re.search(r"freq_scale\s*=\s*([\d.eE+-]+)", line):
                scale = float(m[1])
            elif m := re.search(r"n_ctx_train adjusted to (\d+)", line):
                adjusted = int(m[1])
        if m := re.search(r"n_ctx_orig_yarn\s*=\s*(\d+)", line):
            orig = int(m[1])
    return AppliedRope(base, scale, orig, adjusted)
