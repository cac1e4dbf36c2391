"""One resolver for model references, used by every command.

A reference is one of:
- nothing: the default model (``$LOCALLLM_MODEL``, else the catalog's default);
- a catalog alias, optionally with a quant: ``smollm2-135m``, ``llama-2-7b-chat:Q4_K_M``;
- a path to a .gguf file;
- a hub repo with an optional quant: ``TheBloke/Llama-2-13B-chat-GGUF:Q4_K_M``;
- one exact hub file: ``hf://org/repo/file.gguf``.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from localllm.errors import DefaultModelMissing, InvalidArgument, InvalidModelFile, ModelNotFound
from localllm.store.catalog import Catalog, CatalogEntry, QuantFile, load_catalog
from localllm.store.model_store import ModelStore

__all__ = ["ResolvedModel", "require_local_file", "resolve_model"]

ENV_MODEL = "LOCALLLM_MODEL"
HF_PREFIX = "hf://"


@dataclass(frozen=True)
class ResolvedModel:
    """What a reference names, and where its file is if it is here."""

    ref: str
    kind: str  # catalog | path | hub
    path: Path | None  # the local file, when present
    alias: str | None = None
    quant: str | None = None
    repo: str | None = None
    filename: str | None = None
    entry: CatalogEntry | None = None
    quant_file: QuantFile | None = None
    is_default: bool = False

    @property
    def present(self) -> bool:
        """Whether the file is here: a regular file, or any readable path the user named
        (a device or a pipe is read as what it is, and refused as not a GGUF)."""
        if self.path is None:
            return False
        if self.kind == "path":
            return self.path.exists() and not self.path.is_dir()
        return self.path.is_file()

    @property
    def pull_ref(self) -> str:
        """The reference to give ``localllm pull`` to fetch this model."""
        if self.kind == "catalog" and self.alias:
            return f"{self.alias}:{self.quant}" if self.quant else self.alias
        return self.ref


def _split_quant(ref: str) -> tuple[str, str | None]:
    name, sep, quant = ref.rpartition(":")
    if sep and name and quant and "/" not in quant:
        return name, quant
    return ref, None


def _looks_like_path(ref: str) -> bool:
    return (
        ref.endswith(".gguf")
        or ref.startswith((".", "~", os.sep))
        or (os.sep in ref and Path(ref).exists())
    )


def resolve_model(ref: str | None, store: ModelStore | None = None) -> ResolvedModel:
    """Turn what the user typed into a :class:`ResolvedModel` (nothing is loaded)."""
    store = store or ModelStore()
    catalog = load_catalog()
    is_default = not ref
    if not ref:
        ref = os.environ.get(ENV_MODEL) or catalog.default
    ref = ref.strip()
    if ref.startswith(HF_PREFIX):
        return _resolve_hub_file(ref, store, is_default)
    if ref.endswith(".gguf") and "/" not in ref and (store.root / ref).is_file():
        return ResolvedModel(ref=ref, kind="path", path=store.root / ref, is_default=is_default)
    if _looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise ModelNotFound(f"no such model file: {ref}")
        return _local_path(ref, path, is_default)
    name, quant = _split_quant(ref)
    entry = catalog.lookup(name)
    if entry is not None:
        return _resolve_catalog(ref, entry, quant, store, is_default)
    if Path(ref).expanduser().exists():  # a file named without .gguf: read it, never "pull" it
        return _local_path(ref, Path(ref).expanduser(), is_default)
    if "/" in name and name.count("/") == 1 and all(name.split("/")):
        stored = store.find(name, quant)
        return ResolvedModel(
            ref=ref,
            kind="hub",
            path=stored[0].path if len(stored) == 1 else None,
            repo=name,
            quant=quant.upper() if quant else None,
            filename=stored[0].filename if len(stored) == 1 else None,
            is_default=is_default,
        )
    raise ModelNotFound(_unknown_model_message(ref, name, catalog, store))


def _local_path(ref: str, path: Path, is_default: bool) -> ResolvedModel:
    if path.is_dir():
        raise InvalidModelFile(
            f"{ref} is a directory, not a GGUF file; give the path of a .gguf file in it"
        )
    return ResolvedModel(ref=ref, kind="path", path=path, is_default=is_default)


def _resolve_hub_file(ref: str, store: ModelStore, is_default: bool) -> ResolvedModel:
    parts = ref[len(HF_PREFIX) :].split("/")
    if len(parts) < 3 or not parts[-1].endswith(".gguf") or not all(parts):
        raise InvalidArgument(f"hub file reference {ref!r} must look like hf://org/repo/file.gguf")
    local = store.path_for(parts[-1])
    return ResolvedModel(
        ref=ref,
        kind="hub",
        path=local if local.is_file() else None,
        repo="/".join(parts[:2]),
        filename="/".join(parts[2:]),
        is_default=is_default,
    )


def _resolve_catalog(
    ref: str, entry: CatalogEntry, quant: str | None, store: ModelStore, is_default: bool
) -> ResolvedModel:
    quant_file = entry.quant(quant)
    if quant_file is None:
        raise InvalidArgument(
            f"{entry.alias} has no quant {quant!r}; known: {', '.join(entry.quant_names)}"
        )
    local = store.path_for(quant_file.file)
    return ResolvedModel(
        ref=ref,
        kind="catalog",
        path=local if local.is_file() else None,
        alias=entry.alias,
        quant=quant_file.quant,
        repo=entry.repo,
        filename=quant_file.file,
        entry=entry,
        quant_file=quant_file,
        is_default=is_default,
    )


def _unknown_model_message(ref: str, name: str, catalog: Catalog, store: ModelStore) -> str:
    known = catalog.names() + [m.filename for m in store.models()]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(catalog.names())}"
    return f"unknown model {ref!r}; {hint} (`localllm list` shows the store)"


def require_local_file(model: ResolvedModel) -> Path:
    """The model's file, or an error that names the command that fetches it."""
    if model.present:
        assert model.path is not None
        return model.path
    if model.kind == "hub" and model.filename is None:
        raise ModelNotFound(
            f"{model.ref} is not in the store; run `localllm pull {model.ref}` to download it"
        )
    message = f"{model.pull_ref} is not downloaded yet; run `localllm pull {model.pull_ref}`"
    if model.is_default:
        raise DefaultModelMissing(
            f"the default model {model.pull_ref} is not fetched yet; run `make setup` "
            f"or `localllm pull {model.pull_ref}`"
        )
    raise ModelNotFound(message)
