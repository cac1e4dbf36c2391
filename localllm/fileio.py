"""Files written so that a crash never leaves half of one, and files hashed in one pass."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from localllm.paths import cache_root

__all__ = [
    "cached_sha256",
    "hash_file",
    "keep_newest",
    "read_json_object",
    "sha256_file",
    "write_json_atomic",
    "write_text_atomic",
]

_CHUNK = 8 << 20


def write_text_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any, *, sort_keys: bool = False, mode: int = 0o644) -> None:
    """``data`` as indented JSON, written atomically."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    write_text_atomic(path, text, mode=mode)


def keep_newest(
    directory: Path, keep: int, pattern: str = "*.json", *, max_bytes: int | None = None
) -> None:
    """Delete all but the ``keep`` most recently written ``pattern`` files of a cache
    folder, and the older ones past ``max_bytes`` in all: caches keyed by file identity
    get an entry per file ever read (temporary files, re-downloads), so they are bounded
    here rather than left to grow."""
    entries = []
    for entry in directory.glob(pattern):
        try:
            st = entry.stat()
        except OSError:  # deleted meanwhile by another run
            continue
        entries.append((st.st_mtime_ns, st.st_size, entry))
    total = 0
    for i, (_, size, entry) in enumerate(sorted(entries, reverse=True)):
        total += size
        if i >= keep or (max_bytes is not None and total > max_bytes and i > 0):
            entry.unlink(missing_ok=True)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; {} when missing or damaged (caches are rebuilt)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def hash_file(path: Path) -> Any:
    """A sha256 object fed with the whole file (to continue hashing what is appended)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest


def sha256_file(path: Path) -> str:
    return str(hash_file(path).hexdigest())


def cached_sha256(path: Path) -> str:
    """The file's sha256, remembered by path, size and mtime (a 4 GB hash takes a while)."""
    cache_path = cache_root() / "sha256.json"
    stat = path.stat()
    key = str(path.resolve())
    cache = read_json_object(cache_path)
    entry = cache.get(key)
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return str(entry["sha256"])
    digest = sha256_file(path)
    cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    write_json_atomic(cache_path, cache, sort_keys=True)
    return digest
