"""Speculative decoding: the pure rules (fast), then the engine on the real SmolLM2 (slow)."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from localllm.errors import InvalidArgument
from localllm.runtime.speculation import (
    FIRST_DRAFT,
    FORCED_DRAFT,
    MAX_DRAFT,
    DecodeCost,
    DraftPolicy,
    NgramIndex,
    check_spec_mode,
    verify_draft,
)
from tests.support.llama_archs import arch_models

# ---------------------------------------------------------------------- the accept rule


def _rows(*peaks: int, n_vocab: int = 8) -> np.ndarray:
    """Logits whose argmax at position i is peaks[i] (a clear winner: no near-tie)."""
    rows = np.zeros((len(peaks), n_vocab))
    for i, peak in enumerate(peaks):
        rows[i, peak] = 5.0
    return rows


def test_greedy_accepts_drafts_while_they_are_the_argmax() -> None:
    logits = _rows(3, 1, 4, 1, 5)
    greedy = lambda i: int(logits[i].argmax())  # noqa: E731
    # All four drafts agree: four accepted, the fifth sample is the bonus token.
    assert verify_draft([3, 1, 4, 1], greedy).tokens == (3, 1, 4, 1, 5)
    assert verify_draft([3, 1, 4, 1], greedy).accepted == 4
    # The second draft is wrong: one accepted, and the target's own token replaces it.
    v = verify_draft([3, 2, 4, 1], greedy)
    assert (v.tokens, v.accepted) == ((3, 1), 1)
    # The first is wrong: nothing accepted, one token generated as without drafts.
    assert verify_draft([0, 1, 4], greedy) == verify_draft([], greedy)
    assert verify_draft([], greedy).tokens == (3,)


def test_sampling_accepts_a_draft_only_when_it_equals_the_sample() -> None:
    """Each position draws from the target's distribution with the chain's own generator;
    the tokens kept are exactly those a run without drafts draws, whatever the draft."""
    rng_logits = np.random.default_rng(0)
    logits = rng_logits.normal(size=(40, 6))  # flat-ish: samples often differ from argmax
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    def sampler(seed: int):
        rng = np.random.default_rng(seed)
        return lambda i: int(rng.choice(6, p=probs[i]))

    reference_draw = sampler(7)
    reference = [reference_draw(i) for i in range(40)]
    draft_rng = np.random.default_rng(1)
    for _ in range(50):
        draft = draft_rng.integers(0, 6, size=5).tolist()
        v = verify_draft(draft, sampler(7))
        assert list(v.tokens) == reference[: len(v.tokens)]
        # Accepted exactly the leading drafts equal to the samples, then one more sample.
        expected = next((i for i, t in enumerate(draft) if t != reference[i]), len(draft))
        assert v.accepted == expected
        assert len(v.tokens) == expected + 1


def test_a_reply_that_ends_stops_the_verification() -> None:
    logits = _rows(2, 2, 7)
    v = verify_draft([2, 2, 2], lambda i: None if i == 1 else int(logits[i].argmax()))
    assert (v.tokens, v.accepted) == ((2,), 1)


# ---------------------------------------------------------------------- drafting


def test_ngram_index_drafts_what_followed_the_tail_last_time() -> None:
    index = NgramIndex(sizes=(3, 2))
    index.extend([1, 2, 3, 4, 5, 6, 9, 1, 2, 3])
    assert index.draft(3) == [4, 5, 6]
    assert index.draft(10) == [4, 5, 6, 9, 1, 2, 3]  # up to the end of the history
    index.append(7)  # "2 3 7" was never seen, "3 7" neither: no draft
    assert index.draft(4) == []
    index.extend([5, 6])  # "7 5 6" unseen, "5 6" was followed by 9
    assert index.draft(2) == [9, 1]
    assert index.draft(0) == []


def test_the_longer_ngram_wins() -> None:
    index = NgramIndex(sizes=(3, 1))
    index.extend([8, 1, 2, 9, 8, 5, 2, 4, 1, 2])
    # "2" last came before 4; "1 2" ... the 3-gram "4 1 2" is new, so the 1-gram decides.
    assert index.draft(1) == [4]
    index = NgramIndex(sizes=(3, 1))
    index.extend([7, 1, 2, 9, 0, 2, 4, 7, 1, 2])
    assert index.draft(1) == [9]  # "7 1 2" matched: its follower, not the latest "2"'s


def test_the_index_says_whether_a_draft_would_echo_the_reply() -> None:
    index = NgramIndex(sizes=(3,), prompt=[1, 2, 3, 4, 5])
    index.extend([1, 2, 3])  # the reply starts copying the prompt
    assert not index.echoes_reply() and index.draft(2) == [4, 5]
    index.extend([9, 8, 7, 6, 9, 8, 7])  # then repeats its own words
    assert index.echoes_reply() and index.draft(1) == [6]
    index.append(0)
    assert not index.echoes_reply() and index.draft(1) == []  # no match: nothing either way


def test_decode_cost_recovers_fixed_and_per_token_seconds() -> None:
    cost = DecodeCost()
    assert not cost.known
    for n in [1, 1, 5, 1, 9, 1, 17, 1, 3, 1] * 5:
        cost.observe(n, 0.010 + 0.0005 * n)
    a, b = cost.coefficients()
    assert math.isclose(a, 0.010, rel_tol=1e-6) and math.isclose(b, 0.0005, rel_tol=1e-6)


def test_a_few_stretched_decodes_do_not_move_the_cost_fit() -> None:
    cost = DecodeCost()
    for i, n in enumerate([1, 1, 5, 1, 9, 1, 17, 1, 3, 1] * 4):
        stretch = 3.0 if i % 7 == 3 else 1.0  # a busy machine slows some decodes
        cost.observe(n, (0.010 + 0.0005 * n) * stretch)
    a, b = cost.coefficients()
    assert math.isclose(a, 0.010, rel_tol=0.1) and math.isclose(b, 0.0005, rel_tol=0.1)


def test_draft_length_follows_acceptance_and_backs_off_when_losing() -> None:
    cost = DecodeCost()
    for n in [1, 8] * 10:
        cost.observe(n, 0.010 + 0.001 * n)  # a token costs 11 ms alone, 1 ms more in a draft
    policy = DraftPolicy()
    first = policy.length(cost, generating=1)
    assert first >= 1
    for _ in range(5):  # everything accepted: drafts grow
        policy.record(first, first, cost, 1)
    assert policy.length(cost, 1) > first
    assert policy.drafted == policy.accepted == 5 * first
    for _ in range(8):  # everything rejected: the policy stops drafting for a while
        policy.record(8, 0, cost, 1)
    drafts, wasted = 0, 0
    for _ in range(300):
        if n := policy.length(cost, 1):
            drafts, wasted = drafts + 1, wasted + n
            policy.record(n, 0, cost, 1)  # and keeps losing
    assert drafts >= 1, "it probes again after a pause"
    # Each wasted drafted token costs b = 1 ms against 11 ms for a generated token: the
    # losing drafts over 300 tokens cost under 2% of their time.
    assert wasted * 0.001 < 0.02 * 300 * 0.011


def test_a_rejection_starts_the_ramp_again() -> None:
    cost = DecodeCost()
    for n in [1, 8] * 10:
        cost.observe(n, 0.010 + 0.001 * n)
    policy = DraftPolicy()
    for _ in range(6):  # a long copy: drafts grow to the most one step may verify
        n = policy.length(cost, 1)
        policy.record(n, n, cost, 1)
    long = policy.length(cost, 1)
    assert long == MAX_DRAFT
    policy.record(long, long - 3, cost, 1)  # the copy ended (an edit) three tokens early
    # The next copy may be short: drafting starts short again, not at what was accepted.
    assert 1 <= policy.length(cost, 1) <= FIRST_DRAFT


def test_drafts_that_echo_the_reply_keep_their_own_record() -> None:
    cost = DecodeCost()
    for n in [1, 8] * 10:
        cost.observe(n, 0.010 + 0.001 * n)
    policy = DraftPolicy()
    for _ in range(3):  # the reply's own phrases, drafted and rejected
        n = policy.length(cost, 1, echo=True)
        policy.record(n, 0, cost, 1)
    echo_drafts = policy.length(cost, 1, echo=True)
    assert policy.p < 0.3 and echo_drafts <= 1
    copy_drafts = policy.length(cost, 1, echo=False)  # a copy of the prompt: its own prior
    assert policy.p == 0.9 and copy_drafts == FIRST_DRAFT


def test_a_losing_echo_is_skipped_without_pausing_copies() -> None:
    cost = DecodeCost()
    for n in [1, 8] * 10:
        cost.observe(n, 0.010 + 0.012 * n)  # a drafted token: 55% of a lone decode
    policy = DraftPolicy()
    assert policy.length(cost, 1, echo=True) == 0  # p = 0.5 does not pay for it
    assert policy.length(cost, 1, echo=False) >= 1  # p = 0.9 does, at once


def test_more_busy_slots_make_drafts_shorter() -> None:
    cost = DecodeCost()
    for n in [1, 2, 4, 8, 16, 32] * 5:
        cost.observe(n, 0.010 + 0.004 * n)
    policy = DraftPolicy()
    alone, crowded = policy.length(cost, 1), policy.length(cost, 16)
    assert alone > crowded >= 1


def test_forced_ngram_drafts_whatever_it_costs() -> None:
    policy = DraftPolicy(forced=True)
    cost = DecodeCost()
    for _ in range(10):
        policy.record(16, 0, cost, 1)
    assert policy.length(cost, 64) == FORCED_DRAFT


def test_spec_mode_values_are_checked_in_one_line() -> None:
    assert check_spec_mode("auto") == "auto"
    assert check_spec_mode("auto", "draft.gguf") == "auto"
    with pytest.raises(InvalidArgument, match="--spec 'fast' is not one of: auto, off, ngram"):
        check_spec_mode("fast")
    with pytest.raises(InvalidArgument, match="--draft drafts with a model, --spec off"):
        check_spec_mode("off", "draft.gguf")


# ---------------------------------------------------------------------- the engine

REWRITE = (
    "<|im_start|>user\nRewrite this code with the parameter renamed from x to value:\n"
    + "\n".join(f"def scale_{i}(x):\n    return x * {i} + {3 * i}" for i in range(10))
    + "<|im_end|>\n<|im_start|>assistant\n"
)


def _generate(engine, text: str, max_tokens: int = 120, **params):
    from localllm.runtime.batch_records import GenerationParams, run_request

    prompt = engine.tokenize(text, add_bos=False)
    params = {"temperature": 0.0, **params}
    return run_request(engine, prompt, GenerationParams(max_tokens=max_tokens, **params), 600)


def _cells(engine) -> tuple[int, int]:
    import llama_cpp

    memory = llama_cpp.llama_get_memory(engine.context_handle)
    return (
        int(llama_cpp.llama_memory_seq_pos_min(memory, 0)),
        int(llama_cpp.llama_memory_seq_pos_max(memory, 0)),
    )


@pytest.fixture(scope="module")
def engines(smollm2_path: Path):
    from localllm.runtime.batch_engine import BatchEngine
    from localllm.runtime.params import LoadOptions

    options = LoadOptions(n_ctx=2048, n_threads=2)
    loaded = {mode: BatchEngine.load(smollm2_path, options, spec=mode) for mode in ("off", "ngram")}
    yield loaded
    for engine in loaded.values():
        engine.close()


@pytest.mark.slow
def test_greedy_replies_are_equal_with_and_without_drafts(engines) -> None:
    off = _generate(engines["off"], REWRITE)
    on = _generate(engines["ngram"], REWRITE)
    assert off.draft_n == 0
    assert on.draft_n > 0 and on.draft_n_accepted > 10, "the rewrite must be drafted"
    assert on.text == off.text
    assert on.completion_tokens == off.completion_tokens


@pytest.mark.slow
def test_rollback_leaves_the_cache_as_a_run_that_never_drafted(engines) -> None:
    """Rejected drafts' cells are removed: the same cells, at the same positions."""
    for engine in engines.values():
        engine.forget(0)
    off = _generate(engines["off"], REWRITE, max_tokens=80)
    on = _generate(engines["ngram"], REWRITE, max_tokens=80)
    assert on.draft_n > on.draft_n_accepted, "some drafts must have been rejected"
    held_off, held_on = engines["off"].held(0), engines["ngram"].held(0)
    assert held_on == held_off
    assert _cells(engines["ngram"]) == _cells(engines["off"]) == (0, len(held_off) - 1)
    # And a second turn that extends the conversation reuses every cell either way.
    follow = REWRITE + off.text + "<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n"
    again = [_generate(engines[m], follow, max_tokens=8) for m in ("off", "ngram")]
    assert again[0].cached_tokens == again[1].cached_tokens > len(held_off) // 2
    assert again[0].text == again[1].text


