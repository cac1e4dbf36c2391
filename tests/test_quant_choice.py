"""Which file to download (#28): ``kv-calc ORG/REPO`` and ``pull ORG/REPO`` without a quant.

Against the local stand-in hub (support/hub_server.py): repos of header-only GGUFs at the
shapes of a small Llama (sparse files, every tensor in the table), planned by llama.cpp's
own dry run from headers read over HTTP range requests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
from support.gguf_files import add_kv, write_header_gguf
from support.header_models import HeaderModel, llama_header
from support.hub_server import FakeHub

from localllm.fileio import sha256_file
from localllm.plan.quant_choice import is_k_quant
from localllm.store.hub import HubFile, RepoListing, imatrix_name, quant_of, repo_models, split_part

# A small Llama whose rows fill whole 256-wide quant blocks: Q4_K is ~60 MiB, Q8_0 ~110 MiB.
TINY = llama_header("tiny", n_layer=4, n_embd=1024, n_head=16, n_head_kv=4, n_ff=2816,
                    n_ctx=2048)  # fmt: skip
TWO = "test-org/Two-GGUF"
SPLIT = "test-org/Split-GGUF"
MIXED = "test-org/Mixed-GGUF"
HEADER_LIMIT = 12 << 20  # the bound on what one file may cost to look at
F32 = gguf.GGMLQuantizationType.F32


def write_split(folder: Path, stem: str, model: HeaderModel, parts: int, weight_type: str):
    """A split GGUF as llama.cpp's gguf-split writes it: NAME-0000i-of-0000N.gguf, the
    keys in the first part, ``split.*`` in each, the tensors shared out; sparse on disk."""
    qtype = gguf.GGMLQuantizationType[weight_type]
    tensors = list(model.tensors)
    per = -(-len(tensors) // parts)
    paths = []
    for i in range(parts):
        path = folder / f"{stem}-{i + 1:05d}-of-{parts:05d}.gguf"
        writer = gguf.GGUFWriter(str(path), model.arch)
        if i == 0:
            for key, value in model.kv.items():
                add_kv(writer, key, value)
        writer.add_uint16("split.no", i)
        writer.add_uint16("split.count", parts)
        writer.add_int32("split.tensors.count", len(tensors))
        data = 0
        for name, shape in tensors[i * per : (i + 1) * per]:
            # Whole-block rows take the weight type, vectors stay f32 (as write_header_gguf).
            block, _ = gguf.GGML_QUANT_SIZES[qtype]
            ttype = qtype if len(shape) >= 2 and shape[0] % block == 0 else F32
            block, type_size = gguf.GGML_QUANT_SIZES[ttype]
            nbytes = int(np.prod(shape)) // block * type_size
            writer.add_tensor_info(name, tuple(reversed(shape)), np.float32, nbytes, ttype)
            data += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        end = writer.fout[0].tell()
        writer.close()
        os.truncate(path, gguf.GGUFWriter.ggml_pad(end, writer.data_alignment) + data)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant-repos")
    imatrix = {"quantize.imatrix.file": "imatrix.dat", "quantize.imatrix.entries_count": 28}
    files = {
        "q4_k": write_header_gguf(root / "q4_k.gguf", TINY, weight_type="Q4_K"),
        "q8_0": write_header_gguf(root / "q8_0.gguf", TINY, weight_type="Q8_0"),
        # Q4_0 weighs what Q4_K does (4.5 bits a weight); a long description makes its file
        # the largest of the three by a few KiB: a tie the K-quant must win.
        "q4_0": write_header_gguf(
            root / "q4_0.gguf",
            TINY,
            weight_type="Q4_0",
            overrides={"general.description": "x" * 8192},
        ),
        "f16": write_header_gguf(root / "f16.gguf", TINY, weight_type="F16"),
        "i1": write_header_gguf(root / "i1.gguf", TINY, weight_type="Q4_K", overrides=imatrix),
    }
    for i, path in enumerate(write_split(root, "tiny-Q8_0", TINY, 3, "Q8_0"), start=1):
        files[f"split{i}"] = path
    return files


@pytest.fixture
def hub(repo_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add_repo(TWO, {"tiny.Q4_K_M.gguf": repo_files["q4_k"],
                        "tiny.Q8_0.gguf": repo_files["q8_0"]})  # fmt: skip
    fake.add_repo(SPLIT, {
        "tiny-Q4_K_M.gguf": repo_files["q4_k"],
        **{f"Q8_0/tiny-Q8_0-0000{i}-of-00003.gguf": repo_files[f"split{i}"] for i in (1, 2, 3)},
    })  # fmt: skip
    fake.add_repo(MIXED, {
        "Tiny-q4_0.gguf": repo_files["q4_0"],
        "tiny-Q4_K_M.gguf": repo_files["q4_k"],
        "Tiny.i1-Q4_K_m.gguf": repo_files["i1"],
        "tiny-F16.gguf": repo_files["f16"],
        "mmproj-tiny-f16.gguf": repo_files["f16"],
        "imatrix.gguf": repo_files["q4_0"],
    })  # fmt: skip
    two = {"tiny.Q4_K_M.gguf": repo_files["q4_k"], "tiny.Q8_0.gguf": repo_files["q8_0"]}
    fake.add_repo("test-org/Gated-GGUF", two, gated=True)
    fake.add_repo("test-org/Empty-GGUF", {})
    fake.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
    monkeypatch.setenv("LOCALLLM_AVAILABLE_MEMORY", "16GiB")
    yield fake
    fake.stop()


def choice_json(cli, repo: str, *args: str) -> dict:
    result = cli("kv-calc", repo, "--json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def stored(home: Path) -> list[str]:
    return sorted(p.name for p in home.glob("*.gguf")) if home.is_dir() else []


FIELDS = {"file", "quant", "file_bytes", "parts", "imatrix", "ctx", "weights_bytes", "kv_bytes",
          "compute_bytes", "total_bytes", "verdict", "max_ctx", "max_ctx_trained",
          "kv_per_token", "source", "error", "recommended"}  # fmt: skip


# ------------------------------------------------------------------ kv-calc ORG/REPO


def test_two_quants_planned_from_headers_alone(cli, hub: FakeHub, repo_files, isolated_paths):
    data = choice_json(cli, TWO)
    rows = data["files"]
    assert [r["file"] for r in rows] == ["tiny.Q4_K_M.gguf", "tiny.Q8_0.gguf"]  # by size
    assert all(set(r) == FIELDS for r in rows)
    assert [r["quant"] for r in rows] == ["Q4_K_M", "Q8_0"]
    sizes = [repo_files["q4_k"].stat().st_size, repo_files["q8_0"].stat().st_size]
    assert [r["file_bytes"] for r in rows] == sizes
    assert all(r["verdict"] == "fits" and r["source"] == "llama.cpp dry run" for r in rows)
    assert all(r["ctx"] == 2048 for r in rows)  # 4096 past the trained 2048: the trained
    assert data["recommended"] == "tiny.Q8_0.gguf" and rows[1]["recommended"]
    assert "largest of 2 files that fits" in data["reason"]
    # Each row is what kv-calc of that one file says, and its max ctx what --budget solves.
    for row, quant in zip(rows, ("Q4_K_M", "Q8_0"), strict=True):
        one = choice_json(cli, f"{TWO}:{quant}", "--ctx", "2048")["rows"][0]
        assert (row["total_bytes"], row["kv_bytes"], row["compute_bytes"], row["weights_bytes"]
                ) == (one["total_bytes"], one["kv_bytes"], one["compute_bytes"],
                      one["weights_bytes"])  # fmt: skip
        assert row["kv_per_token"] == one["bytes_per_token"] == 4 * 2 * 256 * 2  # 4 layers
        assert row["max_ctx"] == 2048 and row["max_ctx_trained"]
    # Headers only: a few ranged reads per file, far under 12 MB; nothing stored.
    assert set(hub.bytes_served) == {sha256_file(repo_files["q4_k"]),
                                     sha256_file(repo_files["q8_0"])}  # fmt: skip
    assert all(0 < n <= min(HEADER_LIMIT, s // 20)
               for n, s in zip(hub.bytes_served.values(), sizes, strict=True))  # fmt: skip
    assert all(g.range is not None for g in hub.cdn_gets())
    assert stored(isolated_paths) == [] and not (isolated_paths / ".tmp").exists()


def test_table_marks_and_names_the_recommendation(cli, hub: FakeHub):
    result = cli("kv-calc", TWO, "--ctx", "1024")
    assert result.exit_code == 0, result.stderr
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    marked = [ln for ln in lines if ln.lstrip().startswith("→")]
    assert len(marked) == 1 and "Q8_0" in marked[0] and "tiny.Q8_0.gguf" in marked[0]
    assert lines[-1].startswith("recommended: tiny.Q8_0.gguf (at 1024 tokens it needs")
    assert "2 headers read" in result.stderr


def test_little_memory_every_row_too_big(cli, hub: FakeHub, monkeypatch):
    monkeypatch.setenv("LOCALLLM_AVAILABLE_MEMORY", "64MiB")
    data = choice_json(cli, TWO)
    assert [r["verdict"] for r in data["files"]] == ["too big", "too big"]
    assert [r["max_ctx"] for r in data["files"]] == [0, 0]
    assert data["recommended"] is None
    assert data["reason"].startswith("none of the 2 files fits 2048 tokens in 64.00 MiB")
    text = cli("kv-calc", TWO)
    assert text.stdout.splitlines()[-1].startswith("recommended: none (none of the 2 files")
    # pull refuses in one line, naming how to pull one anyway.
    pulled = cli("pull", TWO)
    assert pulled.exit_code == 1
    assert f"pull one anyway by name: localllm pull {TWO}:Q4_K_M" in pulled.error_line
    assert hub.cdn_gets() and all(g.range is not None for g in hub.cdn_gets())


def test_a_longer_context_chooses_a_smaller_file(cli, hub: FakeHub, monkeypatch):
    rows = choice_json(cli, TWO, "--ctx", "2048")["files"]
    # Room for Q8_0 at 512 tokens but not at 2048; Q4_K_M fits at 2048.
    at_512 = choice_json(cli, TWO, "--ctx", "512")["files"]
    room = (at_512[1]["total_bytes"] + rows[1]["total_bytes"]) // 2
    monkeypatch.setenv("LOCALLLM_AVAILABLE_MEMORY", str(int(room / 0.85)))
    assert choice_json(cli, TWO, "--ctx", "512")["recommended"] == "tiny.Q8_0.gguf"
    long = choice_json(cli, TWO, "--ctx", "2048")
    assert long["recommended"] == "tiny.Q4_K_M.gguf"
    assert 512 <= long["files"][1]["max_ctx"] < 2048  # Q8_0: what fits, short of 2048


def test_a_progress_line_while_reading_on_a_terminal(hub: FakeHub):
    """stderr on a pseudo-terminal: the progress line says what is read, then goes."""
    import pty
    import subprocess
    import sys

    from conftest import REPO

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "localllm", "kv-calc", TWO], stdout=subprocess.PIPE,
        stderr=follower, cwd=REPO, env={**os.environ, "COLUMNS": "200", "TERM": "xterm"},
    )  # fmt: skip
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    stdout, _ = proc.communicate(timeout=120)
    os.close(leader)
    assert proc.returncode == 0
    # Rich redraws 10 times a second: the dry runs last long enough to be seen for sure.
    assert b"test-org/Two-GGUF: planning" in seen
    assert b"recommended: tiny.Q8_0.gguf" in stdout


def test_headers_are_cached_by_file_hash(cli, hub: FakeHub, repo_files, tmp_path):
    first = choice_json(cli, TWO)
    assert first["headers"]["read"] == 2 and first["headers"]["cached"] == 0
    assert first["headers"]["bytes_read"] == sum(hub.bytes_served.values())
    cache = tmp_path / "cache" / "localllm" / "hub-headers"
    names = {p.name for p in cache.iterdir()}
    assert names == {f"{sha256_file(repo_files[k])}.gguf.z" for k in ("q4_k", "q8_0")}
    hub.requests.clear()
    second = choice_json(cli, TWO, "--ctx", "1024")
    assert hub.cdn_gets() == []  # the listing is asked again, no header byte is read
    assert second["headers"] == {"read": 0, "cached": 2, "bytes_read": 0}
    assert [r["weights_bytes"] for r in second["files"]] == [
        r["weights_bytes"] for r in first["files"]
    ]
    # The same bytes under another repo's name: the cache is by hash, not by name.
    info = cli("info", f"{SPLIT}:Q4_K_M", "--json")
    assert info.exit_code == 0, info.stderr
    assert hub.cdn_gets() == []
    # A damaged cache entry is read again, not trusted.
    (cache / f"{sha256_file(repo_files['q8_0'])}.gguf.z").write_bytes(b"not zlib")
    third = choice_json(cli, TWO)
    assert third["headers"]["read"] == 1 and len(hub.cdn_gets()) >= 1


def test_a_kept_header_read_again_counts_as_used(cli, hub: FakeHub, repo_files, tmp_path):
    """The header folder is bounded least recently used first: a cache hit marks its file."""
    choice_json(cli, TWO)
    cache = tmp_path / "cache" / "localllm" / "hub-headers"
    q4 = cache / f"{sha256_file(repo_files['q4_k'])}.gguf.z"
    os.utime(q4, ns=(1, 1))
    assert choice_json(cli, TWO)["headers"]["cached"] == 2
    assert q4.stat().st_mtime_ns > 1


def test_kept_headers_stay_within_their_byte_budget(tmp_path: Path):
    from localllm.fileio import keep_newest

    for i, size in enumerate((300, 500, 400, 900)):  # oldest first
        (tmp_path / f"h{i}.gguf.z").write_bytes(b"x" * size)
        os.utime(tmp_path / f"h{i}.gguf.z", ns=(i + 1, i + 1))
    (tmp_path / "other.json").write_bytes(b"y" * 5000)  # another pattern: left alone
    keep_newest(tmp_path, 10, "*.gguf.z", max_bytes=1500)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h2.gguf.z", "h3.gguf.z", "other.json"]
    keep_newest(tmp_path, 10, "*.gguf.z", max_bytes=100)  # the newest stays, whatever it weighs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h3.gguf.z", "other.json"]


def test_split_gguf_is_one_model(cli, hub: FakeHub, repo_files, tmp_path):
    data = choice_json(cli, SPLIT)
    rows = data["files"]
    assert [(r["file"], r["quant"], r["parts"]) for r in rows] == [
        ("tiny-Q4_K_M.gguf", "Q4_K_M", 1),
        ("Q8_0/tiny-Q8_0-00001-of-00003.gguf", "Q8_0", 3),
    ]
    parts = [repo_files[f"split{i}"] for i in (1, 2, 3)]
    assert rows[1]["file_bytes"] == sum(p.stat().st_size for p in parts)
    # llama.cpp dry-ran the three parts together: the weights of all of them, as it says
    # for the same split on disk.
    local = choice_json(cli, str(parts[0]), "--ctx", "2048")
    assert rows[1]["source"] == "llama.cpp dry run"
    assert rows[1]["weights_bytes"] == local["weights_bytes"]
    assert rows[1]["total_bytes"] == local["rows"][0]["total_bytes"]
    assert rows[1]["weights_bytes"] > rows[0]["weights_bytes"] * 1.5
    assert data["recommended"] == "Q8_0/tiny-Q8_0-00001-of-00003.gguf"
    assert len(hub.bytes_served) == 4  # every part's header, and only headers
    assert all(n <= HEADER_LIMIT for n in hub.bytes_served.values())


def test_mixed_case_names_imatrix_variants_and_files_that_are_not_models(cli, hub: FakeHub):
    data = choice_json(cli, MIXED)
    rows = {r["file"]: r for r in data["files"]}
    assert set(rows) == {"Tiny-q4_0.gguf", "tiny-Q4_K_M.gguf", "Tiny.i1-Q4_K_m.gguf",
                         "tiny-F16.gguf"}  # fmt: skip
    assert [rows[f]["quant"] for f in ("Tiny-q4_0.gguf", "Tiny.i1-Q4_K_m.gguf")] == [
        "Q4_0", "Q4_K_M"
    ]  # fmt: skip
    assert [f for f, r in rows.items() if r["imatrix"]] == ["Tiny.i1-Q4_K_m.gguf"]
    assert all(r["verdict"] == "fits" for r in rows.values())
    # F16 fits but is left out for a quantized file; Q4_0 and both Q4_K_M are the same
    # size: the tie goes to a K-quant, then to the importance-matrix one.
    assert data["recommended"] == "Tiny.i1-Q4_K_m.gguf"
    assert "(a K-quant, within 5% of Q4_0 (Tiny-q4_0.gguf))" in data["reason"]
    assert "unquantized files are left" in data["reason"]
    assert sorted(data["skipped"]) == [
        "imatrix.gguf (an importance matrix, not a model)",
        "mmproj-tiny-f16.gguf (a vision projector, not a model)",
    ]


def test_pull_takes_the_recommended_file_and_says_why(
    cli, hub, repo_files, isolated_paths, monkeypatch
):
    rows = choice_json(cli, TWO)["files"]
    room = (rows[0]["total_bytes"] + rows[1]["total_bytes"]) // 2  # Q4_K_M fits, Q8_0 not
    monkeypatch.setenv("LOCALLLM_AVAILABLE_MEMORY", str(int(room / 0.85)))
    result = cli("pull", TWO)
    assert result.exit_code == 0, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("pulling Q4_K_M (tiny.Q4_K_M.gguf): at 2048 tokens it needs ")
    assert "available, the largest of 2 files that fits" in lines[0]
    assert "sha256 verified and stored" in lines[1] and len(lines) == 2
    assert stored(isolated_paths) == ["tiny.Q4_K_M.gguf"]
    assert sha256_file(isolated_paths / "tiny.Q4_K_M.gguf") == sha256_file(repo_files["q4_k"])
    listed = json.loads(cli("list", "--json").stdout)
    assert [(r["quant"], r["file"]) for r in listed] == [("Q4_K_M", "tiny.Q4_K_M.gguf")]


def test_pull_of_a_split_choice_stores_every_part(cli, hub, repo_files, isolated_paths):
    result = cli("pull", SPLIT, "--ctx", "1024")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("pulling Q8_0 (tiny-Q8_0-00001-of-00003.gguf): at 1024")
    names = [f"tiny-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert stored(isolated_paths) == names
    for i, name in enumerate(names, start=1):
        assert sha256_file(isolated_paths / name) == sha256_file(repo_files[f"split{i}"])


@pytest.mark.slow
def test_bench_synthetic_measures_several_quants_of_a_repo(cli, hub: FakeHub, isolated_paths):
    result = cli("bench", TWO, "--synthetic", "--quant", "Q4_K_M,q8_0", "-p", "16", "-n", "4",
                 "-r", "1", "-o", "json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [(r["model_filename"], r["n_prompt"], r["n_gen"]) for r in records] == [
        (f"{TWO}:Q4_K_M", 16, 0), (f"{TWO}:Q4_K_M", 0, 4),
        (f"{TWO}:Q8_0", 16, 0), (f"{TWO}:Q8_0", 0, 4),
    ]  # fmt: skip
    assert all(r["avg_ts"] > 0 and r["synthetic"] for r in records)
    q4, q8 = records[0]["model_size"], records[2]["model_size"]
    assert q8 > q4 * 1.5  # each stand-in has its own file's tensor table
    assert all(n <= HEADER_LIMIT for n in hub.bytes_served.values())  # headers only
    assert stored(isolated_paths) == [] and list((isolated_paths / ".tmp").glob("*")) == []
    csv = cli("bench", TWO, "--synthetic", "--quant", "Q4_K_M,Q8_0", "-p", "16", "-n", "0",
              "-r", "1", "-o", "csv")  # fmt: skip
    assert csv.exit_code == 0, csv.stderr
    lines = csv.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("build_commit")  # one header, two rows


def test_bench_quant_list_needs_a_repo_or_a_preset(cli, hub: FakeHub):
    result = cli("bench", f"{TWO}:Q8_0", "--synthetic", "--quant", "Q4_K_M,Q8_0")
    assert result.exit_code == 2
    assert "names one file already" in result.error_line
    assert hub.cdn_gets() == []


# ------------------------------------------------------------------------- errors


def test_repo_errors_are_one_line(cli, hub: FakeHub):
    gated = cli("kv-calc", "test-org/Gated-GGUF")
    assert gated.exit_code == 1 and "gated" in gated.error_line and "HF_TOKEN" in gated.error_line
    empty = cli("kv-calc", "test-org/Empty-GGUF")
    assert empty.exit_code == 1 and "has no .gguf files" in empty.error_line
    missing = cli("pull", "test-org/No-Such-GGUF")
    assert missing.exit_code == 1 and "not found" in missing.error_line


def test_no_network_is_one_line(cli, hub: FakeHub, monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    for args in (("kv-calc", TWO), ("pull", TWO)):
        result = cli(*args)
        assert result.exit_code == 1 and "cannot reach the hub" in result.error_line


def test_flags_that_do_not_apply_to_a_repo(cli, hub: FakeHub):
    for args in (("--budget", "1GiB"), ("--ctx", "512,1024"), ("--verify",)):
        result = cli("kv-calc", TWO, *args)
        assert result.exit_code == 2, (args, result.stderr)
        assert TWO in result.error_line and f"{TWO}:QUANT" in result.error_line
    pulled = cli("pull", f"{TWO}:Q8_0", "--ctx", "8192")
    assert pulled.exit_code == 2 and "--ctx 8192 chooses among a repo's files" in pulled.error_line
    assert hub.cdn_gets() == []


# -------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("name", "quant", "split", "imatrix"),
    [
        ("Model-Q4_K_M-00001-of-00003.gguf", "Q4_K_M", ("Model-Q4_K_M", 1, 3), False),
        ("Q5_K_M/model-00002-of-00002.gguf", None, ("Q5_K_M/model", 2, 2), False),
        ("Model.i1-Q4_K_M.gguf", "Q4_K_M", None, True),
        ("model-q5_k_s-imat.gguf", "Q5_K_S", None, True),
        ("Model-IQ4_XS.GGUF", "IQ4_XS", None, False),
        ("imatrix.gguf", None, None, True),
        ("tiny.Q4_k_m.gguf", "Q4_K_M", None, False),
    ],
)
def test_names(name, quant, split, imatrix):
    assert quant_of(name) == quant
    assert split_part(name) == split
    assert imatrix_name(name) == imatrix


def _listing(*files: tuple[str, int]) -> RepoListing:
    return RepoListing("o/r", "c" * 40, False,
                       tuple(HubFile("o/r", p, s, None) for p, s in files), 0)  # fmt: skip


def test_repo_models_group_splits_and_leave_out_what_is_not_a_model():
    models, skipped = repo_models(_listing(
        ("m-Q8_0-00002-of-00002.gguf", 50), ("m-Q8_0-00001-of-00002.gguf", 60),
        ("m-Q4_K_M.gguf", 70), ("m-Q6_K-00001-of-00002.gguf", 40),
        ("mmproj-m-f16.gguf", 10), ("m.imatrix.gguf", 5),
    ))  # fmt: skip
    assert [(m.path, m.size_bytes, len(m.parts)) for m in models] == [
        ("m-Q4_K_M.gguf", 70, 1),
        ("m-Q8_0-00001-of-00002.gguf", 110, 2),  # the parts in order, sizes summed
    ]
    assert [m.parts[1].path for m in models[1:]] == ["m-Q8_0-00002-of-00002.gguf"]
    assert skipped == (
        "mmproj-m-f16.gguf (a vision projector, not a model)",
        "m.imatrix.gguf (an importance matrix, not a model)",
        "m-Q6_K (a split of 2 parts, 1 on the hub)",
    )


@pytest.mark.parametrize(
    ("quant", "k"),
    [("Q4_K_M", True), ("Q6_K", True), ("Q3_K_L", True), ("Q4_0", False), ("IQ4_XS", False),
     ("Q8_0", False), (None, False)],
)  # fmt: skip
def test_k_quants(quant, k):
    assert is_k_quant(quant) is k
