"""The pre-load memory check from kept figures (localllm.plan.need_cache).

A kept need must be the plan's own total and KV bytes, found again only for the same file,
build, planning code and settings; a load that would not fit is refused with the
planner's own message; a one-shot chat whose need is kept does not import the planner.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.gguf_files import write_header_gguf

from localllm.errors import InsufficientMemory
from localllm.gguf.spec import ModelSpec, read_model_spec
from localllm.machine import ENV_AVAILABLE_MEMORY
from localllm.plan import need_cache, preload
from localllm.plan.need import LoadNeed
from localllm.plan.need_cache import check_load_need, load_need_cache_dir
from localllm.plan.preload import plan_load


@pytest.fixture
def spec(tmp_path: Path) -> ModelSpec:
    """A Llama-2-7B-shaped header-only GGUF: llama.cpp dry-runs it, no weight is read."""
    return read_model_spec(write_header_gguf(tmp_path / "7b.gguf", "llama-2-7b"))


def _figures(need: LoadNeed) -> tuple[int, int]:
    return need.total_bytes, need.kv_bytes  # available_bytes is read anew each time


def _counting_plans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    planned: list[int] = []
    real = preload.plan_load

    def counting(label: str, spec: object, **settings: object) -> object:
        planned.append(int(settings["n_ctx"]))  # type: ignore[call-overload]
        return real(label, spec, **settings)  # type: ignore[arg-type]

    monkeypatch.setattr(preload, "plan_load", counting)
    return planned


def test_a_kept_need_is_the_plans_own(spec: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_load("7b", spec, n_ctx=2048, type_k="q8_0", type_v="q8_0")
    planned = _counting_plans(monkeypatch)
    first = check_load_need("7b", spec, n_ctx=2048, type_k="q8_0", type_v="q8_0")
    again = check_load_need("7b", spec, n_ctx=2048, type_k="q8_0", type_v="q8_0")
    assert planned == [2048]  # the second check planned nothing
    assert (first.total_bytes, first.kv_bytes) == (plan.row.total_bytes, plan.row.kv_bytes)
    assert (again.total_bytes, again.kv_bytes) == (first.total_bytes, first.kv_bytes)
    assert first.kv_bytes > 0 and first.total_bytes > first.kv_bytes
    (entry,) = load_need_cache_dir().glob("*.json")
    assert len(json.loads(entry.read_text())["needs"]) == 1


def test_other_settings_a_changed_file_or_planning_code_are_planned_again(
    spec: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    planned = _counting_plans(monkeypatch)
    small = check_load_need("7b", spec, n_ctx=2048)
    big = check_load_need("7b", spec, n_ctx=8192)
    assert planned == [2048, 8192] and big.kv_bytes == 4 * small.kv_bytes
    check_load_need("7b", spec, n_ctx=8192)
    assert planned == [2048, 8192]
    os.utime(spec.path, ns=(1, 1))  # the same path, another file as far as anyone can tell
    check_load_need("7b", spec, n_ctx=8192)
    assert planned == [2048, 8192, 8192]
    code = need_cache._code_identity()
    monkeypatch.setattr(need_cache, "_code_identity", lambda: [*code, ["plan/new.py", 1, 1]])
    check_load_need("7b", spec, n_ctx=8192)
    assert planned == [2048, 8192, 8192, 8192]


def test_a_damaged_cache_is_planned_again_and_rewritten(
    spec: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = check_load_need("7b", spec, n_ctx=2048)
    (entry,) = load_need_cache_dir().glob("*.json")
    planned = _counting_plans(monkeypatch)
    for damage in ("{not json", json.dumps({"key": "other", "needs": {}})):
        entry.write_text(damage)
        assert _figures(check_load_need("7b", spec, n_ctx=2048)) == _figures(first)
    data = json.loads(entry.read_text())
    data["needs"] = {k: ["a", None] for k in data["needs"]}
    entry.write_text(json.dumps(data))
    assert _figures(check_load_need("7b", spec, n_ctx=2048)) == _figures(first)
    assert len(planned) == 3
    assert _figures(check_load_need("7b", spec, n_ctx=2048)) == _figures(first)
    assert len(planned) == 3  # rewritten whole: found again


def test_a_kept_need_that_does_not_fit_is_refused_as_the_planner_refuses(
    spec: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    need = check_load_need("7b", spec, n_ctx=4096)
    monkeypatch.setenv(ENV_AVAILABLE_MEMORY, str(need.total_bytes - 1))
    with pytest.raises(InsufficientMemory) as kept:
        check_load_need("7b", spec, n_ctx=4096)
    with pytest.raises(InsufficientMemory) as planned:
        preload.check_load_fits(plan_load("7b", spec, n_ctx=4096))
    assert str(kept.value) == str(planned.value)
    assert "the largest --ctx that fits" in str(kept.value)
    monkeypatch.setenv(ENV_AVAILABLE_MEMORY, str(need.total_bytes))  # exactly fits
    assert check_load_need("7b", spec, n_ctx=4096).available_bytes == need.total_bytes


@pytest.mark.slow
def test_a_chat_whose_need_is_kept_does_not_import_the_planner(
    store_with_smollm2: Path, tmp_path: Path
) -> None:
    code = (
        "import sys\nfrom localllm.cli import main\n"
        "sys.argv = ['localllm', 'chat', '-p', 'hi', '--temp', '0', '--max-tokens', '2']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print(sorted(m for m in sys.modules if m.startswith('localllm.plan.')))"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    first, second = (r.stdout.strip().splitlines()[-1] for r in runs)
    assert "localllm.plan.kvcalc" in first  # planned, and kept
    assert "localllm.plan.kvcalc" not in second and "localllm.plan.need_cache" in second
    # The status line's KV size is the plan's, kept or planned.
    kv_sizes = [re.search(r"% of ([\d.]+ [KMG]iB)\)", r.stderr) for r in runs]
    assert kv_sizes[0] and kv_sizes[1] and kv_sizes[0][1] == kv_sizes[1][1], runs[1].stderr
