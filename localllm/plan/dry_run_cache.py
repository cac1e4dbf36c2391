"""llama.cpp's dry-run figures kept between runs: a file planned once is not dry-run again.

The dry run (:mod:`localllm.runtime.dry_run`) loads a model's metadata and creates a
context to size it: ~0.2 s for SmolLM2, paid by every ``chat -p`` before its real load.
Its figures depend only on the file, the llama.cpp build and the settings, so they are
kept under ``cache_root()/dry-run/``, one JSON file per model file, keyed by

- the file's identity: path, device, inode, size and mtime (a file changed in place, or
  a new file at the same path, is planned again);
- the llama.cpp build (:func:`library_fingerprint`) and the repacking choice;
- localllm's own dry-run code (its source files' sizes and mtimes: the log parsers);
- each context's settings, within the file.

Free memory is never cached: the verdict against it is made fresh on every run. A plan
llama.cpp refused (``error``) is not kept either. A damaged cache file is ignored and
rewritten. A file's entry outlives the file (a re-download, an upgrade of localllm or
llama.cpp each start a new one), so the folder keeps the most recently written
:data:`_KEEP_FILES` entries and no more.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from localllm.errors import ModelLoadError
from localllm.fileio import keep_newest, read_json_object, write_json_atomic
from localllm.paths import cache_root

__all__ = ["CACHE_FORMAT", "CachedDryRun", "dry_run_cache_dir", "file_key"]

CACHE_FORMAT = 1
_KEEP_PLANS = 64  # contexts kept per file (kv-calc sweeps add a row each)
_KEEP_FILES = 256  # entries kept in the folder, a few kB each


def dry_run_cache_dir() -> Path:
    return cache_root() / "dry-run"


def _code_identity() -> list[list[Any]]:
    # Found, not imported: a cache hit does not pay for importing the log parsers.
    out = []
    for name in ("localllm.runtime.dry_run", "localllm.runtime.dry_run_log"):
        spec = importlib.util.find_spec(name)
        origin = (spec.origin if spec else None) or ""
        st = os.stat(origin)
        out.append([Path(origin).name, st.st_size, st.st_mtime_ns])
    return out


def file_key(path: Path, use_extra_bufts: bool) -> dict[str, Any]:
    """What identifies a file's dry-run figures: the file, the llama.cpp build, the
    repacking choice and the dry-run code (raises OSError when the file is not there)."""
    from localllm.runtime.library import library_fingerprint

    real = path.resolve()
    st = real.stat()
    return {
        "format": CACHE_FORMAT,
        "path": str(real),
        "file": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns],
        "use_extra_bufts": use_extra_bufts,
        "llama_cpp": [list(f) for f in library_fingerprint()],
        "code": _code_identity(),
    }


def _settings_key(settings: Any) -> str:
    return json.dumps(asdict(settings), sort_keys=True)


def _plan_from_json(settings: Any, data: dict[str, Any]) -> Any:
    from localllm.runtime.dry_run import CacheReport, ContextPlan

    fields = dict(data)
    caches = tuple(CacheReport(**c) for c in fields.pop("caches"))
    return ContextPlan(settings=settings, caches=caches, **fields)


def _plan_to_json(plan: Any) -> dict[str, Any]:
    data = asdict(plan)
    data.pop("settings")
    return data


class CachedDryRun:
    """A :class:`DryRunModel` stand-in: ``weights_bytes`` and ``plan(settings)`` from the
    cache when this file was dry-run before with these settings, else from llama.cpp
    (the model is then opened once, and closed by :meth:`close`).

    Opening it raises ``ModelLoadError`` as ``DryRunModel`` does when nothing is cached
    for the file and llama.cpp cannot load it.
    """

    def __init__(self, path: Path, *, use_extra_bufts: bool) -> None:
        self.path, self.use_extra_bufts = Path(path), use_extra_bufts
        self._model: Any = None
        try:
            self._key = file_key(self.path, use_extra_bufts)
        except OSError:
            raise ModelLoadError(f"no such model file: {self.path}") from None
        digest = hashlib.sha256(json.dumps(self._key, sort_keys=True).encode()).hexdigest()
        self._cache_path = dry_run_cache_dir() / f"{digest[:32]}.json"
        entry = read_json_object(self._cache_path)
        valid = entry.get("key") == self._key and isinstance(entry.get("plans"), dict)
        self._entry: dict[str, Any] = entry if valid else {"key": self._key, "plans": {}}
        if not isinstance(self._entry.get("weights_bytes"), int):
            self._open()  # nothing known about this file: llama.cpp loads it now

    def _open(self) -> Any:
        if self._model is None:
            from localllm.runtime.dry_run import DryRunModel

            self._model = DryRunModel(self.path, use_extra_bufts=self.use_extra_bufts)
            self._entry["weights_bytes"] = int(self._model.weights_bytes)
        return self._model

    @property
    def weights_bytes(self) -> int:
        return int(self._entry["weights_bytes"])

    def plan(self, settings: Any) -> Any:
        """What one context with ``settings`` would allocate (cached, else dry-run)."""
        settings.validate()
        key = _settings_key(settings)
        plans = self._entry["plans"]
        if key in plans:
            try:
                return _plan_from_json(settings, plans[key])
            except (TypeError, ValueError, KeyError, AttributeError):
                plans.pop(key)  # written by another shape of the code: plan again
        plan = self._open().plan(settings)
        if plan.error is None:
            plans[key] = _plan_to_json(plan)
            while len(plans) > _KEEP_PLANS:
                plans.pop(next(iter(plans)))
            self._save()
        return plan

    def _save(self) -> None:
        # A read-only cache only costs the next run a dry run.
        with contextlib.suppress(OSError):
            write_json_atomic(self._cache_path, self._entry)
            keep_newest(self._cache_path.parent, _KEEP_FILES)

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None

    def __enter__(self) -> CachedDryRun:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
