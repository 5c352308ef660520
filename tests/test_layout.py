"""The package's shape: no import cycles, with every import counted (in function bodies and under
TYPE_CHECKING too), so each layer can be read, tested and changed on its own; and its types are
a promise a type checker holds a user's code to."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "reshuffle"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (``from a import b`` counts ``a.b`` when that
    is a module, else ``a``)."""
    files = {_module_name(path, root): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            for target in targets:
                while target and target not in files:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_sees_a_cycle_closed_inside_a_function_body(tmp_path):
    package = tmp_path / "reshuffle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from reshuffle.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from reshuffle import a  # hidden\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
    )
    graph = import_graph(package)
    assert graph["reshuffle.a"] == {"reshuffle.b"}
    assert graph["reshuffle.c"] == {"reshuffle.a"}
    assert cycles(graph) == [["reshuffle.a", "reshuffle.b"]]


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and "reshuffle.store.session" in graph["reshuffle.shuffled"]
    assert cycles(graph) == []


@pytest.mark.slow
def test_a_type_checker_catches_a_wrong_argument_at_a_public_call(tmp_path):
    """mypy on a user's file that calls the public API with wrong argument types names each one,
    the lazily imported ShuffledData included (before, type checkers saw it as ``object``)."""
    user = tmp_path / "user.py"
    user.write_text(
        "from reshuffle import ShuffledData, ShufflePlanner, ShuffleSampler\n\n"
        "ShufflePlanner(100, 4, strategy=0.1)\n"
        "ShuffledData([], store_dir=3.5)\n"
        "ShuffleSampler([], seed='0')\n"
        "ShufflePlanner(100, 4, strategy='local')\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(PACKAGE.parent.parent / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "cache"), str(user)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(PACKAGE.parent)},
    )  # fmt: skip
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in errors] == ["3", "4", "5"], result.stdout
    assert 'Argument "store_dir" to "ShuffledData" has incompatible type "float"' in result.stdout
