"""The system packages: one list (.ci/prerequisites.sh) that the README names, make checks
and CI installs; a missing one is one line with the command that installs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / ".ci" / "prerequisites.sh"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash") or "/bin/bash"
    return subprocess.run(
        [bash, str(SCRIPT), *args], capture_output=True, text=True, env=env, check=False
    )


def test_the_readme_names_exactly_the_list() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    named = re.search(r"apt-get install -y ([a-z0-9 .+-]+?)\s+#", readme)
    assert named, "README.md's set-up has no apt-get install line"
    assert named[1].split() == _run("list", "test").stdout.split()
    assert set(_run("list", "setup").stdout.split()) < set(named[1].split())


def test_ci_and_make_use_the_same_list() -> None:
    assert ".ci/prerequisites.sh missing test" in (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert ".ci/prerequisites.sh check test" in makefile
    assert ".ci/prerequisites.sh check setup" in makefile


def test_a_missing_package_is_one_line_with_the_command(tmp_path: Path) -> None:
    # A PATH with bash and id but no compiler or make: build-essential is missing.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "id"):
        found = shutil.which(tool)
        assert found
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "PYTHON": sys.executable, "HOME": os.environ.get("HOME", "/")}
    result = _run("check", "setup", env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "missing here: build-essential;" in lines[0]
    assert re.search(r"install them: (sudo )?apt-get install -y build-essential$", lines[0])
    assert _run("missing", "setup", env=env).stdout.split() == ["build-essential"]


def test_an_unknown_scope_is_refused() -> None:
    result = _run("check", "everything")
    assert result.returncode == 2 and "use setup or test" in result.stderr
