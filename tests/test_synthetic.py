"""Synthetic-weight GGUFs: the source's tensor table, finite random weights, always deleted.

Independent references: gguf-py's GGUFReader (tables, key/values) and its dequantizers
(values), the real SmolLM2 weights (their range), TheBloke's published Llama-2-7B-Chat
file sizes and llama.cpp's load log for its Q4_K_M mix, and llama.cpp itself (loading
with check_tensors, which validates every block, and decoding).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest

from localllm.errors import InvalidArgument, LocalLLMError
from localllm.gguf.header import HeaderIncomplete
from localllm.gguf.spec import ModelSpec
from localllm.plan.synthetic_gguf import synthetic_gguf
from localllm.plan.tensor_table import preset_table, table_from_gguf, table_from_prefix
from localllm.store.presets import PRESETS
from localllm.text import format_bytes

# A preset-like shape small enough to write and load in a test: 2 layers, GQA 4/2.
TINY = ModelSpec(
    name="tiny-llama",
    architecture="llama",
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=64,
    n_embd=256,
    n_ctx_train=512,
    n_ff=512,
    vocab_size=1000,
    source="preset",
)


def _reader_table(reader: gguf.GGUFReader) -> list[tuple[object, ...]]:
    return [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset),
         int(t.n_bytes))
        for t in reader.tensors
    ]  # fmt: skip


def _reader_fields(reader: gguf.GGUFReader) -> dict[str, list[bytes]]:
    """Every key/value as its raw bytes (type tags, lengths, values)."""
    return {name: [part.tobytes() for part in f.parts] for name, f in reader.fields.items()}


def _values(tensor: object) -> np.ndarray:
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


def _synthetic_dirs(directory: Path) -> list[Path]:
    return sorted(directory.glob("localllm-synthetic-*"))


@pytest.fixture(scope="module")
def smol_synthetic(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic SmolLM2 kept for the module (``keep``): written once, read by many."""
    out = tmp_path_factory.mktemp("smol") / "smollm2-synthetic.gguf"
    with synthetic_gguf(table_from_gguf(smollm2_path), out.parent, keep=out):
        pass
    return out


@pytest.fixture(scope="module")
def readers(smollm2_path: Path, smol_synthetic: Path) -> tuple[gguf.GGUFReader, gguf.GGUFReader]:
    """GGUFReader of the real SmolLM2 and of its synthetic twin (2 s each: read once)."""
    return gguf.GGUFReader(smollm2_path), gguf.GGUFReader(smol_synthetic)


def test_smollm2_table_and_metadata_are_the_sources(
    smollm2_path: Path, smol_synthetic: Path, readers: tuple[gguf.GGUFReader, gguf.GGUFReader]
):
    real, synth = readers
    assert _reader_table(synth) == _reader_table(real)
    assert _reader_fields(synth) == _reader_fields(real)
    assert synth.alignment == real.alignment
    assert synth.data_offset == real.data_offset
    assert smol_synthetic.stat().st_size == smollm2_path.stat().st_size
    # The weights are new, not a copy of the real ones.
    pairs = zip(real.tensors, synth.tensors, strict=True)
    assert not any(np.array_equal(a.data, b.data) for a, b in pairs)


def test_smollm2_weights_are_finite_and_in_the_real_range(smollm2_path: Path, smol_synthetic: Path):
    real = gguf.GGUFReader(smollm2_path)
    synth = gguf.GGUFReader(smol_synthetic)
    real_max = max(float(np.abs(_values(t)).max()) for t in real.tensors)
    types = Counter()
    for t in synth.tensors:
        values = _values(t)
        types[t.tensor_type.name] += 1
        assert np.isfinite(values).all(), t.name
        assert float(np.abs(values).max()) <= real_max, t.name
        assert float(values.std()) > 0, t.name  # random, not zeros
    # SmolLM2 Q4_1 has all three kinds: quantized (two types) and float tensors.
    assert set(types) == {"Q4_1", "Q8_0", "F32"}


