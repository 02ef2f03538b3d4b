"""The package's import graph keeps the layer rules of docs/architecture.md §3.

Every ``import`` statement counts, also those inside functions and under ``TYPE_CHECKING``: a lazy
import hides a dependency from the interpreter's start-up, not from the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cause_lightning

PACKAGE = "cause_lightning"
ROOT = Path(cause_lightning.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Modules ``path`` imports, by absolute name (``from a import b`` adds ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """``module -> imported modules``: project modules resolved, third-party kept as top names."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for target in _imports(path, name):
            if target.split(".")[0] != PACKAGE:
                edges.add(target.split(".")[0])
            elif target in files:
                edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a closed path), or ``None``."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports directly or through other project modules."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


GRAPH = import_graph()


def test_graph_sees_lazy_and_type_checking_imports() -> None:
    assert "cause_lightning.stages.steps" in GRAPH["cause_lightning.run"]  # inside a function
    assert "lightning" in GRAPH["cause_lightning.modules.base"]


def test_no_import_cycles() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c", "x"}, "c": {"a"}, "x": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("cause_lightning.models", ("cause_lightning.data", "cause_lightning.modules")),
        ("cause_lightning.data", ("cause_lightning.models", "cause_lightning.modules")),
        ("cause_lightning.ops", ("lightning", "cause_lightning.modules")),
        ("cause_lightning.inference.dense", ("lightning", "cause_lightning.modules")),
        ("cause_lightning.metrics", ("lightning", "cause_lightning.modules")),
        ("cause_lightning.core.specs", ("torch", "lightning", "cause_lightning.models")),
        ("cause_lightning.core.errors", ("torch", "lightning", "hydra", "omegaconf")),
    ],
)
def test_layer_rules(layer: str, forbidden: tuple[str, ...]) -> None:
    broken = []
    for module in sorted(m for m in GRAPH if _in(m, layer)):
        for target in reachable(GRAPH, module):
            if any(_in(target, f) for f in forbidden):
                broken.append(f"{module} -> {target}")
    assert not broken, f"{layer} must not depend on {forbidden}: " + ", ".join(broken)


def test_layer_rule_check_sees_indirect_imports() -> None:
    graph = {"p.a": {"p.b"}, "p.b": {"lightning"}}
    assert "lightning" in reachable(graph, "p.a")


def test_one_logger_convention() -> None:
    """Module loggers are ``log = get_logger(__name__)`` (rank-zero filtered), nothing else."""
    others = []
    for path in ROOT.rglob("*.py"):
        for line in path.read_text().splitlines():
            if "getLogger(__name__)" in line or line.startswith("logger = "):
                others.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not others, f"use `log = get_logger(__name__)` (cause_lightning.core.logs): {others}"
