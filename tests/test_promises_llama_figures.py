"""kv-calc's printed figures read from llama.cpp itself, not restated in a test.

- The default model's weights line ("weights 92.10 MiB" in the README) is the model buffer
  llama.cpp logs when it loads SmolLM2.
- The sliding-window cache kv-calc's arithmetic sizes (4608 cells for a 4096-token window
  at ubatch 512) is the one llama.cpp allocates for the same model (Gemma 2's header,
  dry-run: no weights), at the same context and ubatch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support.gguf_files import write_header_gguf

from localllm.runtime.dry_run import DryRunSettings, plan_contexts

MIB = 1 << 20


@pytest.mark.slow
def test_weights_line_is_llama_cpps_model_buffer(store_with_smollm2: Path, smollm2_loaded, cli):
    logged = [
        float(m[1])
        for line in smollm2_loaded.load_log
        if (m := re.search(r"model buffer size\s*=\s*([\d.]+) MiB", line))
    ]
    assert logged, "llama.cpp's model buffer line was not captured"
    weights = f"{sum(logged):.2f}"
    result = cli("kv-calc", "--ctx", "512,2048")
    assert result.exit_code == 0, result.stderr
    assert re.search(rf"^weights\s+{weights} MiB", result.stdout, re.MULTILINE)
    assert f"│ weights {weights} MiB" in result.stdout  # the chart's weights line
    data = json.loads(cli("kv-calc", "--ctx", "512", "--json").stdout)
    assert f"{data['weights_bytes'] / MIB:.2f}" == weights


@pytest.mark.slow
@pytest.mark.parametrize("ubatch", [512, 100])
def test_sliding_window_arithmetic_is_llama_cpps_swa_cache(
    tmp_path: Path, cli, ubatch: int
) -> None:
    """kv-calc's arithmetic (--estimate) against llama.cpp's dry run of the same header."""
    header = write_header_gguf(tmp_path / "gemma-2-9b.gguf", "gemma-2-9b")  # window 4096
    ctx = 8192  # its trained length
    [plan] = plan_contexts(header, [DryRunSettings(ctx, n_ubatch=ubatch)]).contexts
    assert plan.error is None, plan.error
    theirs = [(c.kind, c.layers, c.cells, c.k_bytes, c.v_bytes) for c in plan.caches]
    result = cli("kv-calc", str(header), "--ctx", str(ctx), "--ubatch", str(ubatch),
                 "--estimate", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    [row] = json.loads(result.stdout)["rows"]
    assert row["source"] == "estimate"
    ours = [(c["kind"], c["layers"], c["cells"], c["k_bytes"], c["v_bytes"]) for c in row["caches"]]
    assert ours == theirs
    [swa] = [c for c in plan.caches if c.kind == "swa"]
    assert row["swa_cells"] == swa.cells
    if ubatch == 512:
        assert row["swa_cells"] == 4608  # the window plus one ubatch: the README's figure
