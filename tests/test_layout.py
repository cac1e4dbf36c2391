"""The package's shape: no import cycles, llama_cpp only under localllm/runtime/, views pure.

Imports are read from the source with ast, including those inside functions and under
``if TYPE_CHECKING`` (a cycle through a function-level import still ties two modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "localllm"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(module: str, path: Path) -> set[str]:
    """Every name ``module`` imports (absolute), wherever in the file the import is."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            for alias in node.names:
                # "from package import module" depends on the module (the package's
                # __init__ runs first in any import, so it is not an edge of its own).
                full = f"{base}.{alias.name}"
                names.add(full if full in MODULES else base)
    return names


def _edges() -> dict[str, set[str]]:
    edges = {}
    for module, path in MODULES.items():
        targets = {name for name in _imported(module, path) if name in MODULES}
        edges[module] = targets - {module}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_the_package_has_modules_to_check() -> None:
    assert {"localllm.cli", "localllm.runtime.llama", "localllm.views.console"} <= set(MODULES)


def test_no_import_cycles_counting_function_level_imports() -> None:
    assert _cycles(_edges()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check above must be able to fail: a two-module and a three-module cycle.
    edges = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(edges)) == [["a", "b"], ["c", "d", "e"]]


def test_llama_cpp_is_imported_only_under_runtime() -> None:
    offenders = [
        module
        for module, path in MODULES.items()
        if not module.startswith("localllm.runtime")
        and any(n.split(".")[0] == "llama_cpp" for n in _imported(module, path))
    ]
    assert offenders == []


def test_the_llama_cpp_check_sees_function_level_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from llama_cpp import llama_chat_format\n")
    assert any(n.split(".")[0] == "llama_cpp" for n in _imported("localllm.probe", probe))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("localllm.views")))
def test_views_import_no_runtime_and_no_store(module: str) -> None:
    imported = _imported(module, MODULES[module])
    bad = sorted(
        # The store's index touches the disk; its result dataclasses (hub listings, pulls)
        # are data a view may render.
        n
        for n in imported
        if n.startswith(("localllm.runtime", "localllm.store.model_store", "llama_cpp"))
    )
    assert bad == []


def test_no_private_name_is_imported_across_modules() -> None:
    crossings = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("localllm"):
                crossings += [
                    f"{module} <- {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
    assert crossings == []


# ------------------------------------------------------------------ the packages' order
# Lowest first: a module may import from its own level or below, never above. Within a
# level the cycle test above keeps the edges one-way.
PACKAGE_ORDER: tuple[frozenset[str], ...] = tuple(
    frozenset(level.split())
    for level in (
        "__init__ errors text paths fileio machine generation net",  # the shared bottom
        "gguf",
        "runtime",
        "flags",
        "store rpc",
        "plan",
        "bench chat serve templates ppl inventory tools",
        "views",
        "commands",
        "cli __main__",
    )
)

# Edges that go up, each with its reason.
ORDER_EXCEPTIONS = {
    # The REPL is chat's terminal loop: it reads lines and renders each streamed token as
    # it arrives, which no single "core call, then render" step can do.
    ("localllm.chat.repl", "localllm.views.chat"),
    ("localllm.chat.repl", "localllm.views.console"),
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _level(module: str) -> int:
    unit = _unit(module)
    for index, level in enumerate(PACKAGE_ORDER):
        if unit in level:
            return index
    raise AssertionError(f"{module}: {unit!r} has no place in PACKAGE_ORDER; add it")


def _upward_edges(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{source} -> {target}"
        for source, targets in edges.items()
        for target in targets
        if _level(target) > _level(source) and (source, target) not in ORDER_EXCEPTIONS
    )


def test_every_module_has_a_place_in_the_package_order() -> None:
    for module in MODULES:
        _level(module)


def test_packages_import_only_their_level_or_below() -> None:
    assert _upward_edges(_edges()) == []


def test_the_order_check_finds_an_upward_edge() -> None:
    edges = {"localllm.gguf.spec": {"localllm.plan.memory"}, "localllm.plan.memory": set()}
    assert _upward_edges(edges) == ["localllm.gguf.spec -> localllm.plan.memory"]


def test_every_order_exception_is_still_an_edge() -> None:
    # An exception whose import is gone is a stale excuse: drop it.
    edges = _edges()
    assert sorted(e for e in ORDER_EXCEPTIONS if e[1] not in edges.get(e[0], set())) == []


def test_at_most_twelve_plain_modules_at_the_top() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top