@pytest.mark.slow
def test_seeded_sampling_draws_the_same_reply_with_drafts(engines) -> None:
    """A draft is accepted only when it equals the chain's own sample: the same seed
    gives the same reply (batched logits equal here: no near-ties at these positions)."""
    kwargs = {"temperature": 0.7, "seed": 5, "max_tokens": 60}
    off = _generate(engines["off"], REWRITE, **kwargs)
    on = _generate(engines["ngram"], REWRITE, **kwargs)
    assert on.draft_n > 0
    assert on.text == off.text


@pytest.fixture(scope="module")
def archs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return arch_models(tmp_path_factory)


@pytest.mark.slow
def test_a_draft_model_with_another_vocabulary_is_refused_in_one_line(
    smollm2_path: Path, archs: Path
) -> None:
    from localllm.runtime.batch_engine import BatchEngine
    from localllm.runtime.params import LoadOptions

    with pytest.raises(InvalidArgument) as refused:
        BatchEngine.load(smollm2_path, LoadOptions(n_ctx=512), draft=archs / "llama-dense.gguf")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("--draft llama-dense.gguf cannot draft for this model: its ")


@pytest.mark.slow
def test_a_draft_model_drafts_and_keeps_the_greedy_reply(smollm2_path: Path, engines) -> None:
    from localllm.runtime.batch_engine import BatchEngine
    from localllm.runtime.params import LoadOptions

    engine = BatchEngine.load(smollm2_path, LoadOptions(n_ctx=2048), draft=smollm2_path)
    try:
        done = _generate(engine, REWRITE, max_tokens=40)
    finally:
        engine.close()
    assert done.draft_n_accepted > 0  # the model drafting for itself: mostly right
    assert done.text == _generate(engines["off"], REWRITE, max_tokens=40).text


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mamba-dense", "jamba-dense"])
def test_models_that_cannot_roll_back_run_without_speculation(archs: Path, arch: str) -> None:
    from localllm.runtime.batch_engine import BatchEngine
    from localllm.runtime.params import LoadOptions

    engine = BatchEngine.load(archs / f"{arch}.gguf", LoadOptions(n_ctx=256), spec="ngram")
    try:
        assert engine.spec == "off"
        assert engine.spec_note == (
            "speculative decoding is off: this model's memory cannot roll back"
        )
        done = _generate(engine, "a b c a b c a b c", max_tokens=8, ignore_eos=True)
        assert done.draft_n == 0 and done.completion_tokens == 8
    finally:
        engine.close()


