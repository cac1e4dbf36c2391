"""Model references: alias, alias:QUANT, path, org/repo:QUANT, hf://, the default."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SMOLLM2_FILE

from localllm.errors import DefaultModelMissing, InvalidArgument, ModelNotFound
from localllm.store.model_store import ModelStore
from localllm.store.resolver import require_local_file, resolve_model


def test_default_is_the_catalog_default(isolated_paths: Path) -> None:
    model = resolve_model(None)
    assert (model.kind, model.alias, model.quant, model.is_default) == (
        "catalog", "smollm2-135m", "Q4_1", True
    )  # fmt: skip
    assert not model.present


def test_default_missing_names_the_fetch_command(isolated_paths: Path) -> None:
    with pytest.raises(DefaultModelMissing, match="make setup"):
        require_local_file(resolve_model(None))


def test_env_overrides_default(monkeypatch: pytest.MonkeyPatch, isolated_paths: Path) -> None:
    monkeypatch.setenv("LOCALLLM_MODEL", "llama-2-7b-chat:Q5_K_M")
    model = resolve_model(None)
    assert (model.alias, model.quant, model.filename) == (
        "llama-2-7b-chat", "Q5_K_M", "llama-2-7b-chat.Q5_K_M.gguf"
    )  # fmt: skip


def test_alias_with_quant_and_alias_of_alias(isolated_paths: Path) -> None:
    model = resolve_model("mistral-7b-instruct:q4_k_m")
    assert (model.alias, model.quant) == ("mistral-7b-instruct-v0.2", "Q4_K_M")
    assert model.repo == "TheBloke/Mistral-7B-Instruct-v0.2-GGUF"


def test_unknown_quant_lists_known_ones(isolated_paths: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"known: .*Q4_K_M"):
        resolve_model("llama-2-7b-chat:Q9_X")


def test_unknown_alias_suggests_close_matches(isolated_paths: Path) -> None:
    with pytest.raises(ModelNotFound, match="did you mean llama-2-7b-chat"):
        resolve_model("llama2-7b-chat")


def test_catalog_model_not_downloaded_points_to_pull(isolated_paths: Path) -> None:
    with pytest.raises(ModelNotFound, match="localllm pull llama-2-13b-chat:Q4_K_M"):
        require_local_file(resolve_model("llama-2-13b-chat"))


def test_path_reference(tmp_path: Path, isolated_paths: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF")
    model = resolve_model(str(path))
    assert model.kind == "path" and model.present and model.path == path


def test_missing_path(tmp_path: Path, isolated_paths: Path) -> None:
    with pytest.raises(ModelNotFound, match="no such model file"):
        resolve_model(str(tmp_path / "absent.gguf"))


def test_hub_repo_with_quant(isolated_paths: Path) -> None:
    model = resolve_model("TheBloke/Llama-2-13B-chat-GGUF:q5_k_m")
    assert (model.kind, model.repo, model.quant, model.present) == (
        "hub", "TheBloke/Llama-2-13B-chat-GGUF", "Q5_K_M", False
    )  # fmt: skip
    with pytest.raises(ModelNotFound, match="localllm pull TheBloke/Llama-2-13B-chat-GGUF"):
        require_local_file(model)


def test_hub_file_reference(isolated_paths: Path) -> None:
    model = resolve_model("hf://org/repo/sub/file.Q4_0.gguf")
    assert (model.kind, model.repo, model.filename) == ("hub", "org/repo", "sub/file.Q4_0.gguf")


@pytest.mark.parametrize("bad", ["hf://org/file.gguf", "hf://org/repo/", "hf://org//x.gguf"])
def test_malformed_hub_file_reference(isolated_paths: Path, bad: str) -> None:
    with pytest.raises(InvalidArgument, match=r"hf://org/repo/file\.gguf"):
        resolve_model(bad)


def test_stored_hub_model_resolves_locally(isolated_paths: Path) -> None:
    store = ModelStore()
    staged = store.temp_dir() / "f.part"
    staged.write_bytes(b"GGUF")
    store.install(staged, "repo.Q4_0.gguf", expected_sha256=None, repo="Org/Repo", quant="Q4_0")
    model = resolve_model("org/repo:Q4_0")
    assert model.present and model.path == store.root / "repo.Q4_0.gguf"


def test_default_present_in_store(store_with_smollm2: Path) -> None:
    model = resolve_model(None)
    assert model.present and require_local_file(model).name == SMOLLM2_FILE
