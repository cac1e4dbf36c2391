"""Chat with every chat GGUF, template-less ones included; --raw for base models (issue 12).

The files are copies of the real SmolLM2 made in the test session (tests/support/gguf_files.py) with
their chat template removed and sometimes general.name changed. The references are
independent of localllm: llama.cpp's own ``llama_chat_apply_template`` and tokenizer (called
here through llama-cpp-python's bindings), llama-cpp-python's ``Llama.create_completion`` and
Jinja2ChatFormatter, and Meta's Llama-2 chat encoding (llama/generation.py) written out below.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import pexpect
import pytest
from conftest import REPO
from support.gguf_files import gguf_with_chat_template

from localllm.chat.opening import ChatRequest, open_session
from localllm.generation import ChatMessage
from localllm.gguf.spec import ModelSpec, read_model_spec
from localllm.runtime import SamplingOptions
from localllm.store.model_store import ModelStore
from localllm.templates.selection import PUBLISHED, choose_format, recognize

pytestmark = pytest.mark.slow

LLAMA_CPP_TREE = REPO / "benchmarks/build/llama_cpp_python-0.3.36/vendor/llama.cpp"
LLAMA_SPM_VOCAB = LLAMA_CPP_TREE / "models/ggml-vocab-llama-spm.gguf"
THREADS = 2
GREEDY = ("--temp", "0", "--seed", "1", "--max-tokens", "24", "--ctx", "2048")
GREEDY_FLAGS = (*GREEDY, "--threads", str(THREADS))
SYSTEM, USER1, ANSWER1, USER2 = "You are terse.", "Hi there", "Hello! How can I help?", "2+2?"
QUESTION = "Name three colours."
MessageList = list[dict[str, str]]


def conversation(system: bool = True) -> MessageList:
    head = [{"role": "system", "content": SYSTEM}] if system else []
    return [
        *head,
        {"role": "user", "content": USER1},
        {"role": "assistant", "content": ANSWER1},
        {"role": "user", "content": USER2},
    ]


# -- references: llama.cpp and llama-cpp-python, called directly


def llama_cpp_builtin_names() -> list[str]:
    """llama.cpp's built-in template names, from llama_chat_builtin_templates."""
    names = (ctypes.c_char_p * 256)()
    count = llama_cpp.llama_chat_builtin_templates(names, 256)
    return [names[i].decode() for i in range(count)]


def llama_cpp_apply(name: str, messages: Sequence[dict[str, str]]) -> str:
    """llama.cpp's llama_chat_apply_template(name, messages, add_ass=true)."""
    encoded = [(m["role"].encode(), m["content"].encode()) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(encoded))()
    for i, (role, content) in enumerate(encoded):
        chat[i].role, chat[i].content = role, content
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(name.encode(), chat, len(encoded), True, buf, 1 << 16)
    assert 0 < n < 1 << 16, (name, n)
    return buf.raw[:n].decode()


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Callable[..., Path]:
    """Make (once per module) a SmolLM2 copy without a chat template, other keys as given."""
    folder = tmp_path_factory.mktemp("copies")
    made: dict[tuple[Any, ...], Path] = {}

    def make(file_name: str, template: str | None = None, **strings: str | None) -> Path:
        key = (file_name, template, tuple(sorted(strings.items())))
        if key not in made:
            where = folder / str(len(made))  # one folder per copy: names may repeat
            where.mkdir()
            made[key] = gguf_with_chat_template(
                smollm2_path, where / file_name, template, **strings
            )
        return made[key]

    return make


@pytest.fixture(scope="module")
def plain(copies: Callable[..., Path]) -> Path:
    """SmolLM2 without its template, under a name the catalog and the rules do not know."""
    path = copies("plain-135m.gguf")
    assert read_model_spec(path).chat_template is None
    return path


@pytest.fixture(scope="module")
def reference_llama(plain: Path) -> Iterator[Any]:
    """llama-cpp-python's Llama on the template-less copy, loaded as chat loads it."""
    llm = llama_cpp.Llama(
        model_path=str(plain),
        n_ctx=2048,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        flash_attn=True,
        seed=1,
        verbose=False,
    )
    yield llm
    llm.close()


def reference_completion(llm: Any, prompt: str | list[int], stop: Sequence[str] = ()) -> str:
    """llama-cpp-python's plain completion at temperature 0, chat's sampling defaults."""
    llm.reset()
    out = llm.create_completion(
        prompt=prompt,
        max_tokens=24,
        temperature=0.0,
        top_p=0.95,
        top_k=40,
        min_p=0.05,
        repeat_penalty=1.0,
        seed=1,
        stop=list(stop),
    )
    return str(out["choices"][0]["text"])


