"""Embeddings: the request checks (fast), the runtime against llama.cpp's own llama-embedding,
POST /v1/embeddings through the openai client and ``localllm embed`` (slow)."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import openai
import pytest
from conftest import NATIVE_BIN, native_prerequisite

from localllm.errors import ContextOverflow, InvalidArgument
from localllm.runtime.embeddings import Embedder
from localllm.runtime.params import LoadOptions
from localllm.serve import RunningServer, ServeOptions, start_server
from localllm.serve.embeddings import MAX_INPUTS, parse_embeddings_request
from localllm.serve.schema import ApiError

MODEL = "smollm2-135m"
# llama-embedding as the issue names it: mean pooling, L2 normalization, JSON out.
NATIVE_FLAGS = ("--pooling", "mean", "--embd-normalize", "2", "--embd-output-format", "json")
NATIVE_FLAGS += ("-c", "256")
TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "def f(x): return x"]


# --------------------------------------------------------------------- request checks


def body(**fields: object) -> bytes:
    return json.dumps({"input": "hi", **fields}).encode()


def test_inputs_of_every_shape_are_read() -> None:
    assert parse_embeddings_request(body()).inputs == ("hi",)
    assert parse_embeddings_request(body(input=["a", "b"])).inputs == ("a", "b")
    assert parse_embeddings_request(body(input=[1, 2])).inputs == ((1, 2),)
    assert parse_embeddings_request(body(input=[[1], [2, 3]])).inputs == ((1,), (2, 3))
    req = parse_embeddings_request(body(encoding_format="base64", model="m", user="u"))
    assert (req.encoding_format, req.model) == ("base64", "m")


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"dimensions": 64}, "dimensions", "model's own size"),
        ({"encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
        ({"input": None}, "input", "must be a string"),
        ({"input": ""}, "input[0]", "non-empty"),
        ({"input": ["a", 3]}, "input[1]", "non-empty string or a list of token ids"),
        ({"input": ["a"] * (MAX_INPUTS + 1)}, "input", f"at most {MAX_INPUTS}"),
        ({"truncate": True}, "truncate", "unsupported parameter"),
    ],
)
def test_bad_embedding_requests_are_400s_naming_the_field(
    fields: dict[str, object], param: str, fragment: str
) -> None:
    with pytest.raises(ApiError) as info:
        parse_embeddings_request(body(**fields))
    assert (info.value.status, info.value.param) == (400, param)
    assert fragment in info.value.message


# --------------------------------------------------------------------- the runtime


@pytest.fixture(scope="module")
def embedder(smollm2_path: Path) -> Iterator[Embedder]:
    with Embedder.load(smollm2_path, n_ctx=256) as loaded:
        yield loaded


def cosine(a: object, b: object) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.slow
def test_vectors_are_normalized_and_pooled_by_mean(embedder: Embedder) -> None:
    result = embedder.embed(TEXTS)
    assert embedder.pooling == "mean"  # SmolLM2's GGUF names no pooling
    assert len(result.vectors) == 3 and all(len(v) == embedder.n_embd for v in result.vectors)
    for v in result.vectors:
        assert abs(np.linalg.norm(v) - 1.0) < 1e-6
    assert result.prompt_tokens == sum(len(embedder.tokenize(t)) for t in TEXTS)


@pytest.mark.slow
def test_a_batch_equals_one_input_at_a_time_and_tokens_equal_text(embedder: Embedder) -> None:
    batch = embedder.embed(TEXTS).vectors
    for text, vector in zip(TEXTS, batch, strict=True):
        assert cosine(embedder.embed([text]).vectors[0], vector) > 0.9999
    tokens = embedder.tokenize(TEXTS[0])
    assert cosine(embedder.embed([tokens]).vectors[0], batch[0]) > 0.9999
    assert cosine(batch[0], batch[1]) < 0.99  # different texts, different vectors


@pytest.mark.slow
def test_an_input_over_the_context_is_refused_not_truncated(embedder: Embedder) -> None:
    with pytest.raises(ContextOverflow, match="over the embeddings context of 256"):
        embedder.embed(["word " * 400])
    with pytest.raises(InvalidArgument, match="not in the vocabulary"):
        embedder.embed([[embedder.n_vocab]])


@pytest.mark.slow
def test_serve_embeds_on_the_engines_own_weights(embedder: Embedder, smollm2_path: Path) -> None:
    """serve's embeddings context is made on the generation engine's model (no second load,
    no second repacked copy): the same vectors as a model loaded for embeddings alone, and
    closing it leaves the engine's weights to the engine, which still generates."""
    from localllm.runtime.batch_engine import BatchEngine
    from localllm.runtime.batch_records import GenerationParams, run_request

    engine = BatchEngine.load(smollm2_path, LoadOptions(n_ctx=512), spec="off")
    try:
        shared = Embedder.load(smollm2_path, n_ctx=256, model=engine.model_handle)
        assert not shared.owns_model and embedder.owns_model
        for a, b in zip(shared.embed(TEXTS).vectors, embedder.embed(TEXTS).vectors, strict=True):
            assert cosine(a, b) > 0.99999
        shared.close()
        prompt = engine.tokenize("The capital of France is", add_bos=True)
        done = run_request(engine, prompt, GenerationParams(max_tokens=8, temperature=0.0), 60)
        assert done.completion_tokens > 0
    finally:
        engine.close()


