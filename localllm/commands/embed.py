"""The ``embed`` command: [MODEL] TEXT... -> normalized embeddings as JSON on stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from localllm.commands.arguments import ThreadsOpt
from localllm.errors import InvalidArgument


def _is_model_ref(arg: str) -> bool:
    """Whether the first argument names a model: a .gguf or existing file, an hf:// ref,
    or a catalog alias (with its :QUANT); anything else is text to embed."""
    from localllm.store.catalog import load_catalog

    if arg.endswith(".gguf") or arg.startswith("hf://") or Path(arg).expanduser().is_file():
        return True
    return load_catalog().lookup(arg.rsplit(":", 1)[0]) is not None


def embed_cmd(
    args: Annotated[
        list[str],
        typer.Argument(
            help="[MODEL] TEXT...: the model (a catalog alias, a .gguf path or an hf:// ref; "
            "default: $LOCALLLM_MODEL or smollm2-135m) when the first of several arguments "
            "names one, then the texts, one vector each.",
            show_default=False,
        ),
    ],
    ctx: Annotated[
        int, typer.Option("--ctx", "-c", help="Embeddings context: the longest input in tokens.")
    ] = 4096,
    threads: ThreadsOpt = None,
) -> None:
    """Embed texts (pooled as the GGUF says, else mean; L2-normalized) and print JSON."""
    from localllm.runtime.embeddings import embed_file
    from localllm.store.resolver import require_local_file, resolve_model
    from localllm.views.console import print_json

    model = args[0] if len(args) > 1 and _is_model_ref(args[0]) else None
    texts = args[1:] if model is not None else args
    if any(not t for t in texts):
        raise InvalidArgument("an empty TEXT has nothing to embed; drop it")
    path = require_local_file(resolve_model(model))
    result = embed_file(path, texts, n_ctx=ctx, threads=threads)
    print_json(
        {
            "model": path.name,
            "pooling": result.pooling,
            "dimensions": len(result.vectors[0]),
            "prompt_tokens": result.prompt_tokens,
            "data": [
                {"index": i, "text": text, "embedding": list(vector)}
                for i, (text, vector) in enumerate(zip(texts, result.vectors, strict=True))
            ],
        }
    )
