"""The runtime on the real SmolLM2 and the real llama.cpp (slow), and its pure parts (fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.reference_chat import reference_prompt, reference_prompt_tokens, reference_reply

from localllm.errors import InvalidArgument, ModelLoadError
from localllm.generation import ChatMessage, GenerationStats, TextChunk
from localllm.runtime import LoadOptions, SamplingOptions, load_model
from localllm.runtime.log import parse_buffer_report

GREEDY = SamplingOptions(temperature=0.0, seed=7, max_tokens=24)
QUESTION = [ChatMessage("user", "Name three colours.")]


def _reply(model, messages=QUESTION, sampling=GREEDY) -> tuple[str, GenerationStats]:
    text, stats = [], None
    prompt = reference_prompt_tokens(model, messages)
    for item in model.stream_completion(prompt, sampling, stop_strings=[model.eos_text]):
        if isinstance(item, TextChunk):
            text.append(item.text)
        else:
            stats = item
    assert stats is not None
    return "".join(text), stats


@pytest.mark.slow
def test_greedy_reply_is_non_empty_and_repeatable(smollm2_path: Path) -> None:
    replies = []
    for _ in range(2):
        model = load_model(smollm2_path, LoadOptions(n_ctx=1024, seed=7))
        try:
            replies.append(_reply(model)[0])
        finally:
            model.close()
    assert replies[0].strip()
    assert replies[0] == replies[1]


@pytest.mark.slow
def test_stats_describe_the_turn(smollm2_loaded) -> None:
    smollm2_loaded.reset()
    text, stats = _reply(smollm2_loaded)
    assert stats.text == text
    assert stats.finish_reason in ("stop", "length")
    assert stats.generated_tokens > 0 and stats.prompt_evaluated > 0
    assert stats.prompt_tokens == len(reference_prompt_tokens(smollm2_loaded, QUESTION))
    assert stats.kv_cells == smollm2_loaded.n_ctx == 2048
    assert 0 < stats.kv_used <= stats.kv_cells
    assert stats.generation_tps > 0 and stats.ttft_seconds > 0


@pytest.mark.slow
def test_second_turn_reuses_the_kv_prefix(smollm2_loaded) -> None:
    smollm2_loaded.reset()
    first, s1 = _reply(smollm2_loaded)
    follow = [*QUESTION, ChatMessage("assistant", first), ChatMessage("user", "And three more?")]
    _, s2 = _reply(smollm2_loaded, follow)
    # Only the new suffix is evaluated on turn two; the first turn's prompt is reused.
    assert s2.prompt_evaluated < s2.prompt_tokens
    assert s2.prompt_evaluated < s2.prompt_tokens - s1.prompt_tokens + 8


@pytest.mark.slow
def test_streamed_reply_is_llama_cpp_pythons_chat_completion(smollm2_loaded) -> None:
    """The same tokens through create_completion as through llama-cpp-python's own chat
    handler with the GGUF's template: the replies are the same text."""
    smollm2_loaded.reset()
    ours, _ = _reply(smollm2_loaded)
    smollm2_loaded.reset()
    assert ours == reference_reply(smollm2_loaded, QUESTION, GREEDY)


@pytest.mark.slow
def test_chat_template_comes_from_the_gguf(smollm2_loaded, smollm2_path: Path) -> None:
    from localllm.gguf.spec import read_model_spec
    from localllm.templates.selection import choose_format

    fmt = choose_format(read_model_spec(smollm2_path), smollm2_path.name)
    assert (fmt.name, fmt.source, fmt.kind) == ("gguf", "gguf", "jinja")
    messages = [ChatMessage("system", "S"), ChatMessage("user", "U")]
    prompt = fmt.render(
        [{"role": m.role, "content": m.content} for m in messages],
        bos_token=smollm2_loaded.bos_text,
        eos_token=smollm2_loaded.eos_text,
    )
    assert prompt == reference_prompt(smollm2_loaded, messages)
    assert prompt.startswith("<|im_start|>system\nS<|im_end|>")
    assert "<|im_start|>user\nU<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_buffer_report_parsed_from_llama_cpp_log(smollm2_loaded) -> None:
    buffers = smollm2_loaded.buffers
    assert buffers.kv_cells == 2048
    assert buffers.kv_bytes == buffers.k_bytes + buffers.v_bytes
    assert buffers.weights_bytes and buffers.compute_bytes
    assert buffers.flash_attn is True
    lines = [ln for ln in smollm2_loaded.load_log if "KV buffer size" in ln]
    assert lines, "llama.cpp's KV line was not captured"


def test_parse_buffer_report_sums_devices() -> None:
    report = parse_buffer_report(
        [
            "load_tensors:   CPU_Mapped model buffer size =    10.00 MiB",
            "load_tensors:        Metal model buffer size =    20.00 MiB",
            "llama_kv_cache: size =   1.00 MiB (  256 cells,  2 layers,  1/1 seqs), "
            "K (f16):   0.50 MiB, V (f16):   0.50 MiB",
        ]
    )
    assert report.weights_bytes == 30 * 1024 * 1024
    assert (report.kv_cells, report.k_bytes) == (256, 512 * 1024)


def test_quantized_v_without_flash_attention_is_refused_before_loading() -> None:
    with pytest.raises(InvalidArgument, match="needs flash attention"):
        LoadOptions(type_v="q8_0", flash_attn=False).validate()


def test_llama_cpp_load_failure_is_a_domain_error(tmp_path: Path) -> None:
    from support.gguf_files import write_gguf

    broken = write_gguf(tmp_path / "no-weights.gguf", "mha-tiny")  # header, no tensors
    with pytest.raises(ModelLoadError, match=r"could not load no-weights\.gguf"):
        load_model(broken, LoadOptions(n_ctx=256))


def test_llama_cpp_is_not_imported_by_core_modules() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import localllm.cli, localllm.plan.memory, localllm.inventory.listing\n"
        "import localllm.store.resolver\n"
        "import localllm.runtime\n"
        "print('llama_cpp' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_kv_cache_type_registries_agree() -> None:
    """The ggml ids the runtime passes and the block sizes memory.py counts name one set."""
    from localllm.plan.memory import KV_TYPE_BLOCKS
    from localllm.runtime.params import KV_CACHE_TYPE_IDS as KV_CACHE_TYPES

    assert set(KV_CACHE_TYPES) == set(KV_TYPE_BLOCKS)
