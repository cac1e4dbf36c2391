"""``localllm pull`` against a local fake hub that serves the real SmolLM2 file.

The fake hub (tests/hub_server.py) speaks the HTTP huggingface-hub uses; the CLI runs
in a subprocess with HF_ENDPOINT pointing at it, so huggingface-hub reads the endpoint
at import exactly as it does for a user.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, SMOLLM2_SHA256, CliResult, installed_within_the_pin
from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE
from support.gguf_files import DROP, write_gguf
from support.hub_server import GOOD_TOKEN, FakeHub

from localllm.fileio import sha256_file
from localllm.gguf.spec import read_model_spec
from localllm.store.hub import quant_of
from localllm.store.model_store import ModelStore

SMOL_REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "smollm2-135m-instruct.Q4_1.gguf"
SMOL_REF = f"{SMOL_REPO}:Q4_1"
# http_get hands the file over in chunks of DOWNLOAD_CHUNK_SIZE; a cut connection loses
# the chunk it was filling, so a resume starts at a multiple of it.


@pytest.fixture
def fake_hub(
    isolated_paths: Path, smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeHub]:
    synth = tmp_path / "synthetic"
    synth.mkdir()
    hub = FakeHub()
    hub.add_repo(
        SMOL_REPO,
        {
            SMOL_FILE: smollm2_path,
            "smollm2-135m-instruct.Q8_0.gguf": write_gguf(synth / "q8.gguf", "mha-tiny"),
        },
    )
    hub.add_repo("test-org/Gated-GGUF", {SMOL_FILE: smollm2_path}, gated=True)
    hub.add_repo(
        "test-org/Multi-GGUF",
        {
            "a.Q4_K_M.gguf": write_gguf(synth / "a.gguf", "mha-tiny"),
            "b.Q4_K_M.gguf": write_gguf(synth / "b.gguf", "mqa-1b"),
        },
    )
    huge = write_gguf(synth / "huge.gguf", "llama-2-70b")
    hub.add_repo(
        "test-org/Huge-GGUF", {"huge.Q4_0.gguf": huge}, reported_sizes={"huge.Q4_0.gguf": 1 << 60}
    )
    # Catalog repos: one file the catalog has no sha256 for, one whose sha256 differs.
    hub.add_repo(
        "TheBloke/Mistral-7B-Instruct-v0.1-GGUF",
        {"mistral-7b-instruct-v0.1.Q4_K_M.gguf": write_gguf(synth / "m.gguf", "mistral-7b-v0.1")},
    )
    hub.add_repo(
        "TheBloke/Llama-2-7B-Chat-GGUF",
        {"llama-2-7b-chat.Q4_K_M.gguf": write_gguf(synth / "l.gguf", "llama-2-7b")},
    )
    hub.start()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    yield hub
    hub.stop()


def store_files(home: Path) -> list[str]:
    return sorted(p.name for p in home.glob("*.gguf")) if home.is_dir() else []


def partials(home: Path) -> list[Path]:
    return sorted((home / ".tmp").glob("*.part")) if (home / ".tmp").is_dir() else []


# ----------------------------------------------------------------------------- pulls


def test_full_pull_verifies_records_and_resolves(cli, fake_hub: FakeHub, isolated_paths: Path):
    result = cli("pull", f"{SMOL_REPO}:q4_1")  # the quant matches case-insensitively
    assert result.exit_code == 0, result.stderr
    assert "verified and stored" in result.stderr
    assert store_files(isolated_paths) == [SMOL_FILE]
    assert sha256_file(isolated_paths / SMOL_FILE) == SMOLLM2_SHA256
    assert partials(isolated_paths) == []

    stored = ModelStore(isolated_paths).find(SMOL_REPO, "Q4_1")
    assert [m.filename for m in stored] == [SMOL_FILE]
    assert stored[0].sha256 == SMOLLM2_SHA256
    from localllm.store.resolver import resolve_model

    resolved = resolve_model(SMOL_REF, ModelStore(isolated_paths))
    assert resolved.present and resolved.path == isolated_paths / SMOL_FILE

    # Once stored, pulling again needs no network at all.
    fake_hub.requests.clear()
    again = cli("pull", SMOL_REF)
    assert again.exit_code == 0, again.stderr
    assert "already in the store" in again.stderr
    assert fake_hub.requests == []


def test_pull_exact_hub_file(cli, fake_hub: FakeHub, isolated_paths: Path):
    result = cli("pull", f"hf://{SMOL_REPO}/{SMOL_FILE}")
    assert result.exit_code == 0, result.stderr
    assert sha256_file(isolated_paths / SMOL_FILE) == SMOLLM2_SHA256


def test_pull_catalog_alias_records_alias(cli, fake_hub: FakeHub, isolated_paths: Path):
    result = cli("pull", "mistral-7b-instruct-v0.1:Q4_K_M")
    assert result.exit_code == 0, result.stderr
    listed = json.loads(cli("list", "--json").stdout)
    assert [(r["alias"], r["quant"], r["file"]) for r in listed] == [
        ("mistral-7b-instruct-v0.1", "Q4_K_M", "mistral-7b-instruct-v0.1.Q4_K_M.gguf")
    ]


def test_catalog_sha_disagreeing_with_hub_is_refused(cli, fake_hub: FakeHub, isolated_paths):
    result = cli("pull", "llama-2-7b-chat:Q4_K_M")
    assert result.exit_code == 1
    assert "the catalog expects" in result.error_line
    assert fake_hub.cdn_gets() == []
    assert store_files(isolated_paths) == []


def test_dropped_connection_resumes_with_a_range_request(cli, fake_hub: FakeHub, isolated_paths):
    size = fake_hub.repos[SMOL_REPO.lower()].files[SMOL_FILE].size
    fake_hub.drop_after = size // 2
    result = cli("pull", SMOL_REF)
    assert result.exit_code == 0, result.stderr
    gets = fake_hub.cdn_gets()
    kept = (size // 2) // DOWNLOAD_CHUNK_SIZE * DOWNLOAD_CHUNK_SIZE
    assert [g.range for g in gets] == [None, f"bytes={kept}-"]
    assert sha256_file(isolated_paths / SMOL_FILE) == SMOLLM2_SHA256
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # the status line only


def test_ctrl_c_keeps_the_partial_and_the_next_pull_resumes(fake_hub: FakeHub, isolated_paths):
    size = fake_hub.repos[SMOL_REPO.lower()].files[SMOL_FILE].size
    fake_hub.stall_after = size // 2
    kept = (size // 2) // DOWNLOAD_CHUNK_SIZE * DOWNLOAD_CHUNK_SIZE
    proc = subprocess.Popen(
        [sys.executable, "-m", "localllm", "pull", SMOL_REF],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        # A long read timeout: on a loaded machine the stall must outlast the SIGINT,
        # or http_get would time out and resume on its own before we interrupt it.
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "300"},
    )
    try:
        assert fake_hub.stalled.wait(60), "the download never reached the stall point"
        deadline = time.monotonic() + 60
        while not (partials(isolated_paths) and partials(isolated_paths)[0].stat().st_size >= kept):
            assert time.monotonic() < deadline, "the partial file never grew"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        fake_hub.release.set()
    assert proc.returncode == 130, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"`localllm pull {SMOL_REF}` again resumes" in lines[0], stderr
    assert store_files(isolated_paths) == []  # nothing partial in the store proper
    [part] = partials(isolated_paths)
    assert part.stat().st_size == kept
    # .tmp/<file>.<sha256 prefix>.part: the name says which bytes it holds.
    name = re.fullmatch(rf"{re.escape(SMOL_FILE)}\.([0-9a-f]{{8,}})\.part", part.name)
    assert name is not None and SMOLLM2_SHA256.startswith(name[1]), part.name

    fake_hub.requests.clear()
    resumed = run(["pull", SMOL_REF])
    assert resumed.exit_code == 0, resumed.stderr
    assert [g.range for g in fake_hub.cdn_gets()] == [f"bytes={kept}-"]
    assert "resumed at" in resumed.stderr
    assert sha256_file(isolated_paths / SMOL_FILE) == SMOLLM2_SHA256
    assert partials(isolated_paths) == []


def run(args: list[str], **env: str) -> CliResult:
    proc = subprocess.run(
        [sys.executable, "-m", "localllm", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **env},
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def test_a_second_pull_of_the_same_file_is_refused_while_the_first_runs(
    fake_hub: FakeHub, isolated_paths: Path
):
    size = fake_hub.repos[SMOL_REPO.lower()].files[SMOL_FILE].size
    fake_hub.stall_after = size // 2
    first = subprocess.Popen(
        [sys.executable, "-m", "localllm", "pull", SMOL_REF],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "300"},
    )  # fmt: skip
    try:
        assert fake_hub.stalled.wait(60), "the first download never reached the stall point"
        kept = (size // 2) // DOWNLOAD_CHUNK_SIZE * DOWNLOAD_CHUNK_SIZE  # whole chunks written
        deadline = time.monotonic() + 60
        while not (partials(isolated_paths) and partials(isolated_paths)[0].stat().st_size >= kept):
            assert time.monotonic() < deadline, "the partial file never grew"
            time.sleep(0.05)
        [part] = partials(isolated_paths)
        second = run(["pull", SMOL_REF])
        part_after = part.stat().st_size if part.is_file() else 0
    finally:
        fake_hub.release.set()
        _, stderr = first.communicate(timeout=120)
    assert second.exit_code == 1
    assert f"another `localllm pull` is downloading {SMOL_FILE} right now" in second.error_line
    assert part_after == kept > 0  # the refused pull left the partial file alone
    # The first one goes on (its dropped connection resumes) and stores the verified file.
    assert first.returncode == 0, stderr
    assert sha256_file(isolated_paths / SMOL_FILE) == SMOLLM2_SHA256
    assert partials(isolated_paths) == []


def test_disk_full_at_the_first_byte_is_one_line(cli, fake_hub: FakeHub, isolated_paths: Path):
    """The kernel's own ENOSPC: the partial file is /dev/full (portable, no privileges)."""
    tmp = isolated_paths / ".tmp"
    tmp.mkdir(parents=True)
    part = tmp / f"{SMOL_FILE}.{SMOLLM2_SHA256[:16]}.part"
    part.symlink_to("/dev/full")
    result = cli("pull", SMOL_REF)
    assert result.exit_code == 1
    line = result.error_line
    assert f"disk full while downloading {SMOL_FILE}" in line
    assert f"`localllm pull {SMOL_REF}` again resumes" in line
    assert fake_hub.cdn_gets() != []  # it failed while downloading, not before
    assert store_files(isolated_paths) == []
    assert not part.exists() and not part.is_symlink()  # nothing kept: nothing left


