"""A grammar beside the sampler chain (batch_llama.RequestSampler), checked against
llama-cpp-python's grammar inside its chain on the real model: the same greedy reply,
the grammar's tokens only when the model's own pick is refused.

The speed (a JSON reply at free text's speed, where the grammar in the chain halved it)
is benchmarks/grammar.py's to show, not a test's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from llama_cpp.llama_grammar import JSON_GBNF

from localllm.runtime.batch_engine import BatchEngine
from localllm.runtime.batch_records import GenerationDone, GenerationParams, run_request
from localllm.runtime.params import LoadOptions

PROMPT = (
    "<|im_start|>user\nDescribe a person (name, age, city, three hobbies, employer) as a "
    "JSON object.<|im_end|>\n<|im_start|>assistant\n"
)
YES_NO = 'root ::= "yes" | "no"'


@pytest.fixture(scope="module")
def engine(smollm2_path: Path):
    loaded = BatchEngine.load(smollm2_path, LoadOptions(n_ctx=1024), spec="off")
    yield loaded
    loaded.close()


def generate(engine: BatchEngine, text: str, **params: Any) -> GenerationDone:
    engine.forget(0)
    prompt = engine.tokenize(text, add_bos=False)
    return run_request(engine, prompt, GenerationParams(**{"max_tokens": 96, **params}), 120)


def test_a_json_reply_equals_the_grammar_in_the_chain(
    engine: BatchEngine, smollm2_loaded: Any
) -> None:
    from llama_cpp import LlamaGrammar

    ours = generate(engine, PROMPT, temperature=0.0, grammar=JSON_GBNF, max_tokens=128)
    reference = smollm2_loaded.llama.create_completion(
        PROMPT,
        max_tokens=128,
        temperature=0.0,
        repeat_penalty=1.0,
        grammar=LlamaGrammar.from_string(JSON_GBNF, verbose=False),
    )["choices"][0]["text"]
    assert ours.text == reference
    assert ours.finish_reason == "stop"  # the object closed: the grammar let EOS through
    assert isinstance(json.loads(ours.text), dict)


def test_a_refused_pick_is_replaced_by_an_allowed_token(engine: BatchEngine) -> None:
    """The model's own first pick here is not "yes" or "no": greedy and sampled replies
    are still one of the two, and the free reply shows it would have said otherwise."""
    free = generate(engine, PROMPT, temperature=0.0, max_tokens=4)
    assert free.text not in ("yes", "no")
    assert generate(engine, PROMPT, temperature=0.0, grammar=YES_NO).text in ("yes", "no")
    for seed in range(3):
        sampled = generate(engine, PROMPT, temperature=1.0, seed=seed, grammar=YES_NO)
        assert sampled.text in ("yes", "no")
