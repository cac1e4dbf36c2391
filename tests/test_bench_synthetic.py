"""`bench --synthetic`: a model's speed from its tensor table, random weights, nothing kept."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINY = ["-p", "16", "-n", "4", "-r", "1", "-t", "1"]


def _leftovers(store: Path) -> list[Path]:
    tmp = store / ".tmp"
    return sorted(tmp.glob("localllm-synthetic-*")) if tmp.is_dir() else []


def test_synthetic_run_is_marked_and_leaves_nothing(
    cli, store_with_smollm2: Path, smollm2_path: Path
) -> None:
    import gguf

    real_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(smollm2_path).tensors)
    result = cli("bench", "--synthetic", *TINY, "-o", "json")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["synthetic"] for r in records] == [True, True]
    # The tensor table came from the stored SmolLM2: the record says so, and the model is
    # reported by the name it was asked for, not the temporary file's.
    assert all("SmolLM2-135M-Instruct.Q4_1.gguf" in r["synthetic_source"] for r in records)
    assert all(r["model_filename"] == "smollm2-135m:Q4_1" for r in records)
    # llama.cpp's model size of the stand-in is the real file's tensor bytes (gguf-py's count).
    assert all(r["model_size"] == real_bytes for r in records)
    assert "synthetic weights" in result.stderr
    assert _leftovers(store_with_smollm2) == []


def test_every_output_format_says_synthetic(cli, store_with_smollm2: Path) -> None:
    md = cli("bench", "--synthetic", *TINY)
    assert md.exit_code == 0, md.stderr
    rows = [line for line in md.stdout.splitlines() if line.startswith("| llama")]
    assert rows and all("(synthetic)" in line for line in rows)
    # The marker widens the model column instead of pushing the row out of line.
    table_lines = [line for line in md.stdout.splitlines() if line.startswith("|")]
    assert len({len(line) for line in table_lines}) == 1, table_lines
    assert len({line.index("|", 1) for line in table_lines}) == 1, table_lines
    # The model line names where the tensor table came from, not the temporary file's hash.
    model_line = next(line for line in md.stdout.splitlines() if line.startswith("model: "))
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in model_line
    assert "not hashed" in model_line and "sha256" not in model_line
    table = cli("bench", "--synthetic", *TINY, "-o", "csv").stdout
    parsed = list(csv.DictReader(io.StringIO(table)))
    assert [r["synthetic"] for r in parsed] == ["1", "1"]
    jsonl = cli("bench", "--synthetic", *TINY, "-o", "jsonl").stdout.splitlines()
    assert [json.loads(line)["synthetic"] for line in jsonl] == [True, True]
    assert _leftovers(store_with_smollm2) == []


def test_keep_synthetic_keeps_the_same_tensor_table(
    cli, store_with_smollm2: Path, smollm2_path: Path, tmp_path: Path
) -> None:
    import gguf

    kept = tmp_path / "kept.gguf"
    result = cli("bench", "--synthetic", "--keep-synthetic", str(kept), *TINY, "-o", "json")
    assert result.exit_code == 0, result.stderr
    ours, theirs = gguf.GGUFReader(kept), gguf.GGUFReader(smollm2_path)
    table = [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in ours.tensors]
    assert table == [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in theirs.tensors]
    assert kept.stat().st_size == smollm2_path.stat().st_size
    assert _leftovers(store_with_smollm2) == []


def test_a_preset_too_big_is_refused_before_anything_is_written(
    cli, store_with_smollm2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCALLLM_AVAILABLE_MEMORY", "2GiB")
    result = cli("bench", "llama-2-7b", "--synthetic", "-p", "16", "-n", "4", timeout=120)
    assert result.exit_code == 1, result.stderr
    assert "needs" in result.error_line and "but 2.00 GiB is available" in result.error_line
    assert _leftovers(store_with_smollm2) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quant", "Q4_K_M"], "--quant picks a preset's quantization with --synthetic"),
        (["--keep-synthetic", "x.gguf"], "--keep-synthetic keeps the file --synthetic writes"),
        (["--synthetic", "--quant", "Q4_K_M"], "--quant picks a preset's quantization"),
    ],
)
def test_synthetic_flag_errors(
    cli, store_with_smollm2: Path, args: list[str], message: str
) -> None:
    result = cli("bench", *args, *TINY)
    assert result.exit_code == 2
    assert message in result.error_line
