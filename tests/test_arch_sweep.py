"""Every architecture llama.cpp supports: the analytic plan against llama.cpp's dry run.

llama.cpp's ``test-llama-archs -s SEED -o DIR`` writes one small random-weight GGUF per
architecture (tests/llama_archs.py). Each file is dry-run by llama.cpp at a few settings
(both sliding-window sizings, flash attention on and off, several sequences, a quantized
cache, a context that is not a multiple of 256) and localllm's analytic plan of the same
file (kv_layout.layout_from_header + memory.plan_kv) must give every memory module's
bytes exactly. The compute buffer of these tiny models is reported, not asserted.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from llama_archs import arch_models

from localllm.gguf_header import read_header
from localllm.gguf_meta import read_model_spec
from localllm.kv_layout import layout_from_header
from localllm.memory import compute_buffer_bytes, context_shape, plan_kv
from localllm.runtime.dry_run import DryRunModel, DryRunSettings

# (ctx per sequence, sequences, K type, V type, flash attention, ubatch, full-size SWA)
GRID = [
    (4096, 1, "f16", "f16", True, 512, False),
    (4096, 1, "f16", "f16", True, 512, True),
    (1000, 4, "q8_0", "q8_0", True, 256, False),  # 3 or 5 sequences abort kimi-linear
    (2048, 2, "f16", "f16", False, 128, False),
    (700, 1, "f32", "f16", False, 512, True),
]
# Memory modules localllm does not size; the dry run itself cannot rebuild them to the
# byte either (llama.cpp logs them to 0.01 MiB only), so they stay llama.cpp's figures.
UNMODELLED = {"deepseek4", "qwen4exp"}


@pytest.fixture(scope="module")
def arch_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return sorted(arch_models(tmp_path_factory).glob("*.gguf"))


def _by_kind(caches: object) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for c in caches:  # type: ignore[attr-defined]
        out[c.kind] += c.bytes
    return {kind: n for kind, n in out.items() if n}


def _settings(point: tuple) -> DryRunSettings:
    ctx, n_seq, type_k, type_v, fa, ubatch, swa_full = point
    return DryRunSettings(
        ctx, n_seq=n_seq, n_batch=ubatch, n_ubatch=ubatch, type_k=type_k, type_v=type_v,
        flash_attn="on" if fa else "off", swa_full=swa_full,
    )  # fmt: skip


def test_every_architecture_kv_is_exact(arch_files: list[Path]) -> None:
    wrong: list[str] = []
    compared = unmodelled = 0
    compute_lines = []
    for path in arch_files:
        layout = layout_from_header(read_header(path).kv)
        spec = read_model_spec(path)
        with DryRunModel(path) as model:
            for point in GRID:
                ctx, n_seq, type_k, type_v, fa, ubatch, swa_full = point
                got = model.plan(_settings(point))
                if got.error is not None:  # llama.cpp refuses (e.g. q8_0 on an 80-wide head)
                    continue
                mine = plan_kv(layout, ctx, n_seq, type_k=type_k, type_v=type_v,
                               flash_attn=fa, n_ubatch=ubatch, swa_full=swa_full)  # fmt: skip
                if layout.unmodelled:
                    unmodelled += 1
                    assert model.architecture in UNMODELLED, model.architecture
                    continue
                compared += 1
                assert all(c.exact for c in got.caches), (path.name, got.caches)
                if _by_kind(mine.caches) != _by_kind(got.caches):
                    wrong.append(f"{path.name} {point}: {_by_kind(mine.caches)} "
                                 f"!= llama.cpp {_by_kind(got.caches)}")  # fmt: skip
                if got.n_ctx is not None:
                    assert mine.cells == got.n_ctx, (path.name, point)
            estimate = compute_buffer_bytes(
                spec, context_shape(4096), flash_attn=True, layout=layout
            )
            first = model.plan(_settings(GRID[0]))
            if estimate and first.compute_bytes:
                compute_lines.append(
                    f"{path.name}: {estimate.bytes / first.compute_bytes - 1:+.1%}"
                )
    print(f"{compared} contexts compared, {unmodelled} of unmodelled architectures")
    print("compute estimate against the dry run (ctx 4096, reported only):")
    print("\n".join(compute_lines))
    assert not wrong, "\n".join(wrong)
    assert compared >= 4 * (len(arch_files) - 2)
    assert {layout_from_header(read_header(p).kv).architecture for p in arch_files
            if layout_from_header(read_header(p).kv).unmodelled} == UNMODELLED  # fmt: skip


def test_the_sweep_covers_the_kinds_of_memory(arch_files: list[Path]) -> None:
    """The files exercise every rule: SWA, MLA, recurrent, hybrid, indexer, no cache."""
    seen = defaultdict(set)
    for path in arch_files:
        layout = layout_from_header(read_header(path).kv)
        if layout.has_swa:
            seen["swa"].add(layout.architecture)
        if layout.attention and all(a.v == 0 for a in layout.attention):
            seen["mla"].add(layout.architecture)
        if layout.recurrent_layers and not layout.attention:
            seen["recurrent"].add(layout.architecture)
        if layout.recurrent_layers and layout.attention:
            seen["hybrid"].add(layout.architecture)
        if layout.indexer:
            seen["indexer"].add(layout.architecture)
        if not layout.attention and not layout.recurrent_layers:
            seen["none"].add(layout.architecture)
    assert {"gemma2", "gemma3", "gpt-oss", "cohere2"} <= seen["swa"]
    assert {"deepseek2", "mistral4"} <= seen["mla"]
    assert {"mamba", "mamba2"} <= seen["recurrent"]
    assert {"jamba", "qwen3next", "nemotron_h", "granitehybrid", "lfm2"} <= seen["hybrid"]
    assert {"deepseek32", "glm-dsa", "minimax-m3"} <= seen["indexer"]
    assert {"dream", "llada"} <= seen["none"]