@pytest.mark.slow
def test_vectors_match_native_llama_embedding(embedder: Embedder, smollm2_path: Path) -> None:
    native = native_prerequisite(NATIVE_BIN / "llama-embedding", "native llama-embedding")
    for text in TEXTS[:2]:
        proc = subprocess.run(
            [str(native), "-m", str(smollm2_path), "-p", text, *NATIVE_FLAGS],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        reference = json.loads(proc.stdout)["data"][0]["embedding"]
        assert cosine(embedder.embed([text]).vectors[0], reference) >= 0.999


# --------------------------------------------------------------------- serve and CLI


@pytest.fixture(scope="module")
def server(smollm2_path: Path) -> Iterator[RunningServer]:
    options = ServeOptions(
        model_path=smollm2_path, model_id=MODEL, port=0, parallel=1, load=LoadOptions(n_ctx=256)
    )
    with start_server(options) as running:
        yield running


@pytest.mark.slow
def test_the_endpoint_answers_floats_and_base64_as_openai(
    server: RunningServer, embedder: Embedder
) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert floats.usage.prompt_tokens == sum(len(embedder.tokenize(t)) for t in TEXTS)
    expected = embedder.embed(TEXTS).vectors
    for item, vector in zip(floats.data, expected, strict=True):
        assert cosine(item.embedding, vector) > 0.9999
    raw = client.embeddings.with_raw_response.create(
        model=MODEL, input=TEXTS[0], encoding_format="base64"
    )
    encoded = json.loads(raw.content)["data"][0]["embedding"]
    decoded = struct.unpack(f"<{embedder.n_embd}f", base64.b64decode(encoded))
    assert cosine(decoded, expected[0]) > 0.9999


@pytest.mark.slow
def test_the_endpoint_refuses_what_it_cannot_do(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    for fields, param in [
        ({"input": "word " * 400}, "input"),
        ({"input": "x", "dimensions": 64}, "dimensions"),
        ({"input": "x", "model": "gpt-4"}, "model"),
    ]:
        with pytest.raises(openai.APIStatusError) as info:
            client.embeddings.create(**{"model": MODEL, **fields})
        assert info.value.status_code in (400, 404) and info.value.body["param"] == param


@pytest.mark.slow
def test_embed_prints_json_vectors(cli, smollm2_path: Path, embedder: Embedder) -> None:
    result = cli("embed", str(smollm2_path), TEXTS[0], TEXTS[1], "--ctx", "256")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["pooling"], data["dimensions"]) == ("mean", embedder.n_embd)
    assert [d["text"] for d in data["data"]] == TEXTS[:2]
    assert cosine(data["data"][1]["embedding"], embedder.embed([TEXTS[1]]).vectors[0]) > 0.9999
    too_long = cli("embed", str(smollm2_path), "word " * 400, "--ctx", "256")
    assert too_long.exit_code != 0
    assert "over the embeddings context of 256" in too_long.error_line


# --------------------------------------------------------------------- memory


@pytest.mark.slow
@pytest.mark.parametrize("n_ctx", [4096, 1000])
def test_the_embeddings_context_is_planned_to_its_allocation(
    smollm2_path: Path, n_ctx: int
) -> None:
    """serve counts the context before it is made (plan.embeddings_plan): its KV, compute
    and output bytes are the ones llama.cpp then allocates (its log, to 0.01 MiB)."""
    from localllm.plan.embeddings_plan import plan_embeddings_context
    from localllm.runtime.log import log_mark, log_since, parse_buffer_report

    plan = plan_embeddings_context(smollm2_path, n_ctx)
    mark = log_mark()
    real = Embedder.load(smollm2_path, n_ctx=n_ctx, threads=1)
    try:
        logged = parse_buffer_report(log_since(mark))
        assert real.n_ctx == plan.n_ctx == -(-n_ctx // 256) * 256
    finally:
        real.close()
    pairs = [
        (plan.kv_bytes, logged.kv_bytes),
        (plan.compute_bytes, logged.compute_bytes),
        (plan.output_bytes, logged.output_bytes),
    ]
    for planned, allocated in pairs:
        assert planned is not None and allocated is not None
        assert abs(planned - allocated) <= 0.005 * (1 << 20), pairs
    assert plan.compute_bytes > 8 * plan.kv_bytes  # a --ctx-token ubatch: the bulk of it


@pytest.mark.slow
def test_a_context_size_that_16_sequences_do_not_divide_embeds(
    cli, smollm2_path: Path, embedder: Embedder
) -> None:
    """--ctx 1000 made llama.cpp's pooling graph trip a GGML_ASSERT and abort the process
    (a ubatch 16 sequences do not divide): the context is rounded up to 256 now."""
    result = cli("embed", str(smollm2_path), TEXTS[0], "--ctx", "1000")
    assert result.exit_code == 0, result.stderr
    vector = json.loads(result.stdout)["data"][0]["embedding"]
    assert cosine(vector, embedder.embed([TEXTS[0]]).vectors[0]) > 0.9999


@pytest.mark.slow
def test_serve_counts_the_embeddings_context_before_making_it(smollm2_path: Path) -> None:
    from localllm.plan.embeddings_plan import plan_embeddings_context

    need = plan_embeddings_context(smollm2_path, 512).total_bytes
    base = ServeOptions(
        model_path=smollm2_path, model_id=MODEL, port=0, parallel=1, load=LoadOptions(n_ctx=512)
    )
    with start_server(base) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        client.embeddings.create(model=MODEL, input=TEXTS[0])
        card = client.models.retrieve(MODEL).model_dump()
        assert card["meta"]["embeddings_bytes"] == need
    small = replace(base, memory_budget=need - 1)  # the context alone does not fit
    with start_server(small) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            client.embeddings.create(model=MODEL, input=TEXTS[0])
        assert info.value.status_code == 507
        assert "embeddings context needs" in info.value.body["message"]
        reply = client.chat.completions.create(  # the model itself still answers
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
