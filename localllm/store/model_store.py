"""The local model store: a folder of verified .gguf files and its index.

The store is a folder of .gguf files (``models/`` in the checkout, or ``$LOCALLLM_HOME``)
plus ``store.json``, which remembers where each file came from and the sha256 it was
verified against. Files enter the store only through :meth:`ModelStore.install`:
verified first, then renamed into place atomically, so the store never holds a partial
or unverified file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from localllm.errors import ChecksumMismatch, InvalidArgument
from localllm.fileio import sha256_file, write_json_atomic
from localllm.paths import store_root

__all__ = ["INDEX_NAME", "ModelStore", "StoredModel"]

INDEX_NAME = "store.json"


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
        write_json_atomic(self.index_path, {k: asdict(v) for k, v in sorted(index.items())})

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

    def record(self, path: Path) -> StoredModel | None:
        """What the index remembers of ``path``, when it is a file of this store."""
        try:
            if path.resolve().parent != self.root.resolve() and path.parent != self.root:
                return None
        except OSError:
            return None
        return next((m for m in self.models() if m.filename == path.name), None)

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
