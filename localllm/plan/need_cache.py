"""The pre-load memory check from figures kept between runs: ``chat`` checks without planning.

Every chat checks kv-calc's plan of its file against free memory before it loads
(:mod:`localllm.plan.preload`). Building that plan imports the planner (kv-calc, the cache
and graph models) and runs it on the dry-run figures :mod:`localllm.plan.dry_run_cache`
keeps: ~40 ms, a third of what localllm added to a one-shot ``chat -p``
(benchmarks/chat_oneshot.md). What the check needs of the plan, the bytes the load takes
in all and of them the KV cache's, depends only on

- the file, the llama.cpp build and the repacking choice (the dry-run cache's own key);
- localllm's planning code (plan/ and gguf/: its source files' sizes and mtimes);
- the settings the plan was asked with (``plan_load``'s keywords).

They are kept under ``cache_root()/load-needs/``, one JSON file per model file. Free
memory is read anew on every run. A load that would not fit is planned in full, so its
refusal is :func:`~localllm.plan.preload.check_load_fits`'s, with the largest ``--ctx``
that fits; a plan made of estimates (llama.cpp could not dry-run the file) is not kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from localllm.errors import ModelLoadError
from localllm.fileio import keep_newest, read_json_object, write_json_atomic
from localllm.gguf.spec import ModelSpec
from localllm.machine import available_memory_bytes
from localllm.paths import cache_root
from localllm.plan.need import LoadNeed

__all__ = ["check_load_need", "load_need_cache_dir"]

CACHE_FORMAT = 1
_KEEP = 64  # settings kept per file
_KEEP_FILES = 256
_PACKAGE = Path(__file__).resolve().parents[1]
# The code a plan's figures come from besides the dry run's (file_key holds that): a change
# to any of it plans again.
_PLANNING_CODE = ("plan", "gguf")


def load_need_cache_dir() -> Path:
    return cache_root() / "load-needs"


def check_load_need(label: str, spec: ModelSpec, **settings: Any) -> LoadNeed:
    """What loading ``spec``'s file with ``settings`` (:func:`plan_load`'s keywords) takes.

    Raises :class:`~localllm.errors.InsufficientMemory` as ``check_load_fits`` does when it
    does not fit in what is available now.
    """
    available = available_memory_bytes()
    cache = _NeedCache.open(Path(spec.path), settings) if spec.path else None
    known = cache.get() if cache is not None else None
    if known is not None and (available is None or known[0] <= available):
        return LoadNeed(label, known[0], known[1], available)
    # The planner, on a miss only.
    from localllm.plan.context_plan import ESTIMATE_SOURCE
    from localllm.plan.preload import check_load_fits, plan_load

    plan = plan_load(label, spec, **settings)
    check_load_fits(plan)
    need = plan.need
    if cache is not None and plan.source != ESTIMATE_SOURCE:
        cache.put(need.total_bytes, need.kv_bytes)
    return need


def _code_identity() -> list[list[Any]]:
    out = []
    for part in _PLANNING_CODE:
        for file in sorted((_PACKAGE / part).glob("*.py")):
            st = file.stat()
            out.append([f"{file.parent.name}/{file.name}", st.st_size, st.st_mtime_ns])
    return out


class _NeedCache:
    """One file's kept needs, by settings."""

    def __init__(self, path: Path, key: dict[str, Any], settings: str) -> None:
        self.path, self.key, self.settings = path, key, settings
        entry = read_json_object(path)
        valid = entry.get("key") == key and isinstance(entry.get("needs"), dict)
        self.entry: dict[str, Any] = entry if valid else {"key": key, "needs": {}}

    @classmethod
    def open(cls, model: Path, settings: dict[str, Any]) -> _NeedCache | None:
        from localllm.plan.dry_run_cache import file_key
        from localllm.runtime.library import choose_repack

        try:
            key = file_key(model, choose_repack(settings.get("repack")).repack)
            key["planning_code"] = _code_identity()
        except (OSError, ModelLoadError):
            return None  # no such file: the planner says so
        key["need_format"] = CACHE_FORMAT
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        where = load_need_cache_dir() / f"{digest[:32]}.json"
        return cls(where, key, json.dumps(settings, sort_keys=True))

    def get(self) -> tuple[int, int] | None:
        need = self.entry["needs"].get(self.settings)
        if isinstance(need, list) and len(need) == 2 and all(isinstance(n, int) for n in need):
            return need[0], need[1]
        return None

    def put(self, total_bytes: int, kv_bytes: int) -> None:
        needs = self.entry["needs"]
        needs.pop(self.settings, None)
        needs[self.settings] = [total_bytes, kv_bytes]
        while len(needs) > _KEEP:
            needs.pop(next(iter(needs)))
        with contextlib.suppress(OSError):  # a read-only cache costs the next run a plan
            write_json_atomic(self.path, self.entry)
            keep_newest(self.path.parent, _KEEP_FILES)
