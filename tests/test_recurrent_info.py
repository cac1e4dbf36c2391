"""``localllm info`` and ``kv-calc`` on a recurrent (attention-free) GGUF.

Mamba and RWKV converters write ``head_count = 0`` ("required by llama.cpp, unused"):
such a model has no attention and no KV cache, only a fixed recurrent state per sequence.
The file here has the published shapes of state-spaces/mamba-130m-hf (24 layers,
d_model 768, d_inner 1536, d_state 16, d_conv 4, dt_rank 48, vocabulary 50280), laid out
as llama.cpp's converter writes them, header only (a sparse file). The reference for the
state's size is llama.cpp's own log line when llama-cpp-python loads that file for real
(``llama_memory_recurrent: size = ... MiB``), and hand arithmetic:
24 layers x ((d_conv - 1) x d_inner + d_state x d_inner) x 4 bytes = 2,801,664 bytes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.gguf_files import write_header_gguf
from support.header_models import HeaderModel

from localllm.errors import InvalidArgument, InvalidModelFile
from localllm.gguf.spec import read_model_spec
from localllm.plan.facts import ArchFlags, resolve_architecture

MIB = 1024 * 1024
N_LAYER, N_EMBD, D_INNER, D_STATE, D_CONV, DT_RANK, N_VOCAB = 24, 768, 1536, 16, 4, 48, 50280
STATE_BYTES = N_LAYER * ((D_CONV - 1) * D_INNER + D_STATE * D_INNER) * 4  # one sequence
_STATE_LINE = re.compile(
    r"llama_memory_recurrent: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers,"
    r"\s*(\d+) seqs"
)


def _mamba_130m(arch: str = "mamba", **extra_kv: object) -> HeaderModel:
    kv = {
        "general.name": "mamba-130m",
        f"{arch}.block_count": N_LAYER,
        f"{arch}.context_length": 1 << 20,  # the converter's "infinite" context
        f"{arch}.embedding_length": N_EMBD,
        f"{arch}.feed_forward_length": 0,
        f"{arch}.attention.head_count": 0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.ssm.conv_kernel": D_CONV,
        f"{arch}.ssm.inner_size": D_INNER,
        f"{arch}.ssm.state_size": D_STATE,
        f"{arch}.ssm.time_step_rank": DT_RANK,
        f"{arch}.vocab_size": N_VOCAB,
        "tokenizer.ggml.model": "none",
        **extra_kv,
    }
    tensors: list[tuple[str, tuple[int, ...]]] = [
        ("token_embd.weight", (N_EMBD, N_VOCAB)),
        ("output_norm.weight", (N_EMBD,)),
    ]
    for i in range(N_LAYER):  # src/models/mamba.cpp's load_arch_tensors, ggml order
        tensors += [
            (f"blk.{i}.attn_norm.weight", (N_EMBD,)),
            (f"blk.{i}.ssm_in.weight", (N_EMBD, 2 * D_INNER)),
            (f"blk.{i}.ssm_conv1d.weight", (D_CONV, D_INNER)),
            (f"blk.{i}.ssm_conv1d.bias", (D_INNER,)),
            (f"blk.{i}.ssm_x.weight", (D_INNER, DT_RANK + 2 * D_STATE)),
            (f"blk.{i}.ssm_dt.weight", (DT_RANK, D_INNER)),
            (f"blk.{i}.ssm_dt.bias", (D_INNER,)),
            (f"blk.{i}.ssm_a", (D_STATE, D_INNER)),
            (f"blk.{i}.ssm_d", (D_INNER,)),
            (f"blk.{i}.ssm_out.weight", (D_INNER, N_EMBD)),
        ]
    return HeaderModel("mamba-130m", arch, kv, tuple(tensors), "state-spaces/mamba-130m-hf")


@pytest.fixture(scope="module")
def mamba_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mamba") / "mamba-130m.F16.gguf"
    return write_header_gguf(path, _mamba_130m(), weight_type="F16")


@pytest.fixture(scope="module")
def llama_cpp_state(mamba_file: Path) -> tuple[float, int]:
    """llama.cpp's own figure: the state line it logs when llama-cpp-python loads the file
    (a separate process, so nothing of localllm is involved). Returns (MiB, layers)."""
    code = (
        "import sys, llama_cpp\n"
        "llama_cpp.Llama(model_path=sys.argv[1], n_ctx=4096, n_threads=1, verbose=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(mamba_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [m for ln in proc.stderr.splitlines() if (m := _STATE_LINE.search(ln))]
    assert len(lines) == 1, proc.stderr[-2000:]
    mib, cells, layers, seqs = lines[0].groups()
    assert (int(cells), int(seqs)) == (1, 1)
    return float(mib), int(layers)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / MIB:.2f}"  # llama.cpp's %.2f


# ----------------------------------------------------------------- the header alone


def test_a_recurrent_header_is_read_as_attention_free(mamba_file: Path) -> None:
    spec = read_model_spec(mamba_file)
    assert (spec.architecture, spec.n_layers, spec.n_embd) == ("mamba", N_LAYER, N_EMBD)
    assert (spec.n_heads, spec.n_kv_heads, spec.head_dim) == (0, 0, 0)
    assert (spec.has_attention, spec.attention_kind, spec.gqa_group) == (False, "none", 0.0)
    assert spec.vocab_size == N_VOCAB


def test_rwkv6qwen2_kv_heads_without_heads(tmp_path: Path) -> None:
    # conversion/rwkv.py writes head_count_kv for RWKV6-Qwen2 beside head_count 0.
    model = _mamba_130m("rwkv6qwen2", **{"rwkv6qwen2.attention.head_count_kv": 2})
    spec = read_model_spec(write_header_gguf(tmp_path / "r.gguf", model, weight_type="F16"))
    assert (spec.n_heads, spec.n_kv_heads, spec.attention_kind) == (0, 0, "none")


def test_zero_heads_on_an_attention_architecture_is_still_refused(tmp_path: Path) -> None:
    path = write_header_gguf(tmp_path / "l.gguf", _mamba_130m("llama"), weight_type="F16")
    with pytest.raises(InvalidModelFile, match="heads 0"):
        read_model_spec(path)


def test_flags_that_give_a_recurrent_file_kv_heads_are_checked(mamba_file: Path) -> None:
    facts = resolve_architecture(str(mamba_file))
    assert facts.spec.n_heads == 0
    with pytest.raises(InvalidArgument, match="--heads 0"):
        resolve_architecture(str(mamba_file), ArchFlags(kv_heads=2))


# ------------------------------------------------------------------ against llama.cpp


@pytest.mark.slow
def test_llama_cpp_logs_the_hand_computed_state(llama_cpp_state: tuple[float, int]) -> None:
    assert llama_cpp_state == (float(_mib(STATE_BYTES)), N_LAYER)


@pytest.mark.slow
def test_info_shows_llama_cpps_state(cli, mamba_file: Path, llama_cpp_state) -> None:
    result = cli("info", str(mamba_file))
    assert result.exit_code == 0, result.stderr
    mib, _ = llama_cpp_state
    assert f"KV {mib:.2f} MiB" in result.stdout  # the state, from the dry run
    assert "llama.cpp dry run" in result.stdout
    assert re.search(r"attention\s+none \(a recurrent state", result.stdout)


@pytest.mark.slow
def test_kv_calc_shows_llama_cpps_state(cli, mamba_file: Path, llama_cpp_state) -> None:
    mib, layers = llama_cpp_state
    result = cli("kv-calc", str(mamba_file), "--ctx", "4096,65536", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["plan_source"] == "llama.cpp dry run"
    assert data["architecture"]["attention"] == "none"
    for row in data["rows"]:  # the state does not grow with the context
        (state,) = row["caches"]
        assert (state["kind"], state["layers"], state["k_bytes"], state["v_bytes"]) == (
            "recurrent", layers, 0, 0,
        )  # fmt: skip
        assert _mib(state["state_bytes"]) == f"{mib:.2f}"
        assert _mib(row["kv_bytes"]) == f"{mib:.2f}"
        # The analytic layout's state (kv-calc's estimate beside the dry run).
        assert _mib(row["estimate"]["kv_bytes"]) == f"{mib:.2f}"
    text = cli("kv-calc", str(mamba_file), "--ctx", "4096")
    assert text.exit_code == 0, text.stderr
    assert f"{mib:.2f} MiB" in text.stdout
    assert "none (a recurrent state)" in text.stdout and "GQA saves" not in text.stdout


@pytest.mark.slow
def test_kv_calc_estimate_on_a_recurrent_file(cli, mamba_file: Path, llama_cpp_state) -> None:
    mib, _ = llama_cpp_state
    result = cli("kv-calc", str(mamba_file), "--ctx", "4096", "--estimate", "--json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)["rows"]
    assert row["source"] != "llama.cpp dry run"
    assert row["kv_bytes"] == STATE_BYTES  # hand arithmetic, to the byte
    assert _mib(row["kv_bytes"]) == f"{mib:.2f}"