def tokens(llm: Any, text: str, *, add_bos: bool) -> list[int]:
    return list(llm.tokenize(text.encode(), add_bos=add_bos, special=True))


def said(stderr: str, note: str) -> int:
    """How many stderr lines are exactly ``note``."""
    return sum(1 for line in stderr.splitlines() if line.strip() == note)


# -- the order: --template, GGUF, catalog, recognized, none


def test_no_template_and_no_rule_is_one_line_naming_template_and_raw(plain: Path, cli) -> None:
    result = cli("chat", str(plain), "-p", "hi")
    assert result.exit_code == 2
    line = result.error_line
    assert line.startswith("plain-135m.gguf has no chat template in its GGUF")
    assert "--template NAME" in line and "--raw" in line
    assert "loaded" not in result.stderr  # refused before the model loads


def test_template_name_chats_with_llama_cpps_format(plain: Path, reference_llama, cli) -> None:
    result = cli(
        "chat", str(plain), "--template", "chatml", "--system", SYSTEM, "-p", QUESTION,
        *GREEDY_FLAGS,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    prompt = tokens(reference_llama, llama_cpp_apply("chatml", messages), add_bos=True)
    expected = reference_completion(reference_llama, prompt, stop=["<|im_end|>"])
    assert expected.strip()
    assert result.stdout == expected + "\n"
    assert said(result.stderr, "chat template: chatml (--template)") == 1


@pytest.mark.parametrize("name", ["llama2", "llama2-sys", "llama2-sys-bos", "mistral-v1", "chatml"])
def test_template_name_prompt_is_llama_chat_apply_templates(
    name: str, plain: Path, reference_llama, cli
) -> None:
    """Two turns with a system prompt: the session evaluates exactly llama.cpp's prompt."""
    sampling = SamplingOptions(temperature=0.0, seed=1, max_tokens=8)
    request = ChatRequest(str(plain), sampling, n_ctx=2048, system=SYSTEM, template=name)
    session = open_session(request)
    try:
        assert (session.chat_format.name, session.chat_format.source) == (name, "--template")
        session.restore([ChatMessage("user", USER1), ChatMessage("assistant", ANSWER1)])
        messages = session.messages(ChatMessage("user", USER2))
        expected = llama_cpp_apply(name, conversation())
        as_dicts = [{"role": m.role, "content": m.content} for m in messages]
        assert as_dicts == conversation()
        rendered = session.chat_format.render(as_dicts, bos_token="", eos_token="")
        assert rendered == expected
        assert session.prompt_tokens(messages) == tokens(reference_llama, expected, add_bos=True)
    finally:
        session.close()

    # The CLI evaluates the same prompt: one turn, counted by llama.cpp.
    result = cli(
        "chat", str(plain), "--template", name, "--system", SYSTEM, "-p", USER1, "--json",
        "--temp", "0", "--max-tokens", "2", "--ctx", "2048",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    one_turn = llama_cpp_apply(name, conversation()[:2])
    # prompt_evaluated is llama.cpp's own count (n_p_eval) on a fresh context.
    evaluated = data["stats"]["prompt_evaluated"]
    assert evaluated == len(tokens(reference_llama, one_turn, add_bos=True))
    assert data["settings"]["template"] == {"name": name, "source": "--template"}


def test_template_file_renders_like_llama_cpp_pythons_formatter(
    plain: Path, smollm2_path: Path, reference_llama, tmp_path: Path, cli
) -> None:
    """SmolLM2's own template as a --template FILE: llama-cpp-python's Jinja2ChatFormatter."""
    text = read_model_spec(smollm2_path).chat_template
    assert text is not None
    template_file = tmp_path / "smollm2.jinja"
    template_file.write_text(text, encoding="utf-8")
    result = cli("chat", str(plain), "--template", str(template_file), "-p", QUESTION, "--json",
                 *GREEDY_FLAGS)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["settings"]["template"] == {"name": str(template_file), "source": "--template"}
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=text, eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    prompt = formatter(messages=[{"role": "user", "content": QUESTION}]).prompt
    expected = reference_completion(
        reference_llama, tokens(reference_llama, prompt, add_bos=False), stop=["<|im_end|>"]
    )
    assert data["reply"] == expected and expected.strip()


@pytest.mark.parametrize(
    ("alias", "template"), [("smollm2-135m", "chatml"), ("llama-2-7b-chat", "llama-2-chat")]
)
def test_catalog_template_for_a_file_the_store_recorded_under_an_alias(
    alias: str, template: str, plain: Path, cli
) -> None:
    store = ModelStore()
    staged = store.temp_dir() / "staged.gguf"
    shutil.copyfile(plain, staged)
    store.install(staged, "my-chat.Q4_1.gguf", expected_sha256=None, alias=alias)
    result = cli("chat", "my-chat.Q4_1.gguf", "-p", "hi", "--json", "--max-tokens", "4")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["settings"]["template"] == {
        "name": template,
        "source": "catalog",
    }
    assert said(result.stderr, f"chat template: {template} (catalog)") == 1


def test_catalog_alias_of_a_template_less_llama_2_chat_file_needs_no_flag(
    plain: Path, isolated_paths: Path, cli
) -> None:
    """`localllm pull llama-2-7b-chat:Q4_K_M && localllm chat llama-2-7b-chat`, file stood in."""
    isolated_paths.mkdir(parents=True, exist_ok=True)
    (isolated_paths / "llama-2-7b-chat.Q4_K_M.gguf").symlink_to(plain)
    result = cli("chat", "llama-2-7b-chat", "-p", "hi", "--json", "--max-tokens", "4")
    assert result.exit_code == 0, result.stderr
    template = json.loads(result.stdout)["settings"]["template"]
    assert template == {"name": "llama-2-chat", "source": "catalog"}


@pytest.mark.parametrize(
    ("general_name", "template"),
    [
        ("Llama 2 7B Chat", "llama-2-chat"),
        ("mistralai_mistral-7b-instruct-v0.1", "mistral-instruct"),
    ],
)
def test_recognized_from_general_name(
    general_name: str, template: str, copies: Callable[..., Path], cli
) -> None:
    path = copies("model-a.gguf", general__name=general_name)
    result = cli("chat", str(path), "-p", "hi", "--json", "--max-tokens", "4")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["settings"]["template"] == {
        "name": template,
        "source": "recognized",
    }
    assert said(result.stderr, f"chat template: {template} (recognized)") == 1


def test_a_base_model_is_never_guessed(copies: Callable[..., Path], cli) -> None:
    # TheBloke's base Llama-2 files carry the same general.name as the chat ones.
    path = copies("llama-2-7b.Q4_0.gguf", general__name="LLaMA v2")
    result = cli("chat", str(path), "-p", "hi")
    assert result.exit_code == 2
    assert "llama-2-7b.Q4_0.gguf has no chat template" in result.error_line


@pytest.fixture(scope="module")
def smollm2_spec(smollm2_path: Path) -> ModelSpec:
    return read_model_spec(smollm2_path)


# The README's table of recognition rules, row by row, with real converters' metadata
# (TheBloke's files: general.name "LLaMA v2" for base and chat alike,
# "mistralai_mistral-7b-instruct-v0.1"; llama.cpp's convert_hf_to_gguf: general.basename).
RULES = [
    ("llama", "LLaMA v2", None, "llama-2-7b-chat.Q4_K_M.gguf", "llama-2-chat"),
    ("llama", "Llama 2 13B Chat", None, "model.gguf", "llama-2-chat"),
    ("llama", "Llama2 70B Chat", None, "x.gguf", "llama-2-chat"),
    ("llama", "LLaMA v2", None, "llama-2-7b.Q4_K_M.gguf", None),
    ("llama", "mistralai_mistral-7b-instruct-v0.1", None, "m.gguf", "mistral-instruct"),
    ("llama", "Mistral 7B Instruct v0.2", "Mistral", "m.gguf", "mistral-instruct"),
    ("llama", "mistralai_mistral-7b-v0.1", None, "mistral-7b-v0.1.Q4_K_M.gguf", None),
    ("llama", "Meta Llama 3 8B Instruct", "Meta-Llama-3", "m.gguf", "llama3"),
    ("llama", "Meta Llama 3 8B", "Meta-Llama-3", "m.gguf", None),
    ("llama", "zephyr-7b-beta", None, "z.gguf", "zephyr"),
    ("mistral", "Zephyr 7B Beta", None, "z.gguf", "zephyr"),
    ("gemma", "gemma-7b-it", None, "g.gguf", "gemma"),
    ("gemma2", "Gemma 2 9b It", "gemma-2", "g.gguf", "gemma"),
    ("gemma", "gemma-7b", None, "g.gguf", None),
    ("phi3", "Phi 3 Mini 4k Instruct", None, "p.gguf", "phi3"),
    ("qwen2", "Mistral 7B Instruct", None, "q.gguf", None),  # rules name the architecture
    ("llama", "Smollm2 135M 8k Lc100K Mix1 Ep2", "smollm2", "plain.gguf", None),
]


@pytest.mark.parametrize(("arch", "name", "basename", "file_name", "expected"), RULES)
def test_recognition_rules(
    smollm2_spec: ModelSpec,
    arch: str,
    name: str,
    basename: str | None,
    file_name: str,
    expected: str | None,
) -> None:
    spec = dataclasses.replace(
        smollm2_spec, architecture=arch, name=name, basename=basename, chat_template=None
    )
    assert recognize(spec, file_name) == expected
    if expected is not None:
        fmt = choose_format(spec, file_name)
        assert (fmt.name, fmt.source) == (expected, "recognized")


def test_the_gguf_template_comes_before_catalog_and_rules(smollm2_spec: ModelSpec) -> None:
    spec = dataclasses.replace(smollm2_spec, name="Llama 2 7B Chat")
    fmt = choose_format(spec, "llama-2-7b-chat.Q4_K_M.gguf", catalog_template="llama-2-chat")
    assert (fmt.name, fmt.source) == ("gguf", "gguf")
    bare = dataclasses.replace(spec, chat_template=None)
    fmt = choose_format(bare, "llama-2-7b-chat.Q4_K_M.gguf", catalog_template="chatml")
    assert (fmt.name, fmt.source) == ("chatml", "catalog")
    fmt = choose_format(spec, "x.gguf", template="llama2", catalog_template="chatml")
    assert (fmt.name, fmt.source) == ("llama2", "--template")


# -- named templates


def test_template_list_is_localllms_then_llama_cpps(cli) -> None:
    result = cli("chat", "--template", "list")
    assert result.exit_code == 0, result.stderr
    builtin = llama_cpp_builtin_names()
    assert {"llama2", "llama2-sys", "mistral-v1", "mistral-v3", "mistral-v7", "chatml"} <= set(
        builtin
    )
    assert {"gemma", "llama3", "phi3", "zephyr"} <= set(builtin)
    assert result.stdout.split() == ["llama-2-chat", "mistral-instruct", *builtin]


def test_unknown_template_name_is_refused_with_the_list(plain: Path, cli) -> None:
    result = cli("chat", str(plain), "--template", "llama-9", "-p", "hi")
    assert result.exit_code == 2
    line = result.error_line
    assert line.startswith("unknown chat template 'llama-9'")
    listed = line.split("use one of ", 1)[1].split(", or a Jinja file")[0].split(", ")
    assert listed == [*PUBLISHED, *llama_cpp_builtin_names()]


def test_missing_template_file_is_one_line(plain: Path, tmp_path: Path, cli) -> None:
    result = cli("chat", str(plain), "--template", str(tmp_path / "nope.jinja"), "-p", "hi")
    assert result.exit_code == 2
    assert "nope.jinja" in result.error_line and "no such file" in result.error_line


def meta_llama_2_chat_tokens(vocab: Any, dialog: MessageList) -> list[int]:
    """Meta's reference encoding (llama/generation.py, Llama.chat_completion), written out:
    BOS and EOS are token ids around each [INST] turn, never text in the prompt."""
    b_inst, e_inst = "[INST]", "[/INST]"
    b_sys, e_sys = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def encode(text: str, bos: bool, eos: bool) -> list[int]:
        # Meta's Tokenizer.encode: sentencepiece's encode of the text, BOS/EOS as ids.
        ids = list(vocab.tokenize(text.encode(), add_bos=False, special=False))
        return [vocab.token_bos()] * bos + ids + [vocab.token_eos()] * eos

    if dialog[0]["role"] == "system":
        first = {
            "role": dialog[1]["role"],
            "content": b_sys + dialog[0]["content"] + e_sys + dialog[1]["content"],
        }
        dialog = [first, *dialog[2:]]
    assert all(m["role"] == "user" for m in dialog[::2])
    assert all(m["role"] == "assistant" for m in dialog[1::2])
    out: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False):
        text = f"{b_inst} {prompt['content'].strip()} {e_inst} {answer['content'].strip()} "
        out += encode(text, bos=True, eos=True)
    out += encode(f"{b_inst} {dialog[-1]['content'].strip()} {e_inst}", bos=True, eos=False)
    return out


@pytest.fixture(scope="module")
def llama_2_vocab() -> Iterator[Any]:
    """llama.cpp's vocab-only Llama-2 tokenizer (SmolLM2's vocabulary has no <s> or </s>)."""
    assert LLAMA_SPM_VOCAB.is_file(), f"{LLAMA_SPM_VOCAB} is missing (the sdist's models/)"
    vocab = llama_cpp.Llama(model_path=str(LLAMA_SPM_VOCAB), vocab_only=True, verbose=False)
    assert vocab.n_vocab() == 32000
    yield vocab
    vocab.close()


def token_text(vocab: Any, token: int) -> str:
    return str(vocab._model.token_get_text(token))


@pytest.mark.parametrize("with_system", [True, False])
def test_llama_2_chat_is_metas_format_token_for_token(
    llama_2_vocab: Any, smollm2_spec: ModelSpec, with_system: bool
) -> None:
    bos, eos = token_text(llama_2_vocab, 1), token_text(llama_2_vocab, 2)
    assert (bos, eos) == ("<s>", "</s>")
    dialog = conversation(system=with_system)
    expected = meta_llama_2_chat_tokens(llama_2_vocab, dialog)
    # The catalog's Llama-2-Chat entries name this template (catalog.toml).
    from localllm.store.catalog import load_catalog

    for alias in ("llama-2-7b-chat", "llama-2-13b-chat", "llama-2-70b-chat"):
        entry = load_catalog().lookup(alias)
        assert entry is not None and entry.template == "llama-2-chat", alias
    fmt = choose_format(smollm2_spec, "x.gguf", template="llama-2-chat")
    prompt = fmt.render(dialog, bos_token=bos, eos_token=eos)
    ours = list(llama_2_vocab.tokenize(prompt.encode(), add_bos=fmt.add_bos, special=True))
    assert ours == expected
    assert ours.count(1) == 2 and ours.count(2) == 1  # BOS per turn, EOS after the answer


# What llama.cpp's built-in Llama-2 variants make of the same dialog, and how each differs
# from Meta's encoding (the reason localllm ships llama-2-chat):
#   llama2            no <<SYS>> block (the system text + "\n"), no BOS before the second
#                     turn, no space around the answer: "[/INST]Hello...</s>[INST]"
#   llama2-sys        <<SYS>> right, but no BOS before the second turn and no spaces
#                     around the answer
#   llama2-sys-bos    BOS right too; only the spaces around the answer differ
#                     ("[/INST]Hello! ...?</s>" where Meta encodes "[/INST] Hello! ...? </s>")
#   llama2-sys-strip  as llama2-sys, with each message stripped
#   mistral-v1        Mistral's format: " [INST] " and the system prompt without <<SYS>>
_SYS_BLOCK = f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{USER1} [/INST]{ANSWER1}</s>"
LLAMA_CPP_VARIANTS = {
    "llama2": f"[INST] {SYSTEM}\n{USER1} [/INST]{ANSWER1}</s>[INST] {USER2} [/INST]",
    "llama2-sys": f"{_SYS_BLOCK}[INST] {USER2} [/INST]",
    "llama2-sys-bos": f"{_SYS_BLOCK}<s>[INST] {USER2} [/INST]",
    "llama2-sys-strip": f"{_SYS_BLOCK}[INST] {USER2} [/INST]",
    "mistral-v1": f" [INST] {SYSTEM}\n\n{USER1} [/INST] {ANSWER1}</s> [INST] {USER2} [/INST]",
}


@pytest.mark.parametrize("name", sorted(LLAMA_CPP_VARIANTS))
def test_llama_cpp_llama_2_variants_are_not_metas_format(llama_2_vocab: Any, name: str) -> None:
    text = llama_cpp_apply(name, conversation())
    assert text == LLAMA_CPP_VARIANTS[name]
    theirs = list(llama_2_vocab.tokenize(text.encode(), add_bos=True, special=True))
    assert theirs != meta_llama_2_chat_tokens(llama_2_vocab, conversation())


# -- --raw: plain completion for base models


def test_raw_is_llama_cpp_pythons_plain_completion(plain: Path, reference_llama, cli) -> None:
    text = "The three primary colours are"
    expected = reference_completion(reference_llama, text)
    assert expected.strip()
    result = cli("chat", str(plain), "--raw", "-p", text, *GREEDY_FLAGS)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert said(result.stderr, "chat template: raw (--raw)") == 1

    piped = cli("chat", str(plain), "--raw", "--json", *GREEDY_FLAGS, input=text + "\n")
    assert piped.exit_code == 0, piped.stderr
    data = json.loads(piped.stdout)
    assert data["reply"] == expected
    assert data["settings"]["template"] == {"name": "raw", "source": "--raw"}
    # BOS as the vocabulary asks, then the text: what llama-cpp-python evaluated.
    assert data["stats"]["prompt_evaluated"] == len(tokens(reference_llama, text, add_bos=True))


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(("--template", "chatml"), "drop --template"), (("--system", "S"), "drop --system")],
)
def test_raw_refuses_a_template_or_system_prompt(
    plain: Path, flags: tuple[str, ...], needle: str, cli
) -> None:
    result = cli("chat", str(plain), "--raw", *flags, "-p", "hi")
    assert result.exit_code == 2
    assert needle in result.error_line


