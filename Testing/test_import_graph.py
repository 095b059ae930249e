"""KANTumorSegLib's modules import each other one way only: no cycle, lazy imports inside functions included.

A cycle (``cli`` and ``worker`` had one) makes a module's meaning depend on which of the two
was imported first; the shared parts belong in a module below both.
"""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "KANTumorSegLib"


def library_imports(path: Path) -> set[str]:
    """The KANTumorSegLib modules one module imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("KANTumorSegLib."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("KANTumorSegLib."))
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in LIBRARY.glob("*.py")}
    return {name: library_imports(path) & modules.keys() for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "open"
        stack.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                return stack[stack.index(other):] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        state[name] = "done"
        stack.pop()
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_and_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_library_has_no_import_cycle():
    graph = import_graph()
    assert "exit_codes" in graph["worker"] and "cli" not in graph["worker"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
