"""`localllm ppl`: the llama-perplexity method, checked against numpy and llama.cpp itself."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from localllm.errors import InvalidArgument
from localllm.plan.rope import RopePlan
from localllm.ppl.perplexity import (
    PerplexityProgress,
    PerplexityResult,
    builtin_text,
    iter_perplexity,
    perplexity_stats,
    read_text,
)
from localllm.runtime import LoadOptions, load_model

SHORT_CTX = 64


@pytest.fixture
def short_text(tmp_path: Path) -> Path:
    """A few chunks' worth of English: the start of the built-in text."""
    path = tmp_path / "short.txt"
    path.write_text(builtin_text()[:3000], encoding="utf-8")
    return path


def _run(*args, **kwargs) -> tuple[list[object], PerplexityResult]:
    items = list(iter_perplexity(*args, **kwargs))
    result = items[-1]
    assert isinstance(result, PerplexityResult)
    return items, result


# ------------------------------------------------------------------------------ fast


def test_builtin_text_is_long_offline_english() -> None:
    text = builtin_text()
    assert len(text) > 200_000
    assert "assert" in text and "\x00" not in text
    assert read_text(None)[0] == text
    assert read_text("pydoc")[0] == text


def test_stats_match_the_definition() -> None:
    values = np.random.default_rng(0).exponential(2.0, size=1000)
    ppl, stderr = perplexity_stats(float(values.sum()), float((values**2).sum()), len(values))
    assert ppl == pytest.approx(math.exp(values.mean()))
    # perplexity.cpp: the error of the mean nll, scaled by ppl (first-order propagation).
    assert stderr == pytest.approx(ppl * values.std() / math.sqrt(len(values) - 1))


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such text file"), ("", "is empty"), ("  \n\n", "is empty")],
)
def test_read_text_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidArgument, match=message):
        read_text(path)


# ------------------------------------------------------------------------ real model