# Runs inside a user + mount namespace: a tmpfs store of a given size that fills up.
_DISK_FULL_DRIVER = """
import hashlib, json, os, subprocess, sys, time
home, size, ref = sys.argv[1], sys.argv[2], sys.argv[3]
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", home], check=True)
def say(**kw):
    print(json.dumps(kw), flush=True)
def state():
    tmp = os.path.join(home, ".tmp")
    parts = sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []
    sizes = [os.path.getsize(os.path.join(tmp, p)) for p in parts]
    stored = sorted(f for f in os.listdir(home) if f.endswith(".gguf"))
    return {"parts": parts, "part_sizes": sizes, "stored": stored}
pull = [sys.executable, "-m", "localllm", "pull", ref]
proc = subprocess.Popen(pull, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
say(mounted=True)
wait_for = int(sys.stdin.readline())  # fill the disk once the partial holds this much
while sum(state()["part_sizes"]) < wait_for:
    time.sleep(0.05)
filler = os.path.join(home, "filler")
with open(filler, "wb", buffering=0) as fh:
    try:
        while True:
            fh.write(bytes(1 << 16))
    except OSError as exc:
        say(filled=exc.errno)
_, err = proc.communicate()
say(rc=proc.returncode, stderr=err, **state())
sys.stdin.readline()  # free the space and pull again
os.remove(filler)
again = subprocess.run(pull, capture_output=True, text=True)
digest = None
if os.path.isfile(os.path.join(home, sys.argv[4])):
    with open(os.path.join(home, sys.argv[4]), "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
say(rc=again.returncode, stderr=again.stderr, sha256=digest, **state())
"""


