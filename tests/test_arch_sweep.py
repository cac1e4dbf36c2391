"""Every architecture llama.cpp supports: the analytic plan against llama.cpp's dry run.

llama.cpp's ``test-llama-archs -s SEED -o DIR`` writes one small random-weight GGUF per
architecture (tests/llama_archs.py). Each file is dry-run by llama.cpp at a few settings
(both sliding-window sizings, flash attention on and off, several sequences, a quantized
cache, a context that is not a multiple of 256) and localllm's analytic plan of the same
file (kv_layout.layout_from_header + memory.plan_kv) must give every memory module's
bytes exactly. Where the dry run itself cannot rebuild a module to the byte (llama.cpp logs
it to 0.01 MiB only: DeepSeek-V4's most compressed cache, Qwen4-exp's state with its PLE
history), the analytic bytes must print as llama.cpp's figures, and a second test sizes
those modules large enough that the 0.01 MiB figures pin them. The compute buffer of these
tiny models is reported, not asserted.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from support.llama_archs import arch_models

from localllm.gguf.header import read_header
from localllm.gguf.kv_layout import layout_from_header
from localllm.gguf.spec import read_model_spec
from localllm.plan.memory import compute_buffer_bytes, context_shape, plan_kv
from localllm.runtime.dry_run import DryRunModel, DryRunSettings

# (ctx per sequence, sequences, K type, V type, flash attention, ubatch, full-size SWA)
GRID = [
    (4096, 1, "f16", "f16", True, 512, False),
    (4096, 1, "f16", "f16", True, 512, True),
    (1000, 4, "q8_0", "q8_0", True, 256, False),  # 3 or 5 sequences abort kimi-linear
    (2048, 2, "f16", "f16", False, 128, False),
    (700, 1, "f32", "f16", False, 512, True),
]
_MIB = 1024 * 1024
# A module llama.cpp logs as up to three figures (K, V; or R, S, P), each to 0.01 MiB.
_LOG_ROUNDING = 3 * 0.005 * _MIB


@pytest.fixture(scope="module")
def arch_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return sorted(arch_models(tmp_path_factory).glob("*.gguf"))


def _modules(caches: object) -> list[tuple[str, int, int, int]]:
    """(kind, cells, streams, bytes) of every module that holds any byte, in one order."""
    return sorted((c.kind, c.cells, c.streams, c.bytes) for c in caches if c.bytes)  # type: ignore[attr-defined]


def _mismatches(mine: object, got: object) -> list[str]:
    """Modules where the analytic plan and the dry run differ: to the byte where the dry
    run rebuilt the module exactly, beyond the log's rounding where it could not."""
    ours = _modules(mine)
    theirs = sorted((c.kind, c.cells, c.streams, c.bytes, c.exact) for c in got if c.bytes)  # type: ignore[attr-defined]
    if [m[:3] for m in ours] != [t[:3] for t in theirs]:
        return [f"modules {ours} != llama.cpp {theirs}"]
    wrong = []
    for m, t in zip(ours, theirs, strict=True):
        exact = t[4]
        if (exact and m[3] != t[3]) or (not exact and abs(m[3] - t[3]) > _LOG_ROUNDING):
            wrong.append(f"{m[0]} {m[3]} != llama.cpp {t[3]}{'' if exact else ' (logged)'}")
    return wrong


def _settings(point: tuple) -> DryRunSettings:
    ctx, n_seq, type_k, type_v, fa, ubatch, swa_full = point
    return DryRunSettings(
        ctx, n_seq=n_seq, n_batch=ubatch, n_ubatch=ubatch, type_k=type_k, type_v=type_v,
        flash_attn="on" if fa else "off", swa_full=swa_full,
    )  # fmt: skip


def test_every_architecture_kv_is_exact(arch_files: list[Path]) -> None:
    wrong: list[str] = []
    compared = logged = 0
    compute_lines = []
    for path in arch_files:
        layout = layout_from_header(read_header(path).kv)
        spec = read_model_spec(path)
        assert layout.unmodelled is None, (path.name, layout.unmodelled)
        with DryRunModel(path) as model:
            for point in GRID:
                ctx, n_seq, type_k, type_v, fa, ubatch, swa_full = point
                got = model.plan(_settings(point))
                if got.error is not None:  # llama.cpp refuses (e.g. q8_0 on an 80-wide head)
                    continue
                mine = plan_kv(layout, ctx, n_seq, type_k=type_k, type_v=type_v,
                               flash_attn=fa, n_ubatch=ubatch, swa_full=swa_full)  # fmt: skip
                compared += 1
                logged += not all(c.exact for c in got.caches)
                wrong += [f"{path.name} {point}: {w}" for w in _mismatches(mine.caches, got.caches)]
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
    print(f"{compared} contexts compared, {logged} with a module the dry run logs only")
    print("compute estimate against the dry run (ctx 4096, reported only):")
    print("\n".join(compute_lines))
    assert not wrong, "\n".join(wrong)
    assert compared >= 4 * len(arch_files)
    assert logged <= 2 * len(GRID)  # DeepSeek-V4 and Qwen4-exp only


# Contexts where llama.cpp's 0.01 MiB figures pin the modules the dry run cannot rebuild:
# DeepSeek-V4's HCA cache (one row per 128 positions) at 2^20 tokens is 8192 cells, 1 MiB
# in f16, where one element more per row would add 16 KiB; Qwen4-exp's state rows at 256
# sequences make R, S and P whole MiB figures.
@pytest.mark.parametrize(
    ("name", "ctx", "n_seq"),
    [("deepseek4-moe.gguf", 1 << 20, 1), ("deepseek4-moe.gguf", 1 << 19, 2),
     ("qwen4exp-moe.gguf", 256, 256), ("qwen4exp-moe.gguf", 512, 100)],
)  # fmt: skip
def test_logged_only_modules_at_a_telling_size(
    arch_files: list[Path], name: str, ctx: int, n_seq: int
) -> None:
    path = next(p for p in arch_files if p.name == name)
    layout = layout_from_header(read_header(path).kv)
    with DryRunModel(path) as model:
        got = model.plan(DryRunSettings(ctx, n_seq=n_seq, n_batch=256, n_ubatch=256))
    assert got.error is None, got.error
    assert not all(c.exact for c in got.caches)  # the case this test is for
    mine = plan_kv(layout, ctx, n_seq, n_ubatch=256)
    assert _mismatches(mine.caches, got.caches) == []
    # A figure that prints as llama.cpp's to 0.01 MiB, at these sizes, is the byte count
    # up to the log's rounding: the largest logged module is what the analytic plan says.
    inexact = [c for c in got.caches if not c.exact]
    assert max(c.bytes for c in inexact) >= _MIB


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