def _numpy_reference(model_path: Path, text_path: Path, ctx: int) -> tuple[float, float, int]:
    """ppl and stderr from all the logits llama-cpp-python's own eval returns, in numpy."""
    model = load_model(model_path, LoadOptions(n_ctx=ctx, n_batch=ctx, logits_all=True))
    try:
        tokens = model.tokenize(text_path.read_text(encoding="utf-8"), add_bos=True)
        bos = model.llama.token_bos()
        adds_bos = model.llama.metadata.get("tokenizer.ggml.add_bos_token") == "true"
        nlls: list[float] = []
        for c in range(len(tokens) // ctx):
            chunk = tokens[c * ctx : (c + 1) * ctx]
            if adds_bos:
                chunk[0] = bos
            model.reset()
            model.llama.eval(chunk)
            logits = np.array(model.llama.scores[:ctx], dtype=np.float64)
            log_probs = logits - logits.max(axis=1, keepdims=True)
            log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
            for pos in range(ctx // 2, ctx - 1):
                nlls.append(-log_probs[pos, chunk[pos + 1]])
    finally:
        model.close()
    arr = np.array(nlls)
    ppl = math.exp(arr.mean())
    return ppl, ppl * arr.std() / math.sqrt(len(arr) - 1), len(arr)


@pytest.mark.slow
def test_ppl_matches_a_numpy_reference(
    store_with_smollm2: Path, smollm2_path: Path, short_text: Path
) -> None:
    items, result = _run(None, short_text, SHORT_CTX)
    ppl, stderr, count = _numpy_reference(smollm2_path, short_text, SHORT_CTX)
    assert result.tokens == count == result.chunks * (SHORT_CTX - SHORT_CTX // 2 - 1)
    assert result.chunks == result.text_tokens // SHORT_CTX
    assert result.ppl == pytest.approx(ppl, rel=1e-3)
    assert result.ppl_stderr == pytest.approx(stderr, rel=1e-2)
    # The plan comes first, progress covers every decoded token, the result is last.
    assert isinstance(items[0], RopePlan) and items[0].method == "none"
    progress = [i for i in items if isinstance(i, PerplexityProgress)]
    assert progress[-1].tokens_done == progress[-1].tokens_total == result.tokens_evaluated
    assert result.tokens_per_second == result.tokens_evaluated / result.seconds
    assert result.tokens_evaluated == result.chunks * SHORT_CTX


@pytest.mark.slow
def test_chunks_caps_the_chunk_count(store_with_smollm2: Path, short_text: Path) -> None:
    _, result = _run(None, short_text, SHORT_CTX, chunks=2)
    assert result.chunks == 2
    assert result.tokens == 2 * (SHORT_CTX - SHORT_CTX // 2 - 1)


@pytest.mark.slow
def test_ppl_agrees_with_llama_perplexity(
    store_with_smollm2: Path, smollm2_path: Path, tmp_path: Path, llama_perplexity_bin: Path
) -> None:
    """The README's command through the native tool built from the same sources: equal to
    the digits it prints (the README promises 4 decimals).

    At -c 512 llama-perplexity puts four chunks in one 2048-token batch, one ubatch each,
    which computes what localllm's one chunk per decode does. (With chunks shorter than a
    ubatch split across ubatches, e.g. -c 128, its own figure moves by ~0.3%.)
    """
    from localllm.runtime.library import choose_repack

    text = tmp_path / "pydoc.txt"
    text.write_text(builtin_text(), encoding="utf-8")
    # On AMX CPUs repacked weights crash llama.cpp (localllm turns repacking off there).
    repack = ["--repack"] if choose_repack(None).repack else ["--no-repack"]
    args = ["-m", str(smollm2_path), "-f", str(text), "-c", "512", "--chunks", "4", *repack]
    proc = subprocess.run(
        [str(llama_perplexity_bin), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    native = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", proc.stdout + proc.stderr)
    assert native is not None
    scored = re.search(r"calculating perplexity over (\d+) chunks", proc.stderr)
    _, result = _run(None, text, 512, chunks=4)
    assert scored is not None and result.chunks == int(scored[1]) == 4
    # llama-perplexity prints ppl with 4 decimals (so 4 decimals agree within 1e-4) and its
    # error with 5.
    assert result.ppl == pytest.approx(float(native[1]), rel=1e-4, abs=0)
    assert result.ppl == pytest.approx(float(native[1]), abs=1e-4)
    assert result.ppl_stderr == pytest.approx(float(native[2]), rel=1e-4)


@pytest.mark.slow
def test_cli_json(cli, store_with_smollm2: Path, short_text: Path) -> None:
    result = cli("ppl", "--file", str(short_text), "--ctx", str(SHORT_CTX), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"ppl", "ppl_stderr", "ctx", "chunks", "tokens", "rope"} <= data.keys()
    assert data["ctx"] == SHORT_CTX and data["rope"]["method"] == "none"
    # The same figures the core gives for the same text and context (the core is held
    # against numpy and llama-perplexity above).
    _, core = _run(None, short_text, SHORT_CTX)
    assert data["ppl"] == pytest.approx(core.ppl, rel=1e-9)
    assert data["tokens"] == core.tokens and data["chunks"] == core.chunks
    # (the JSON rounds seconds to 3 decimals)
    tps = data["tokens_evaluated"] / data["seconds"]
    assert data["tokens_per_second"] == pytest.approx(tps, rel=0.01)


@pytest.mark.slow
def test_cli_reports_the_rope_plan_past_the_trained_length(
    cli, store_with_smollm2: Path, short_text: Path
) -> None:
    # SmolLM2 is trained at 8192; --ctx 9000 extends it but the text is too short to
    # score, so the run stops right after the plan is reported (no 9k-token decode).
    result = cli("ppl", "--file", str(short_text), "--ctx", "9000", "--rope", "none")
    assert result.exit_code == 2
    assert "warning: --rope none past the trained context" in result.stderr
    result = cli("ppl", "--file", str(short_text), "--ctx", "9000")
    assert "rope: YaRN" in result.stderr


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--file", "/nonexistent/text.txt"], "error: no such text file: /nonexistent/text.txt"),
        (["--ctx", "0"], "error: --ctx 0 must be a positive token count"),
        (["--ctx", "-5"], "error: --ctx -5 must be a positive token count"),
        (["--ctx", "4"], "error: --ctx 4 is too small to score; use at least 8"),
        (["--rope", "bogus"], "error: unknown RoPE method 'bogus'"),
        (["--chunks", "0"], "error: --chunks 0 must be positive"),
    ],
)
def test_cli_bad_input(cli, args: list[str], message: str) -> None:
    result = cli("ppl", *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_cli_empty_file(cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = cli("ppl", "--file", str(empty))
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {empty} is empty; perplexity needs text to score"


@pytest.mark.slow
def test_cli_text_shorter_than_two_chunks(cli, store_with_smollm2: Path, tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n")
    result = cli("ppl", "--file", str(text), "--ctx", "512")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        rf"error: {re.escape(str(text))} is \d+ tokens; --ctx 512 needs at least 1024 "
        r"\(two chunks\): use a smaller --ctx or a longer text",
        lines[0],
    )
