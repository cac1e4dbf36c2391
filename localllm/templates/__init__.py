"""Chat templates: the one guarded renderer every template goes through, and its probes."""

from __future__ import annotations

from localllm.templates.budget import RenderBudget, RenderCost
from localllm.templates.caps import (
    SAMPLE_CONVERSATION,
    SAMPLE_SYSTEM,
    TemplateCaps,
    probe_caps,
    template_caps,
    validate,
)
from localllm.templates.sandbox import DEFAULT_HINT, GuardedTemplate

__all__ = [
    "DEFAULT_HINT",
    "SAMPLE_CONVERSATION",
    "SAMPLE_SYSTEM",
    "GuardedTemplate",
    "RenderBudget",
    "RenderCost",
    "TemplateCaps",
    "probe_caps",
    "template_caps",
    "validate",
]
