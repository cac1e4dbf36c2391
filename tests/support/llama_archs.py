"""Small random-weight GGUFs of every architecture llama.cpp supports, made in the session.

llama.cpp's own ``test-llama-archs -s SEED -o DIR`` (benchmarks/build/bin, built by
``make native``) writes one file per architecture, dense and MoE variants: a few MB each,
0.9 GB and 5 s for all of them. The binary is a prerequisite: without it the tests that
need these files fail (they are never skipped).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

__all__ = ["ARCHS_SEED", "TEST_LLAMA_ARCHS", "arch_models"]

REPO = Path(__file__).resolve().parents[2]
TEST_LLAMA_ARCHS = REPO / "benchmarks" / "build" / "bin" / "test-llama-archs"
ARCHS_SEED = 42


def arch_models(factory: pytest.TempPathFactory) -> Path:
    """The directory of test-llama-archs' files, written once per test session."""
    out = factory.getbasetemp() / "llama-archs"
    if out.is_dir() and any(out.glob("*.gguf")):
        return out
    assert TEST_LLAMA_ARCHS.is_file(), (
        f"{TEST_LLAMA_ARCHS} is missing: build llama.cpp's native tools with `make native`"
    )
    out.mkdir(exist_ok=True)
    proc = subprocess.run(
        [str(TEST_LLAMA_ARCHS), "-s", str(ARCHS_SEED), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(out.glob("*.gguf"))) > 100, "test-llama-archs wrote too few files"
    return out