# ---------------------------------------------------------------------- the command line

CHAT_FLAGS = ("--temp", "0", "--seed", "11", "--max-tokens", "48", "--ctx", "2048", "--json")
ASK = "Repeat this line exactly: the quick brown fox jumps over the lazy dog, twice."


@pytest.mark.slow
def test_spec_off_is_the_path_without_drafts_and_ngram_keeps_its_reply(
    store_with_smollm2: Path, cli
) -> None:
    """`--spec off` never drafts and prints what the llama-cpp-python reference printed
    (tests/test_chat.py holds the default against it); `--spec ngram` drafts and keeps it."""
    runs = {mode: cli("chat", "-p", ASK, *CHAT_FLAGS, "--spec", mode) for mode in ("off", "ngram")}
    data = {mode: json.loads(run.stdout) for mode, run in runs.items()}
    assert data["off"]["stats"]["draft_n"] == 0
    assert data["ngram"]["stats"]["draft_n"] > 0
    assert data["ngram"]["reply"] == data["off"]["reply"]
    assert data["ngram"]["settings"]["runtime"]["spec"] == "ngram"


def test_bad_spec_flags_are_one_line_before_loading(cli) -> None:
    bad = cli("chat", "-p", "hi", "--spec", "fast")
    assert bad.exit_code != 0
    assert (
        bad.stderr.strip()
        .splitlines()[-1]
        .endswith("--spec 'fast' is not one of: auto, off, ngram")
    )
    both = cli("serve", "--spec", "off", "--draft", "x.gguf")
    assert both.exit_code != 0
    assert "--draft drafts with a model, --spec off says otherwise" in both.stderr


