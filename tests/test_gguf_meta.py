"""GGUF header reading on synthetic files (gguf.GGUFWriter) and on the real SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import installed_within_the_pin
from support.gguf_files import ARCHS, DROP, gguf_reader, write_gguf

from localllm.errors import InvalidModelFile
from localllm.gguf.header import LongArray, read_header
from localllm.gguf.spec import read_model_spec
from localllm.text import escape_untrusted


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_header_facts_round_trip(tmp_path: Path, name: str) -> None:
    arch = ARCHS[name]
    spec = read_model_spec(write_gguf(tmp_path / f"{name}.gguf", name))
    assert spec.architecture == "llama"
    assert spec.n_layers == arch["n_layers"]
    assert spec.n_heads == arch["n_heads"]
    assert spec.n_kv_heads == arch["n_kv_heads"]
    assert spec.head_dim == arch["n_embd"] // arch["n_heads"]
    assert spec.n_embd == arch["n_embd"]
    assert spec.n_ff == arch["n_ff"]
    assert spec.n_ctx_train == arch["n_ctx"]
    assert spec.rope_freq_base == arch["rope_base"]
    assert spec.vocab_size == arch["vocab"]
    assert spec.sliding_window == arch.get("sliding_window", 0)
    assert spec.has_chat_template


def test_attention_kind_names_mha_gqa_mqa(tmp_path: Path) -> None:
    kinds = {
        name: read_model_spec(write_gguf(tmp_path / f"{name}.gguf", name)).attention_kind
        for name in ("llama-2-7b", "llama-2-70b", "mqa-1b")
    }
    assert kinds == {"llama-2-7b": "MHA", "llama-2-70b": "GQA", "mqa-1b": "MQA"}


def test_missing_head_count_kv_means_mha(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "m.gguf", "llama-2-70b", overrides={"llama.attention.head_count_kv": DROP}
    )
    assert read_model_spec(path).n_kv_heads == 64


def test_explicit_key_length_wins_over_embd_split(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "m.gguf",
        "mha-tiny",
        overrides={"llama.attention.key_length": 128, "llama.attention.value_length": 96},
    )
    spec = read_model_spec(path)
    assert (spec.head_dim, spec.value_dim) == (128, 96)


def test_rope_scaling_in_file_is_reported(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "m.gguf",
        "llama-2-7b",
        overrides={
            "llama.rope.scaling.type": "linear",
            "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 4096,
        },
    )
    spec = read_model_spec(path)
    assert (spec.rope_scaling_type, spec.rope_scaling_factor, spec.rope_orig_ctx) == (
        "linear",
        4.0,
        4096,
    )


def test_vocab_size_falls_back_to_token_list(tmp_path: Path) -> None:
    tokens = [f"tok{i}" for i in range(5000)]  # longer than the decoded-array limit
    path = write_gguf(
        tmp_path / "m.gguf", "mha-tiny", overrides={"llama.vocab_size": DROP}, tokens=tokens
    )
    assert read_model_spec(path).vocab_size == 5000


@pytest.mark.parametrize(
    "key",
    [
        "llama.block_count",
        "llama.attention.head_count",
        "llama.context_length",
        "llama.embedding_length",
    ],
)
def test_missing_required_key_names_it(tmp_path: Path, key: str) -> None:
    path = write_gguf(tmp_path / "m.gguf", "llama-2-7b", overrides={key: DROP})
    with pytest.raises(InvalidModelFile, match=key.replace(".", r"\.")):
        read_model_spec(path)


def test_uneven_kv_heads_is_rejected(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "m.gguf", "llama-2-7b", overrides={"llama.attention.head_count_kv": 5}
    )
    with pytest.raises(InvalidModelFile, match="32 attention heads cannot share 5"):
        read_model_spec(path)


def test_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(InvalidModelFile, match="not a GGUF file"):
        read_model_spec(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(InvalidModelFile, match="not a GGUF file"):
        read_model_spec(path)


@pytest.mark.parametrize("keep", [6, 40, 300, 2000])
def test_truncated_header(tmp_path: Path, keep: int) -> None:
    full = write_gguf(tmp_path / "full.gguf", "llama-2-7b").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(full[:keep])
    with pytest.raises(InvalidModelFile, match="truncated"):
        read_model_spec(path)


def test_truncated_tensor_data(tmp_path: Path) -> None:
    tensors = {"token_embd.weight": np.ones((256, 256), dtype=np.float32)}
    full = write_gguf(tmp_path / "full.gguf", "mha-tiny", tensors=tensors).read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(full[: len(full) - 1000])
    with pytest.raises(InvalidModelFile, match="truncated: its tensors need"):
        read_model_spec(path)


def test_escape_untrusted_strips_terminal_controls() -> None:
    assert escape_untrusted("evil\x1b[31mred\x07") == "evil\\x1b[31mred\\x07"
    assert escape_untrusted("a\u202eb") == "a\\u202eb"
    assert escape_untrusted("x" * 10, limit=5) == "xxxx…"


def test_hostile_name_is_escaped_in_info(tmp_path: Path, cli) -> None:
    path = write_gguf(
        tmp_path / "m.gguf", "mha-tiny", overrides={"general.name": "pwn\x1b]0;title\x07"}
    )
    result = cli("info", str(path))
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stdout and "\\x1b" in result.stdout


def test_agrees_with_gguf_py_reader_on_real_model(smollm2_path: Path) -> None:
    """Our lean walker against gguf-py's full GGUFReader on the real file."""
    spec = read_model_spec(smollm2_path)
    reader = gguf.GGUFReader(smollm2_path)

    def field(key: str):
        return reader.get_field(key).contents()

    assert spec.n_layers == field("llama.block_count")
    assert spec.n_heads == field("llama.attention.head_count")
    assert spec.n_kv_heads == field("llama.attention.head_count_kv")
    assert spec.n_ctx_train == field("llama.context_length")
    assert spec.rope_freq_base == pytest.approx(field("llama.rope.freq_base"))
    assert spec.vocab_size == len(reader.get_field("tokenizer.ggml.tokens").data)
    assert spec.chat_template == field("tokenizer.chat_template")
    assert spec.n_params == sum(int(t.n_elements) for t in reader.tensors)
    assert spec.weights_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    assert {q.type_name: q.n_bytes for q in spec.quant_mix} == by_type


