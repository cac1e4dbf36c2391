"""A chat template is untrusted input: every failure is one line, bounded, sandboxed (issue 13).

The hostile templates are written into copies of the real SmolLM2 (tests/support/gguf_files.py) or
into files for ``--template FILE``, then ``localllm chat FILE -p hi`` runs for real: one
line on stderr, exit 2, no traceback, and the whole run (Python start, header read, model
load, the failing render) in under 2 s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pexpect
import pytest
from conftest import REPO, CliResult, run_cli
from support.gguf_files import gguf_with_chat_template

from localllm.errors import TemplateError
from localllm.templates import GuardedTemplate, RenderBudget
from localllm.templates.budget import Meter
from localllm.templates.deadline import backstop_available

GGUF_LABEL = "the GGUF's chat template (tokenizer.chat_template)"
HINT = "pass --template NAME (localllm chat --template list)"
ECHO = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
NESTED_LOOPS = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + ECHO
)
# name -> (template, what failed, a words of the Jinja error or of the budget)
HOSTILE = {
    "sandbox-escape": (
        "{{ ''.__class__.__mro__ }}" + ECHO,
        "was stopped by the sandbox",
        "access to attribute '__class__' of 'str' object is unsafe",
    ),
    "nested-loops": (NESTED_LOOPS, "went over its budget", "loop iterations"),
    "range-too-big": (
        "{% for i in range(100000000) %}{% endfor %}" + ECHO,
        "failed",
        "OverflowError: Range too big",
    ),
    "undefined-attribute": (
        "{{ undefined_var.x }}" + ECHO,
        "failed",
        "'undefined_var' is undefined",
    ),
    "syntax-error": ("{% for m in messages %", "does not parse", "unexpected 'end of template'"),
    "string-times-a-billion": (
        "{{ 'x' * 10**9 }}" + ECHO,
        "went over its budget",
        "a value of more than",
    ),
    "raise-exception": (
        "{{ raise_exception('This model only talks in haiku') }}",
        "refused the conversation",
        "This model only talks in haiku",
    ),
}
# Mistral-7B-Instruct-v0.1's chat template, as its tokenizer_config.json ships it.
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Callable[[str], Path]:
    """A SmolLM2 copy per template (made once per module)."""
    folder = tmp_path_factory.mktemp("hostile")
    made: dict[str, Path] = {}

    def make(template: str) -> Path:
        if template not in made:
            made[template] = gguf_with_chat_template(
                smollm2_path, folder / f"copy{len(made)}.gguf", template
            )
        return made[template]

    return make


def assert_refused(result: CliResult, label: str, verb: str, detail: str) -> str:
    """One line naming the template, what failed and the way out; exit 2. How fast the
    refusal comes is not held here (a wall-clock bound fails on a loaded machine): the
    detail names the budget that stopped the render, which is what bounds it."""
    assert result.exit_code == 2, result.stderr
    line = result.error_line  # exactly one line on stderr, no traceback
    assert "Traceback" not in result.stdout and result.stdout == ""
    assert line.startswith(f"{label} {verb}: "), line
    assert detail in line
    assert line.endswith(HINT)
    return line


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_gguf_template_is_one_line(name: str, copies: Callable[[str], Path]) -> None:
    template, verb, detail = HOSTILE[name]
    path = copies(template)
    result = run_cli("chat", str(path), "-p", "hi")
    assert_refused(result, GGUF_LABEL, verb, detail)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_file_goes_through_the_same_renderer(
    name: str, smollm2_path: Path, tmp_path: Path
) -> None:
    template, verb, detail = HOSTILE[name]
    path = tmp_path / f"{name}.jinja"
    path.write_text(template, encoding="utf-8")
    result = run_cli(
        "chat", str(smollm2_path), "--template", str(path), "-p", "hi"
    )  # fmt: skip
    assert_refused(result, f"template file {name}.jinja", verb, detail)


# -- a real template's raise_exception: "roles must alternate"


@pytest.mark.slow
def test_mistral_template_refuses_a_system_message_in_one_line(
    copies: Callable[[str], Path],
) -> None:
    path = copies(MISTRAL_V01)
    ok = run_cli("chat", str(path), "-p", "hi", "--temp", "0", "--max-tokens", "4")
    assert ok.exit_code == 0, ok.stderr  # alternating turns render
    result = run_cli("chat", str(path), "--system", "Be brief.", "-p", "hi")
    assert_refused(result, GGUF_LABEL, "refused the conversation", ALTERNATE)


PROMPT = ">>> "
STATUS = re.compile(r"\d+ in(?: \(\d+ new\))? · \d+ out · [^\n]*\n")


@pytest.fixture
def repl(copies: Callable[[str], Path]) -> Iterator[pexpect.spawn]:
    env = {**os.environ, "COLUMNS": "200", "LINES": "50", "TERM": "xterm", "NO_COLOR": "1"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "localllm", "chat", str(copies(MISTRAL_V01)), "--temp", "0", "--max-tokens", "8"],
        env=env,
        cwd=str(REPO),
        encoding="utf-8",
        timeout=90,
        dimensions=(50, 200),
    )
    child.expect_exact(PROMPT)
    yield child
    child.close(force=True)


@pytest.mark.slow
def test_repl_prints_the_line_and_the_session_goes_on(repl: pexpect.spawn, tmp_path: Path) -> None:
    repl.sendline("Hi")
    repl.expect(STATUS)
    repl.expect_exact(PROMPT)
    repl.sendline("/system Be brief.")  # Mistral v0.1 has no system role
    repl.expect_exact(PROMPT)
    repl.sendline("Hello again")
    repl.expect(r"error: ([^\r\n]*)\r?\n")
    line = re.sub(r"\x1b\[[0-9;]*m", "", repl.match[1])  # Rich styles it even with NO_COLOR
    assert line == f"{GGUF_LABEL} refused the conversation: {ALTERNATE}; {HINT}"
    repl.expect_exact(PROMPT)
    assert "Traceback" not in str(repl.before)
    # The session goes on: commands work, the refused message is not in the history.
    saved = tmp_path / "after.json"
    repl.sendline(f"/save {saved}")
    repl.expect_exact(PROMPT)
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "Hi"
    repl.sendline("/exit")
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0


# -- the wall-time backstop behind the budget (main thread only: the CLI)


@pytest.fixture
def meter_with_a_hole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the meter misses loops: only the backstop can stop a render then."""
    monkeypatch.setattr(Meter, "iterate", lambda self, cost: None)
    monkeypatch.setattr(Meter, "step", lambda self, cost: None)


