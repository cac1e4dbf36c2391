"""kv-calc's verdict boundaries, with the available memory injected (not this machine's).

The rule the README states: a plan 'fits' up to 85% of available memory, is 'tight' up to
100%, and is 'too big' beyond. The expectations below are that rule's arithmetic, applied
to the total kv-calc prints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def _row(cli, available: int) -> dict:
    result = cli("kv-calc", "--ctx", "4096", "--json", timeout=60)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["available_bytes"] == available
    return data["rows"][0]


def test_verdicts_change_at_85_and_100_percent(
    cli, store_with_smollm2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCALLLM_AVAILABLE_MEMORY", str(10**12))
    total = _row(cli, 10**12)["total_bytes"]
    cases = {
        math.ceil(total / 0.85): "fits",  # total <= 85% of this
        math.ceil(total / 0.85) - 1: "tight",  # just over 85%
        total: "tight",  # exactly 100%
        total - 1: "too big",  # one byte short
    }
    for available, verdict in cases.items():
        monkeypatch.setenv("LOCALLLM_AVAILABLE_MEMORY", str(available))
        assert _row(cli, available)["verdict"] == verdict, (available, total)