def test_real_smollm2_facts(smollm2_path: Path) -> None:
    spec = read_model_spec(smollm2_path)
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (30, 9, 3, 64)
    assert spec.n_ctx_train == 8192
    assert spec.file_type == "Q4_1"
    assert spec.file_bytes == smollm2_path.stat().st_size


def test_gguf_py_is_the_pinned_version() -> None:
    """The type tables below are held equal to the installed gguf-py: the pinned one."""
    installed_within_the_pin("gguf")


def test_type_tables_mirror_gguf_py() -> None:
    """Our copies of gguf-py's type tables (kept to avoid importing gguf) stay equal."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

    from localllm.gguf.ggml_types import FILE_TYPES, GGML_TYPES

    theirs = {
        int(t): (t.name, *GGML_QUANT_SIZES[t])
        for t in GGMLQuantizationType
        if t in GGML_QUANT_SIZES
    }
    assert theirs == GGML_TYPES
    names = {int(t): t.name.removeprefix("MOSTLY_").removeprefix("ALL_") for t in LlamaFileType}
    assert names == FILE_TYPES


def test_header_reading_does_not_import_gguf_or_numpy(smollm2_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\nfrom localllm.gguf.spec import read_model_spec\n"
        f"read_model_spec({str(smollm2_path)!r})\n"
        "print('gguf' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False False", out.stderr


def test_a_long_vocabulary_is_hopped_over_exactly(tmp_path: Path) -> None:
    # Tokens of every length class, some longer than 255 bytes (a length prefix > 1 byte).
    tokens = [f"t{i}" * (1 + i % 97) for i in range(6000)]
    path = write_gguf(tmp_path / "vocab.gguf", "llama-2-7b", tokens=tokens)
    header = read_header(path)
    assert header.kv["tokenizer.ggml.tokens"] == LongArray(6000)
    # Everything after the skipped array still parses: the tensor table and data offset.
    reader = gguf_reader(path)
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    assert header.data_offset == reader.data_offset


def test_a_vocabulary_cut_short_is_a_truncated_file(tmp_path: Path) -> None:
    tokens = [f"token{i}" for i in range(6000)]
    full = write_gguf(tmp_path / "vocab.gguf", "llama-2-7b", tokens=tokens).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[: full.index(b"token5000")])
    with pytest.raises(InvalidModelFile, match="truncated"):
        read_header(cut)


def test_a_header_is_read_again_when_the_file_changes(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", "llama-2-7b")
    first = read_header(path)
    assert read_header(path) is first  # read once per process
    write_gguf(path, "llama-2-13b")
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    assert read_header(path) is not first
    assert read_model_spec(path).n_layers == ARCHS["llama-2-13b"]["n_layers"]


def _forget_headers_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a new process: nothing read yet in memory (the kept skips stay on disk)."""
    from localllm.gguf import header

    monkeypatch.setattr(header, "_READ", {})


def test_where_a_vocabulary_ends_is_kept_between_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from localllm.gguf import header
    from localllm.paths import cache_root

    tokens = [f"t{i}" * (1 + i % 97) for i in range(6000)]
    path = write_gguf(tmp_path / "vocab.gguf", "llama-2-7b", tokens=tokens)
    first = read_header(path)
    (kept,) = (cache_root() / "gguf-skips").glob("*.json")
    _forget_headers_read(monkeypatch)

    def refuse(*_args: object) -> int:
        raise AssertionError("the vocabulary was walked again")

    monkeypatch.setattr(header, "_skip_strings", refuse)
    again = read_header(path)
    assert again is not first and again == first
    assert kept.exists()


def test_kept_positions_that_do_not_fit_the_file_are_walked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from localllm.paths import cache_root

    tokens = [f"token{i}" for i in range(6000)]
    path = write_gguf(tmp_path / "vocab.gguf", "llama-2-7b", tokens=tokens)
    right = read_header(path)
    (kept,) = (cache_root() / "gguf-skips").glob("*.json")
    good = json.loads(kept.read_text())["skips"]
    (start,) = good
    for wrong in ({start: good[start] - 3}, {start: 10**12}, "damaged"):
        kept.write_text(json.dumps({"skips": wrong}) if wrong != "damaged" else "{not json")
        _forget_headers_read(monkeypatch)
        assert read_header(path) == right
        assert json.loads(kept.read_text())["skips"] == good  # the walk's own, kept again


def test_the_kept_skips_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Temporary files (hub headers, scratch files) get an entry each: the newest are kept."""
    import time

    from localllm.gguf import header
    from localllm.paths import cache_root

    monkeypatch.setattr(header, "_KEEP_SKIPS", 2)
    tokens = [f"token{i}" for i in range(6000)]
    paths = [write_gguf(tmp_path / f"v{i}.gguf", "llama-2-7b", tokens=tokens) for i in range(3)]
    kept = []
    for path in paths:
        time.sleep(0.02)  # a later mtime than the last entry's, on a coarse file clock
        read_header(path)
        kept.append(max((cache_root() / "gguf-skips").glob("*.json"), key=os.path.getmtime))
    assert sorted((cache_root() / "gguf-skips").glob("*.json")) == sorted(kept[1:])