def test_serve_timings_carry_draft_counts_as_llama_server() -> None:
    from localllm.runtime.batch_records import GenerationDone
    from localllm.serve.wire import timings

    done = GenerationDone("hi", "stop", 10, 2, 30, 0.0, 0.1, 0.5, 0, 24, 20)
    assert (timings(done)["draft_n"], timings(done)["draft_n_accepted"]) == (24, 20)
    plain = GenerationDone("hi", "stop", 10, 2, 30, 0.0, 0.1, 0.5, 0)
    assert "draft_n" not in timings(plain)  # llama-server leaves them out without drafts


@pytest.mark.slow
def test_a_draft_model_counts_in_the_memory_check(smollm2_path: Path) -> None:
    from dataclasses import replace

    from localllm.errors import InsufficientMemory
    from localllm.gguf.spec import read_model_spec
    from localllm.plan.need import check_with_draft
    from localllm.plan.preload import plan_load

    spec = read_model_spec(smollm2_path)
    target = plan_load("smollm2", spec, n_ctx=2048).need
    draft = plan_load("small", spec, n_ctx=512).need
    both = target.total_bytes + draft.total_bytes
    assert draft.total_bytes > 0
    check_with_draft(replace(target, available_bytes=both), draft)  # exactly fits
    with pytest.raises(InsufficientMemory, match=r"^smollm2 with the draft model small needs "):
        check_with_draft(replace(target, available_bytes=both - 1), draft)