def _log2_scale_spread(reader: gguf.GGUFReader) -> float:
    """Median over Q4_1 tensors of the std of log2(block scale d): how much blocks vary."""
    spreads = []
    for t in reader.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_1:
            blocks = np.asarray(t.data).view(np.uint8).reshape(-1, 20)  # f16 d, f16 m, 16 B
            d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32).ravel()
            spreads.append(float(np.std(np.log2(d[d > 0]))))
    return float(np.median(spreads))


def test_smollm2_block_scales_spread_as_the_real_ones(
    readers: tuple[gguf.GGUFReader, gguf.GGUFReader],
):
    # Speed depends on it: ggml's x86 f16->f32 conversion of block scales is a table lookup,
    # and i.i.d. normal weights (spread 0.24 against the real 0.37) ran tg ~8% faster.
    real, synth = readers
    assert _log2_scale_spread(synth) == pytest.approx(_log2_scale_spread(real), rel=0.15)


def test_header_only_prefix_gives_the_same_table(
    smollm2_path: Path, tmp_path: Path, readers: tuple[gguf.GGUFReader, gguf.GGUFReader]
):
    full = table_from_gguf(smollm2_path)
    reader = readers[0]
    prefix = smollm2_path.read_bytes()[: reader.data_offset]
    size = smollm2_path.stat().st_size
    from_prefix = table_from_prefix(prefix, size, "HuggingFaceTB/SmolLM2:Q4_1")
    assert from_prefix.header == full.header
    assert from_prefix.tensors == full.tensors
    assert from_prefix.file_bytes == size
    with pytest.raises(HeaderIncomplete):
        table_from_prefix(prefix[: len(prefix) // 2], size, "half a header")
    # A header-only file on disk (what a preview could save): same table, and the file
    # to write spans every tensor (GGUFReader's offsets + sizes of the real file).
    header_only = tmp_path / "header-only.gguf"
    header_only.write_bytes(prefix)
    table = table_from_gguf(header_only)
    assert table.tensors == full.tensors
    last = max(reader.tensors, key=lambda t: t.data_offset)
    assert table.file_bytes >= int(last.data_offset) + int(last.n_bytes)
    assert table.file_bytes - (int(last.data_offset) + int(last.n_bytes)) < reader.alignment


# Published file sizes (Hugging Face file listings): TheBloke/Llama-2-7B-Chat-GGUF, and
# TheBloke/Llama-2-7B-GGUF (base, same shapes and vocabulary) for Q4_0 and Q6_K.
LLAMA2_7B_CHAT_BYTES = {
    "Q4_0": 3825807040,
    "Q4_K_M": 4081004224,
    "Q5_K_M": 4783156928,
    "Q6_K": 5529194176,
    "Q8_0": 7161089728,
}


def test_preset_types_are_llama_cpps_and_match_the_published_files(tmp_path: Path):
    spec = PRESETS["llama-2-7b"].spec
    work = tmp_path / "work"  # tmp_path also holds this test's own cache folder
    work.mkdir()
    tables = {q: preset_table(spec, q, work) for q in LLAMA2_7B_CHAT_BYTES}
    # llama.cpp's loader log for llama-2-7b-chat.Q4_K_M.gguf: 65 f32, 193 q4_K, 33 q6_K.
    mix = Counter(gguf.GGMLQuantizationType(t.type_id).name for t in tables["Q4_K_M"].tensors)
    assert mix == {"F32": 65, "Q4_K": 193, "Q6_K": 33}
    # Every quant's weights are the published file's: what is left is the same header
    # (vocabulary text, which a preset synthesizes) for all five.
    rest = {q: LLAMA2_7B_CHAT_BYTES[q] - t.weights_bytes for q, t in tables.items()}
    assert len(set(rest.values())) == 1, rest
    assert 0 < next(iter(rest.values())) < 1 << 20
    assert list(work.iterdir()) == []  # the F16 and header scratch files are gone


def test_tiny_preset_file_has_the_llama_layout(tmp_path: Path):
    table = preset_table(TINY, "Q4_K_M", tmp_path)
    out = tmp_path / "tiny.gguf"
    with synthetic_gguf(table, tmp_path, keep=out):
        pass
    reader = gguf.GGUFReader(out)
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    # GGUF order (ne0 first) of a Llama with 256 wide, 4 heads of 64, 2 KV heads, FFN 512.
    assert shapes["token_embd.weight"] == [256, 1000]
    assert shapes["output.weight"] == [256, 1000]
    assert shapes["blk.1.attn_q.weight"] == [256, 256]
    assert shapes["blk.1.attn_k.weight"] == [256, 128]
    assert shapes["blk.0.ffn_down.weight"] == [512, 256]
    assert shapes["blk.0.ffn_gate.weight"] == [256, 512]
    assert shapes["output_norm.weight"] == [256]
    assert len(shapes) == 2 + 2 * 9 + 1
    assert reader.fields["general.file_type"].contents() == 15  # MOSTLY_Q4_K_M
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 1000
    for t in reader.tensors:
        assert np.isfinite(_values(t)).all(), t.name
    types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
    assert types <= {"F32", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q5_0", "Q4_0"}
    assert "Q4_K" in types


def test_unknown_quant_and_tiny_vocabulary_are_refused(tmp_path: Path):
    with pytest.raises(InvalidArgument, match="Q4_K_Q"):
        preset_table(TINY, "Q4_K_Q", tmp_path)
    with pytest.raises(InvalidArgument, match="vocabulary size 100 "):
        preset_table(TINY.__class__(**{**TINY.__dict__, "vocab_size": 100}), "Q8_0", tmp_path)


def _resident_fraction(path: Path) -> float:
    """The share of ``path``'s pages in the page cache, from mincore(2) on a fresh mapping."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_written_file_is_left_out_of_the_page_cache(smollm2_path: Path, tmp_path: Path):
    # Measured as a model read from disk is, whatever wrote it: how the kernel caches a
    # file (folio sizes, huge-page mappings) moves tg by a few percent on the same bytes;
    # and flushed, so no writeback competes with the benchmark.
    with synthetic_gguf(table_from_gguf(smollm2_path), tmp_path) as synth:
        cold = _resident_fraction(synth.path)
        # The check can tell: the same bytes copied the ordinary way stay cached.
        copy = tmp_path / "copy.gguf"
        copy.write_bytes(synth.path.read_bytes())
        warm = _resident_fraction(copy)
        copy.unlink()
    assert cold < 0.05
    assert warm > 0.9


def test_missing_directory_is_one_line(smollm2_path: Path, tmp_path: Path):
    table, missing = table_from_gguf(smollm2_path), tmp_path / "no-such-disk"
    with pytest.raises(LocalLLMError, match="no-such-disk") as err, synthetic_gguf(table, missing):
        pytest.fail("nothing may be written")
    assert "\n" not in str(err.value)


def test_deleted_after_success(smollm2_path: Path, tmp_path: Path):
    with synthetic_gguf(table_from_gguf(smollm2_path), tmp_path) as synth:
        assert synth.path.is_file()
        assert synth.path.stat().st_size == synth.file_bytes == smollm2_path.stat().st_size
    assert not synth.path.exists()
    assert list(tmp_path.iterdir()) == []


def test_deleted_after_an_exception(smollm2_path: Path, tmp_path: Path):
    with (
        pytest.raises(RuntimeError, match="boom"),
        synthetic_gguf(table_from_gguf(smollm2_path), tmp_path) as synth,
    ):
        assert synth.path.is_file()
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_deleted_after_a_write_error(
    smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import localllm.plan.synthetic_gguf as synthetic

    real_write = synthetic._write_tensor
    calls = []

    def disk_fills_up(fd: int, pos: int, tensor: object, pools: object) -> None:
        calls.append(tensor)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_write(fd, pos, tensor, pools)

    monkeypatch.setattr(synthetic, "_write_tensor", disk_fills_up)
    table = table_from_gguf(smollm2_path)
    with (
        pytest.raises(LocalLLMError, match="No space left on device") as err,
        synthetic_gguf(table, tmp_path),
    ):
        pytest.fail("the body must not run when the write fails")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


_CHILD = textwrap.dedent(
    """
    import sys, time
    import localllm.plan.synthetic_gguf as s
    from localllm.plan.tensor_table import table_from_gguf

    source, directory, when = sys.argv[1:]
    real_write, written = s._write_tensor, []

    def write_then_wait(*args):
        real_write(*args)
        written.append(1)
        if when == "writing" and len(written) == 5:
            print("ready", flush=True)
            time.sleep(60)

    s._write_tensor = write_then_wait
    with s.synthetic_gguf(table_from_gguf(source), directory):
        print("ready", flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize("when", ["writing", "in-use"])
def test_deleted_after_sigint(smollm2_path: Path, tmp_path: Path, when: str):
    work = tmp_path / "work"  # tmp_path also holds this test's own cache folder
    work.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(smollm2_path), str(work), when],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        (workdir,) = _synthetic_dirs(work)
        assert (workdir / "synthetic.gguf").is_file()
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert "KeyboardInterrupt" in stderr
    assert child.returncode != 0
    assert list(work.iterdir()) == []


def test_refused_when_the_disk_is_too_small(smollm2_path: Path, tmp_path: Path):
    table = table_from_gguf(smollm2_path)
    free = 50 * 1024 * 1024  # 50 MiB free for a 93.81 MiB file
    with pytest.raises(LocalLLMError) as err, synthetic_gguf(table, tmp_path, free_bytes=free):
        pytest.fail("nothing may be written")
    message = str(err.value)
    assert "\n" not in message
    assert "93.81 MiB" in message  # the need: SmolLM2's 98362432 bytes
    assert format_bytes(free) in message and "50.00 MiB" in message
    assert list(tmp_path.iterdir()) == []


def test_kept_file_survives_and_workdir_does_not(smollm2_path: Path, tmp_path: Path):
    keep = tmp_path / "kept" / "smol.gguf"
    work = tmp_path / "work"
    work.mkdir()
    with synthetic_gguf(table_from_gguf(smollm2_path), work, keep=keep) as synth:
        assert synth.path.parent.parent == work
    assert keep.stat().st_size == smollm2_path.stat().st_size
    assert list(work.iterdir()) == []


def _load_checked(path: Path) -> None:
    """llama.cpp loads ``path`` with check_tensors: every row validated (no NaN/Inf)."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.check_tensors = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp refused {path.name} with check_tensors"
    llama_cpp.llama_model_free(model)


def _greedy_logits(path: Path, n_tokens: int = 6) -> list[np.ndarray]:
    from localllm.runtime import LoadOptions, load_model

    model = load_model(path, LoadOptions(n_ctx=128, n_threads=2, seed=1, logits_all=True))
    try:
        llm = model.llama
        llm.eval(llm.tokenize(b"The capital of France is", add_bos=True))
        rows = []
        for _ in range(n_tokens):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            rows.append(logits)
            llm.eval([int(np.argmax(logits))])
        return rows
    finally:
        model.close()


@pytest.mark.slow
def test_llama_cpp_runs_synthetic_smollm2(smol_synthetic: Path):
    _load_checked(smol_synthetic)
    rows = _greedy_logits(smol_synthetic)
    assert len(rows) == 6
    for logits in rows:
        assert logits.shape == (49152,)  # SmolLM2's vocabulary
        assert np.isfinite(logits).all()
        assert float(logits.std()) > 0


@pytest.mark.slow
def test_llama_cpp_runs_a_synthetic_tiny_preset(tmp_path: Path):
    out = tmp_path / "tiny.gguf"
    with synthetic_gguf(preset_table(TINY, "Q4_K_M", tmp_path), tmp_path, keep=out):
        pass
    _load_checked(out)
    for logits in _greedy_logits(out):
        assert logits.shape == (1000,)
        assert np.isfinite(logits).all()