def render_once(template: GuardedTemplate) -> str:
    return template.render([{"role": "user", "content": "hi"}], bos_token="", eos_token="")


def test_backstop_stops_a_render_the_meter_misses(meter_with_a_hole: None) -> None:
    template = GuardedTemplate.compile(NESTED_LOOPS, "L", budget=RenderBudget(max_wall_seconds=0.3))
    before = signal.getsignal(signal.SIGALRM)
    start = time.perf_counter()
    with pytest.raises(TemplateError) as caught:
        render_once(template)
    seconds = time.perf_counter() - start
    assert str(caught.value) == (
        f"L went over its budget: more than 0.3 s of wall time (the CLI's backstop); {HINT}"
    )
    assert seconds >= 0.3  # stopped at its deadline, not before (no upper bound: load)
    # The timer is disarmed and the previous handler is back.
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is before


def test_backstop_does_not_fire_on_a_render_within_budget() -> None:
    template = GuardedTemplate.compile(ECHO, "L", budget=RenderBudget(max_wall_seconds=0.05))
    for _ in range(20):
        assert render_once(template) == "hi"
    time.sleep(0.1)  # a timer left armed would fire here
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_backstop_is_not_armed_in_a_worker_thread() -> None:
    """Signals reach only the main thread: serve's workers rely on the budget alone."""
    before = signal.getsignal(signal.SIGALRM)
    budget = RenderBudget(max_wall_seconds=0.001)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Compiled in the worker too: in the main thread the 1 ms backstop would be armed
        # (and a loaded machine can take longer than that to compile).
        template = pool.submit(GuardedTemplate.compile, ECHO, "L", budget=budget).result()
        available = pool.submit(backstop_available).result()
        rendered = pool.submit(render_once, template).result()
    assert available is False and backstop_available() is True
    assert rendered == "hi"
    assert signal.getsignal(signal.SIGALRM) is before
    assert threading.current_thread() is threading.main_thread()


def test_backstop_leaves_a_timer_it_did_not_arm_alone() -> None:
    fired: list[int] = []

    def theirs(signum: int, _frame: Any) -> None:
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, theirs)
    try:
        signal.setitimer(signal.ITIMER_REAL, 5.0)
        template = GuardedTemplate.compile(ECHO, "L", budget=RenderBudget(max_wall_seconds=0.001))
        assert render_once(template) == "hi"
        assert signal.getsignal(signal.SIGALRM) is theirs
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 5.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert fired == []


BACKSTOP_SCRIPT = """
import functools, sys
from localllm.templates import budget, sandbox
budget.Meter.iterate = lambda self, cost: None  # a hole in the meter
budget.Meter.step = lambda self, cost: None
sandbox.RenderBudget = functools.partial(budget.RenderBudget, max_wall_seconds=0.5)
from localllm.cli import main
sys.argv = ["localllm", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_cli_backstop_stops_a_template_the_budget_misses(
    copies: Callable[[str], Path], tmp_path: Path
) -> None:
    script = tmp_path / "backstop.py"
    script.write_text(BACKSTOP_SCRIPT, encoding="utf-8")
    path = copies(NESTED_LOOPS)
    proc = subprocess.run(
        [sys.executable, str(script), "chat", str(path), "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        cwd=REPO,
    )
    result = CliResult(proc.returncode, proc.stdout, proc.stderr)
    detail = "more than 0.5 s of wall time (the CLI's backstop)"
    assert_refused(result, GGUF_LABEL, "went over its budget", detail)