def test_the_status_line_says_how_many_drafts_were_accepted() -> None:
    from localllm.generation import GenerationStats
    from localllm.views.chat import format_turn_status

    stats = GenerationStats("x", "stop", 40, 40, 120, 0.1, 1.0, 0.1, 160, 2048)
    assert "drafts" not in format_turn_status(stats, None)
    drafted = GenerationStats(
        "x", "stop", 40, 40, 120, 0.1, 1.0, 0.1, 160, 2048, draft_n=90, draft_n_accepted=71
    )
    assert format_turn_status(drafted, None).endswith(" · drafts 71/90 accepted")


@pytest.mark.slow
def test_two_busy_slots_draft_and_keep_their_replies(smollm2_path: Path, engines) -> None:
    """Drafts of two slots in one decode: each slot's rollback leaves the other alone."""
    from localllm.runtime.batch_engine import BatchEngine
    from localllm.runtime.batch_records import GenerationDone, GenerationParams
    from localllm.runtime.params import LoadOptions

    other = REWRITE.replace("renamed from x to value", "renamed from x to amount")
    expected = [_generate(engines["off"], text, max_tokens=60).text for text in (REWRITE, other)]
    engine = BatchEngine.load(smollm2_path, LoadOptions(n_ctx=4096), 2, spec="ngram")
    try:
        done: list[GenerationDone] = []
        finished = threading.Semaphore(0)

        def sink(event: object) -> None:
            if isinstance(event, GenerationDone):
                done.append(event)
                finished.release()

        for text in (REWRITE, other):
            prompt = engine.tokenize(text, add_bos=False)
            engine.submit(prompt, GenerationParams(max_tokens=60, temperature=0.0), sink)
        assert finished.acquire(timeout=600) and finished.acquire(timeout=600)
    finally:
        engine.close()
    assert {d.slot for d in done} == {0, 1}
    assert all(d.draft_n_accepted > 0 for d in done)
    assert sorted(d.text for d in done) == sorted(expected)
