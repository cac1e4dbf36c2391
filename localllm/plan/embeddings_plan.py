"""What ``serve``'s embeddings context takes: llama.cpp's dry run of the context it makes.

``serve`` makes an embeddings context on a loaded model's own weights at the model's first
``/v1/embeddings`` request (:class:`localllm.runtime.embeddings.Embedder`): KV cells for
the whole ``--ctx``, a compute buffer for a ``--ctx``-token ubatch (pooling reads an input
whole from one ubatch: 809 MiB for SmolLM2 at 4096, nine times its weights) and the
outputs. The router counts it beside the model's own plan before it is made. The
settings are :func:`~localllm.runtime.embeddings.embeddings_settings`, the ones the
context is made with, so the plan and the allocation cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

from localllm.errors import ModelLoadError
from localllm.gguf.header import read_header
from localllm.gguf.spec import read_model_spec
from localllm.plan.dry_run_cache import CachedDryRun
from localllm.runtime.dry_run import ContextPlan
from localllm.runtime.embeddings import embeddings_settings, pooling_type
from localllm.runtime.library import choose_repack

__all__ = ["plan_embeddings_context"]


def plan_embeddings_context(path: Path, n_ctx: int, repack: bool | None = None) -> ContextPlan:
    """The embeddings context ``Embedder.load(path, n_ctx=n_ctx)`` makes on ``path``'s
    weights loaded with ``repack`` (its KV, compute and output bytes; weights not counted)."""
    spec = read_model_spec(path)
    pooling = pooling_type(read_header(path).kv.get(f"{spec.architecture}.pooling_type"))
    cells = min(n_ctx, spec.n_ctx_train or n_ctx)
    with CachedDryRun(path, use_extra_bufts=choose_repack(repack).repack) as model:
        plan: ContextPlan = model.plan(embeddings_settings(cells, pooling))
    if plan.error is not None:
        raise ModelLoadError(f"llama.cpp would not make an embeddings context: {plan.error}")
    return plan