def test_disk_full_mid_download_keeps_what_it_has_and_resumes(
    fake_hub: FakeHub, isolated_paths: Path, tmp_path: Path
):
    """A real full disk: the store is a tmpfs (in a user and mount namespace, as
    `unshare -rm`) that a filler file fills while the download is half way."""
    unshare = shutil.which("unshare")
    assert unshare, "this test needs util-linux's unshare (a tmpfs in a mount namespace)"
    probe = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "true"],
                           capture_output=True, text=True)  # fmt: skip
    assert probe.returncode == 0, f"user namespaces are off here: {probe.stderr.strip()}"
    size = fake_hub.repos[SMOL_REPO.lower()].files[SMOL_FILE].size
    fake_hub.stall_after = size // 2
    isolated_paths.mkdir(parents=True)
    driver = tmp_path / "disk_full_driver.py"
    driver.write_text(_DISK_FULL_DRIVER)
    room = size + (16 << 20)  # passes the free-space check before the first byte
    proc = subprocess.Popen(
        [unshare, "--user", "--map-root-user", "--mount", sys.executable, str(driver),
         str(isolated_paths), str(room), SMOL_REF, SMOL_FILE],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=REPO, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1",
                       "HF_HUB_DOWNLOAD_TIMEOUT": "300"},
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None

    def reply() -> dict:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.poll() is not None else "driver said nothing"
        return json.loads(line)

    try:
        assert reply() == {"mounted": True}
        assert fake_hub.stalled.wait(60), "the download never reached the stall point"
        whole_chunks = (size // 2) // DOWNLOAD_CHUNK_SIZE * DOWNLOAD_CHUNK_SIZE
        proc.stdin.write(f"{whole_chunks}\n")
        proc.stdin.flush()
        assert reply() == {"filled": 28}  # ENOSPC
        fake_hub.release.set()  # the connection drops; http_get resumes into a full disk
        full = reply()
        fake_hub.requests.clear()
        proc.stdin.write("free\n")
        proc.stdin.flush()
        again = reply()
    finally:
        fake_hub.release.set()
        proc.kill()
        proc.wait(30)
    lines = [ln for ln in full["stderr"].splitlines() if ln.strip()]
    assert full["rc"] == 1 and len(lines) == 1, full["stderr"]
    assert lines[0].startswith(f"error: disk full while downloading {SMOL_FILE}")
    assert f"`localllm pull {SMOL_REF}` again resumes" in lines[0]
    assert full["stored"] == []
    [kept] = full["part_sizes"]
    assert whole_chunks <= kept < size  # what arrived before the disk filled is kept
    # With room again, the same command resumes from the kept bytes and verifies.
    assert again["rc"] == 0, again["stderr"]
    assert [g.range for g in fake_hub.cdn_gets()] == [f"bytes={kept}-"]
    assert "resumed at" in again["stderr"]
    assert again["sha256"] == SMOLLM2_SHA256
    assert (again["stored"], again["parts"]) == ([SMOL_FILE], [])


def test_corrupted_byte_is_caught_and_discarded(cli, fake_hub: FakeHub, isolated_paths: Path):
    size = fake_hub.repos[SMOL_REPO.lower()].files[SMOL_FILE].size
    fake_hub.corrupt_offset = size // 3
    result = cli("pull", SMOL_REF)
    assert result.exit_code == 1
    line = result.error_line
    assert "sha256" in line and "discarded" in line
    assert store_files(isolated_paths) == []
    assert partials(isolated_paths) == []


# ----------------------------------------------------------------------------- errors


def test_unknown_repo_is_one_line(cli, fake_hub: FakeHub):
    result = cli("pull", "test-org/No-Such-GGUF:Q4_1")
    assert result.exit_code == 1
    line = result.error_line
    assert "test-org/No-Such-GGUF not found" in line


def test_unknown_file_is_one_line(cli, fake_hub: FakeHub):
    result = cli("pull", f"hf://{SMOL_REPO}/missing.Q4_1.gguf")
    assert result.exit_code == 1
    line = result.error_line
    assert "has no file missing.Q4_1.gguf" in line and "--list" in line


def test_gated_repo_without_token_says_how_to_set_it(cli, fake_hub: FakeHub, isolated_paths):
    result = cli("pull", "test-org/Gated-GGUF:Q4_1")
    assert result.exit_code == 1
    line = result.error_line
    assert "gated" in line and "HF_TOKEN" in line
    assert fake_hub.cdn_gets() == []


def test_gated_repo_with_a_token(fake_hub: FakeHub, isolated_paths: Path):
    result = run(["pull", "test-org/Gated-GGUF:Q4_1"], HF_TOKEN=GOOD_TOKEN)
    assert result.exit_code == 0, result.stderr
    assert sha256_file(isolated_paths / SMOL_FILE) == SMOLLM2_SHA256
    hub_calls = [r for r in fake_hub.requests if r.server == "hub"]
    assert hub_calls and all(r.authorization == f"Bearer {GOOD_TOKEN}" for r in hub_calls)
    assert all(r.authorization is None for r in fake_hub.cdn_gets())  # never sent off the hub


def test_wrong_token_on_gated_repo(fake_hub: FakeHub):
    result = run(["pull", "test-org/Gated-GGUF:Q4_1"], HF_TOKEN="hf_not_allowed")
    assert result.exit_code == 1
    assert "no access" in result.error_line


def test_no_network_is_one_line(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run(["pull", SMOL_REF], HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert result.exit_code == 1
    assert "cannot reach the hub" in result.error_line


def test_offline_mode_with_the_file_absent(fake_hub: FakeHub):
    result = run(["pull", SMOL_REF], HF_HUB_OFFLINE="1")
    assert result.exit_code == 1
    assert "HF_HUB_OFFLINE" in result.error_line
    assert fake_hub.requests == []


def test_offline_mode_with_the_file_stored(cli, fake_hub: FakeHub):
    assert cli("pull", SMOL_REF).exit_code == 0
    result = run(["pull", SMOL_REF], HF_HUB_OFFLINE="1")
    assert result.exit_code == 0, result.stderr
    assert "already in the store" in result.stderr


def test_disk_space_is_checked_before_downloading(cli, fake_hub: FakeHub, isolated_paths):
    result = cli("pull", "test-org/Huge-GGUF:Q4_0")
    assert result.exit_code == 1
    assert "not enough disk space" in result.error_line
    assert fake_hub.cdn_gets() == []
    assert store_files(isolated_paths) == [] and partials(isolated_paths) == []


def test_unknown_quant_lists_what_is_there(cli, fake_hub: FakeHub):
    result = cli("pull", f"{SMOL_REPO}:Q5_K_M")
    assert result.exit_code == 1
    line = result.error_line
    assert "no GGUF file for quant Q5_K_M" in line and "Q4_1" in line and "Q8_0" in line


def test_ambiguous_quant_lists_the_files(cli, fake_hub: FakeHub):
    result = cli("pull", "test-org/Multi-GGUF:q4_k_m")
    assert result.exit_code == 2
    line = result.error_line
    assert "a.Q4_K_M.gguf" in line and "b.Q4_K_M.gguf" in line


# --------------------------------------------------------------------- --list, preview


def test_list_table(cli, fake_hub: FakeHub, smollm2_path: Path):
    result = cli("pull", SMOL_REPO, "--list")
    assert result.exit_code == 0, result.stderr
    rows = {ln.split()[0]: ln for ln in result.stdout.splitlines()[2:] if ln.strip()}
    assert set(rows) == {"Q4_1", "Q8_0"}  # README.md is not a model
    from localllm.text import format_bytes

    assert format_bytes(smollm2_path.stat().st_size) in rows["Q4_1"]
    assert SMOL_FILE in rows["Q4_1"]
    listing = json.loads(cli("pull", SMOL_REPO, "--list", "--json").stdout)
    sizes = {f["path"]: f["size_bytes"] for f in listing["files"]}
    assert sizes[SMOL_FILE] == smollm2_path.stat().st_size
    assert {f["path"]: f["sha256"] for f in listing["files"]}[SMOL_FILE] == SMOLLM2_SHA256


def test_info_on_a_hub_ref_reads_only_the_header(
    cli, fake_hub: FakeHub, smollm2_path, isolated_paths
):
    result = cli("info", SMOL_REF, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    local = read_model_spec(smollm2_path)
    for key in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "n_ctx_train", "vocab_size"):
        assert info[key] == getattr(local, key), key
    assert info["weights_bytes"] == local.weights_bytes
    assert info["file_bytes"] == smollm2_path.stat().st_size
    assert info["source"] == "hub header"
    served = sum(fake_hub.bytes_served.values())
    assert 0 < served <= 4 << 20 and served * 20 < smollm2_path.stat().st_size
    assert all(g.range is not None for g in fake_hub.cdn_gets())
    assert store_files(isolated_paths) == [] and partials(isolated_paths) == []


def _doubling_ranges(header_end: int, file_size: int) -> list[str]:
    """The README's preview: the first 1 MiB, then twice as much (never past the end of the
    file) until the header is in."""
    ranges, have, want = [], 0, 1 << 20
    while True:
        stop = min(want, file_size)
        ranges.append(f"bytes={have}-{stop - 1}")
        have = stop
        if have >= header_end:
            return ranges
        want *= 2


def test_preview_reads_1_mib_then_doubles(
    cli, fake_hub: FakeHub, smollm2_path: Path, tmp_path: Path
):
    import gguf

    # SmolLM2's header (its 49k-token vocabulary) ends between 1 and 2 MiB.
    header_end = gguf.GGUFReader(smollm2_path).data_offset
    assert 1 << 20 < header_end <= 2 << 20
    assert cli("info", SMOL_REF, "--json").exit_code == 0
    expected = _doubling_ranges(header_end, smollm2_path.stat().st_size)
    assert [g.range for g in fake_hub.cdn_gets()] == expected
    assert expected == ["bytes=0-1048575", "bytes=1048576-2097151"]

    # A header past 4 MiB: four requests (1, 2, 4 MiB, then up to 8 MiB or the file's end).
    tokens = [f"token-{i:07d}-padding-to-forty-bytes" for i in range(120_000)]
    big = write_gguf(tmp_path / "big.gguf", "mha-tiny", overrides={"llama.vocab_size": DROP},
                     tokens=tokens)  # fmt: skip
    header_end = gguf.GGUFReader(big).data_offset
    assert 4 << 20 < header_end <= 8 << 20
    fake_hub.add_repo("test-org/BigVocab-GGUF", {"big.Q4_0.gguf": big})
    fake_hub.requests.clear()
    info = cli("info", "test-org/BigVocab-GGUF:Q4_0", "--json")
    assert info.exit_code == 0, info.stderr
    assert json.loads(info.stdout)["vocab_size"] == 120_000
    expected = _doubling_ranges(header_end, big.stat().st_size)
    assert [g.range for g in fake_hub.cdn_gets()] == expected
    assert len(expected) == 4


def test_kv_calc_on_a_hub_ref_matches_the_local_file(cli, fake_hub: FakeHub, smollm2_path):
    remote = cli("kv-calc", SMOL_REF, "--ctx", "2048", "--json")
    assert remote.exit_code == 0, remote.stderr
    local = cli("kv-calc", str(smollm2_path), "--ctx", "2048", "--json")
    assert local.exit_code == 0, local.stderr
    remote_data, local_data = json.loads(remote.stdout), json.loads(local.stdout)
    for key in ("per_token_bytes", "weights_bytes", "rows", "architecture"):
        assert remote_data[key] == local_data[key], key
    assert sum(fake_hub.bytes_served.values()) * 20 < smollm2_path.stat().st_size


def test_bench_synthetic_on_a_hub_ref_downloads_only_the_header(
    cli, fake_hub: FakeHub, smollm2_path: Path, isolated_paths: Path
):
    # Issue 15's "done when", on a file this session can serve: speed here, no download.
    import gguf

    result = cli("bench", SMOL_REF, "--synthetic", "-p", "16", "-n", "4", "-r", "1", "-o", "json")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [(r["n_prompt"], r["n_gen"]) for r in records] == [(16, 0), (0, 4)]
    assert all(r["avg_ts"] > 0 and r["synthetic"] for r in records)
    assert all(r["synthetic_source"] == SMOL_REF for r in records)
    # The stand-in had the hub file's tensor table: llama.cpp's model size is its tensors'.
    real_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(smollm2_path).tensors)
    assert all(r["model_size"] == real_bytes for r in records)
    # Only the header came over the wire (ranged reads), nothing was stored or left behind.
    served = sum(fake_hub.bytes_served.values())
    assert 0 < served <= 4 << 20 and served * 20 < smollm2_path.stat().st_size
    assert all(g.range is not None for g in fake_hub.cdn_gets())
    assert store_files(isolated_paths) == [] and partials(isolated_paths) == []
    leftovers = (isolated_paths / ".tmp").glob("localllm-synthetic-*")
    assert list(leftovers) == []


def test_info_on_a_gated_hub_ref_is_one_line(cli, fake_hub: FakeHub):
    result = cli("info", "test-org/Gated-GGUF:Q4_1")
    assert result.exit_code == 1
    assert "HF_TOKEN" in result.error_line


# ------------------------------------------------------------------------------ units


def test_huggingface_hub_is_the_pinned_version():
    """These tests assert huggingface-hub 2.4's http_get Range requests exactly."""
    installed_within_the_pin("huggingface-hub")


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("llama-2-13b-chat.Q4_K_M.gguf", "Q4_K_M"),
        ("mistral-7b-instruct-v0.2.Q5_K_M.gguf", "Q5_K_M"),
        ("Meta-Llama-3-8B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
        ("Meta-Llama-3-8B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
        ("qwen2-0_5b-instruct-q8_0.gguf", "Q8_0"),
        ("model-f16.gguf", "F16"),
        ("sub/dir/tinyllama.Q4_0.gguf", "Q4_0"),
        ("README.gguf", None),
    ],
)
def test_quant_of_file_names(name: str, quant: str | None):
    assert quant_of(name) == quant