# -- /stats, saved and resumed sessions


PROMPT = ">>> "


def spawn_chat(*args: str) -> tuple[pexpect.spawn, str]:
    """The REPL in a pseudo-terminal, at its first prompt; and the id it saves the session as."""
    env = {**os.environ, "COLUMNS": "200", "LINES": "50", "TERM": "xterm", "NO_COLOR": "1"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "localllm", "chat", "--temp", "0", "--seed", "5", "--max-tokens", "8", *args],
        env=env,
        cwd=str(REPO),
        encoding="utf-8",
        timeout=90,
        dimensions=(50, 200),
    )
    child.expect_exact(PROMPT)
    found = re.search(r"session (\S+) is saved after every turn", str(child.before))
    assert found, child.before
    return child, found[1]


def repl_turn(child: pexpect.spawn, line: str) -> str:
    child.sendline(line)
    child.expect_exact(PROMPT)
    return str(child.before)


def saved_session(session_id: str) -> dict[str, Any]:
    path = Path(os.environ["XDG_STATE_HOME"]) / "localllm" / "sessions" / f"{session_id}.json"
    return dict(json.loads(path.read_text()))


@pytest.mark.parametrize(
    ("make", "flags", "template"),
    [
        ("plain", ("--template", "chatml"), {"name": "chatml", "source": "--template"}),
        ("llama-2", (), {"name": "llama-2-chat", "source": "recognized"}),
        ("gguf", (), {"name": "gguf", "source": "gguf"}),
    ],
)
def test_stats_saved_session_and_resume_keep_the_template(
    make: str,
    flags: tuple[str, ...],
    template: dict[str, str],
    plain: Path,
    copies: Callable[..., Path],
    smollm2_path: Path,
    cli,
) -> None:
    path = {
        "plain": plain,
        "llama-2": copies("model-a.gguf", general__name="Llama 2 7B Chat"),
        "gguf": smollm2_path,
    }[make]
    child, session_id = spawn_chat(str(path), *flags)
    described = "the GGUF's own" if template["source"] == "gguf" else template["name"]
    # Words only: Rich styles the labels in bold even with NO_COLOR.
    stats = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", repl_turn(child, "/stats")).split())
    assert f"template {described} ({template['source']})" in stats
    repl_turn(child, "Hello")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert saved_session(session_id)["settings"]["template"] == template

    asked = ("--json", "-p", "Again")
    resumed = cli("chat", "--resume", session_id, *asked)
    assert resumed.exit_code == 0, resumed.stderr
    data = json.loads(resumed.stdout)
    assert data["settings"]["template"]["name"] == template["name"]
    # The resumed prompt holds the first turn too: longer than the same question alone
    # (counted in prompt tokens: a saved KV state may spare evaluating the shared part).
    fresh = cli("chat", str(path), *flags, "--temp", "0", "--max-tokens", "8", *asked)
    assert fresh.exit_code == 0, fresh.stderr
    alone = json.loads(fresh.stdout)
    assert alone["settings"]["template"] == template
    assert data["stats"]["prompt_tokens"] > alone["stats"]["prompt_tokens"] + 2
    evaluated = data["stats"]["prompt_evaluated"] + data["stats"]["prompt_from_state"]
    assert evaluated == data["stats"]["prompt_tokens"]
