"""llama.cpp's dry-run figures kept between runs (localllm.plan.dry_run_cache).

A cached plan must be the dry run's own figures, found again only for the same file
(identity), build and settings; anything else is dry-run again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.gguf_files import write_header_gguf

from localllm.errors import ModelLoadError
from localllm.gguf.spec import read_model_spec
from localllm.plan.dry_run_cache import CachedDryRun, dry_run_cache_dir
from localllm.plan.preload import plan_load
from localllm.runtime import dry_run
from localllm.runtime.dry_run import DryRunModel, DryRunSettings


def _no_dry_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("llama.cpp was asked to dry-run a cached plan")

    monkeypatch.setattr(dry_run.DryRunModel, "__init__", refuse)


def test_a_cached_plan_is_the_dry_runs_own(tmp_path: Path) -> None:
    path = write_header_gguf(tmp_path / "7b.gguf", "llama-2-7b")
    settings = DryRunSettings(n_ctx=4096, type_k="q8_0", type_v="q8_0")
    with DryRunModel(path) as model:
        fresh, weights = model.plan(settings), model.weights_bytes
    with CachedDryRun(path, use_extra_bufts=True) as cached:
        assert cached.plan(settings) == fresh and cached.weights_bytes == weights
    (entry,) = dry_run_cache_dir().glob("*.json")
    assert len(json.loads(entry.read_text())["plans"]) == 1


def test_a_second_plan_of_the_same_file_needs_no_dry_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_header_gguf(tmp_path / "7b.gguf", "llama-2-7b")
    spec = read_model_spec(path)
    first = plan_load("7b", spec, n_ctx=2048)
    assert first.source == "llama.cpp dry run"
    _no_dry_run(monkeypatch)
    again = plan_load("7b", spec, n_ctx=2048)
    assert again.row == first.row


def test_other_settings_or_a_changed_file_are_dry_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_header_gguf(tmp_path / "7b.gguf", "llama-2-7b")
    with CachedDryRun(path, use_extra_bufts=True) as cached:
        cached.plan(DryRunSettings(n_ctx=2048))
    opened: list[Path] = []
    real_init = DryRunModel.__init__

    def counting(self: DryRunModel, p: Path, **kwargs: object) -> None:
        opened.append(Path(p))
        real_init(self, p, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dry_run.DryRunModel, "__init__", counting)
    with CachedDryRun(path, use_extra_bufts=True) as cached:
        cached.plan(DryRunSettings(n_ctx=2048))
        assert opened == []
        bigger = cached.plan(DryRunSettings(n_ctx=8192))  # not planned before
        assert opened == [path] and bigger.kv_bytes > 0
    os.utime(path, ns=(1, 1))  # the same path, another file as far as anyone can tell
    with CachedDryRun(path, use_extra_bufts=True) as cached:
        assert len(opened) == 2
        cached.plan(DryRunSettings(n_ctx=2048))
    with CachedDryRun(path, use_extra_bufts=False) as cached:  # another repacking choice
        assert len(opened) == 3


def test_a_damaged_cache_is_planned_again(tmp_path: Path) -> None:
    path = write_header_gguf(tmp_path / "7b.gguf", "llama-2-7b")
    settings = DryRunSettings(n_ctx=2048)
    with CachedDryRun(path, use_extra_bufts=True) as cached:
        fresh = cached.plan(settings)
    (entry,) = dry_run_cache_dir().glob("*.json")
    entry.write_text("{not json")
    with CachedDryRun(path, use_extra_bufts=True) as cached:
        assert cached.plan(settings) == fresh
    assert json.loads(entry.read_text())["plans"]


def test_a_missing_or_unloadable_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such model file"):
        CachedDryRun(tmp_path / "gone.gguf", use_extra_bufts=True)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ModelLoadError):
        CachedDryRun(bad, use_extra_bufts=True)


def test_the_folder_keeps_the_newest_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry outlives its file (a re-download, an upgrade): the folder is bounded."""
    import time

    from localllm.plan import dry_run_cache

    monkeypatch.setattr(dry_run_cache, "_KEEP_FILES", 2)
    entries = []
    for i in range(3):
        path = write_header_gguf(tmp_path / f"m{i}.gguf", "llama-2-7b")
        time.sleep(0.02)  # a later mtime than the last entry's, on a coarse file clock
        with CachedDryRun(path, use_extra_bufts=True) as cached:
            cached.plan(DryRunSettings(n_ctx=2048))
        entries.append(max(dry_run_cache_dir().glob("*.json"), key=os.path.getmtime))
    assert len(set(entries)) == 3
    assert sorted(dry_run_cache_dir().glob("*.json")) == sorted(entries[1:])
