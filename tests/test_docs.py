"""The README and docs/ hold to the code: every option documented, every link and path real.

Fast: the Typer app is walked as click sees it (no model loads, no llama_cpp import), and
the Markdown is read as text.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer

from localllm.cli import build_app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PACKAGE = ROOT / "localllm"
README_MAX_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.M)


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _docs_text() -> str:
    return "\n".join(page.read_text(encoding="utf-8") for page in _pages())


# ------------------------------------------------------------------------- the options


def _cli_options(command: Any, name: str = "localllm", parent: Any = None) -> dict[str, set[str]]:
    """Every option string (long and short) of ``command`` and its subcommands, by command.

    Duck-typed on click's API: Typer may bring its own copy of click, whose classes are
    not ``click.Group`` or ``click.Option``. ``get_params`` with a context built as click
    builds it includes the help option under the names the app gives it (``-h``, ``--help``).
    """
    ctx = command.context_class(command, info_name=name, parent=parent, **command.context_settings)
    found = {
        name: {
            opt
            for param in command.get_params(ctx)
            if param.param_type_name == "option"
            for opt in (*param.opts, *param.secondary_opts)
        }
    }
    for sub_name, sub in getattr(command, "commands", {}).items():
        found.update(_cli_options(sub, f"{name} {sub_name}", ctx))
    return found


def _mentioned(option: str, text: str) -> bool:
    """``--ctx`` as a word of its own: not inside ``--ctx-size`` nor ``---ctx``."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def _undocumented(options: dict[str, set[str]], text: str) -> list[str]:
    return sorted(
        f"{command} {option}"
        for command, opts in options.items()
        for option in opts
        if not _mentioned(option, text)
    )


OPTIONS = _cli_options(typer.main.get_command(build_app()))


def test_the_walker_finds_every_command_and_known_options() -> None:
    commands = {name.removeprefix("localllm ") for name in OPTIONS}
    assert {"list", "info", "rm", "pull", "chat", "kv-calc", "ppl", "bench"} <= commands
    assert {"rpc-server", "serve"} <= commands
    assert {"--ctx", "--json"} <= OPTIONS["localllm chat"]
    assert {"--allowed-host", "--insecure", "--help", "-h"} <= OPTIONS["localllm serve"]
    assert {"-ngl", "--gpu-layers", "--rpc"} <= OPTIONS["localllm kv-calc"]
    assert "--version" in OPTIONS["localllm"]


def test_a_missing_option_is_reported() -> None:
    options = {"localllm chat": {"--ctx", "--no-such-option"}, "localllm ppl": {"-f"}}
    text = "chat takes `--ctx N`, and `--no-such-option-at-all` is another flag; -fa too"
    assert _undocumented(options, text) == [
        "localllm chat --no-such-option",
        "localllm ppl -f",
    ]


def test_every_long_option_is_documented() -> None:
    long_options = {c: {o for o in opts if o.startswith("--")} for c, opts in OPTIONS.items()}
    assert _undocumented(long_options, _docs_text()) == []


def test_every_short_option_is_documented() -> None:
    short = {c: {o for o in opts if not o.startswith("--")} for c, opts in OPTIONS.items()}
    assert _undocumented(short, _docs_text()) == []


def test_the_readme_has_a_line_for_every_command() -> None:
    text = README.read_text(encoding="utf-8")
    commands = sorted(name.removeprefix("localllm ") for name in OPTIONS if " " in name)
    rows = {
        c: [line for line in text.splitlines() if re.match(rf"\| `localllm {c}[ `]", line)]
        for c in commands
    }
    assert {c: len(lines) for c, lines in rows.items()} == dict.fromkeys(commands, 1)
    assert all(LINK.search(lines[0]) for lines in rows.values())


# ----------------------------------------------------------------------- size and pages


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_docs_has_a_page_per_concern() -> None:
    pages = {p.name for p in DOCS.glob("*.md")}
    assert len(pages) >= 6
    assert {
        "models.md",
        "chat.md",
        "kv-calc.md",
        "ppl.md",
        "bench.md",
        "rpc.md",
        "serve.md",
        "reliability.md",
        "development.md",
    } <= pages


# ------------------------------------------------------------------------------- links


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(h) for h in HEADING.findall(text)}


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{page.name}: {target} (no such heading)")
    return broken


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path) -> None:
    assert _broken_links(page) == []


def test_the_link_check_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# A heading, with `code`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#a-heading-with-code) [ok](https://example.com/x)\n"
        "[gone](missing.md) [bad](other.md#nowhere)\n```\n[in code](skipped.md)\n```\n"
    )
    assert _broken_links(page) == [
        "page.md: missing.md (no such file)",
        "page.md: other.md#nowhere (no such heading)",
    ]


# ------------------------------------------------------------------- paths and modules

PATH_REF = re.compile(r"`((?:localllm|tests|benchmarks)/[\w./-]*)`")
MODULE_REF = re.compile(r"`(localllm(?:\.\w+)+)")


def _missing_paths(text: str) -> list[str]:
    missing = []
    for ref in PATH_REF.findall(text):
        if ref.startswith("benchmarks/build/"):  # built by `make native`
            continue
        if not (ROOT / ref).exists():
            missing.append(ref)
    for ref in MODULE_REF.findall(text):
        parts = ref.split(".")
        depth = max(
            (
                k
                for k in range(1, len(parts) + 1)
                if (ROOT / Path(*parts[:k])).with_suffix(".py").exists()
                or (ROOT / Path(*parts[:k]) / "__init__.py").exists()
            ),
            default=0,
        )
        if depth < len(parts) - 1:
            missing.append(ref)
        elif depth == len(parts) - 1:
            module = ROOT / Path(*parts[:depth])
            source = module.with_suffix(".py") if module.with_suffix(".py").exists() else None
            source = source or module / "__init__.py"
            if not re.search(rf"\b{parts[-1]}\b", source.read_text(encoding="utf-8")):
                missing.append(ref)
    return sorted(set(missing))


def test_every_path_and_module_the_docs_name_exists() -> None:
    assert _missing_paths(_docs_text()) == []


def test_the_path_check_finds_a_stale_path() -> None:
    text = (
        "`localllm/cli.py` `localllm.cli.main` `localllm/old_module.py` "
        "`localllm.ppl.builtin_text` `localllm.cli.no_such_name`"
    )
    assert _missing_paths(text) == [
        "localllm.cli.no_such_name",
        "localllm.ppl.builtin_text",
        "localllm/old_module.py",
    ]


def test_the_module_map_names_every_module() -> None:
    text = (DOCS / "development.md").read_text(encoding="utf-8")
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if path.name == "__init__.py":
            if len(rel.parts) > 1 and f"{rel.parts[0]}/" not in text:
                missing.append(f"{rel.parts[0]}/")
        elif not _mentioned(path.name, text):
            missing.append(rel.as_posix())
    assert missing == []
