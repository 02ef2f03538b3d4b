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


# Third-party frameworks by the layers allowed to use them.
_FRAMEWORKS = ("lightning", "hydra", "omegaconf", "wandb")
_PROJECT = {name: f"{PACKAGE}.{name}" for name in (
    "core", "ops", "metrics", "visualize", "models", "data", "config", "modules", "artifacts",
    "inference", "reports", "stages", "segmenter", "interop", "run",
)}  # fmt: skip
_ABOVE_MODELS = tuple(_PROJECT[n] for n in ("data", "config", "modules", "artifacts", "stages"))


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        # Facts and plain helpers: the standard library only.
        (_PROJECT["core"], ("torch", "numpy", *_FRAMEWORKS, *(v for k, v in _PROJECT.items()
                                                             if k != "core"))),
        (_PROJECT["visualize"], ("torch", *_FRAMEWORKS, _PROJECT["models"], _PROJECT["data"])),
        # Pure tensor functions and metrics: no framework, no model, no data.
        (_PROJECT["ops"], (*_FRAMEWORKS, _PROJECT["models"], *_ABOVE_MODELS)),
        (_PROJECT["metrics"], (*_FRAMEWORKS, _PROJECT["models"], *_ABOVE_MODELS)),
        # Plain nn.Modules: no Lightning, no config, no data.
        (_PROJECT["models"], (*_FRAMEWORKS, *_ABOVE_MODELS)),
        (_PROJECT["data"], ("hydra", "omegaconf", "wandb", _PROJECT["models"], _PROJECT["modules"],
                            _PROJECT["artifacts"], _PROJECT["stages"])),
        # Lightning glue takes its settings as arguments: no Hydra, no config, no data, no store.
        (_PROJECT["modules"], ("hydra", "omegaconf", "wandb", _PROJECT["config"], _PROJECT["data"],
                               _PROJECT["artifacts"], _PROJECT["reports"], _PROJECT["stages"])),
        (_PROJECT["inference"], (*_FRAMEWORKS, _PROJECT["modules"], _PROJECT["stages"])),
        (_PROJECT["artifacts"], ("lightning", "hydra", "wandb", _PROJECT["modules"],
                                 _PROJECT["reports"], _PROJECT["stages"])),
        (_PROJECT["reports"], (_PROJECT["modules"], _PROJECT["stages"])),
        # The inference API loads without the training stack.
        (_PROJECT["segmenter"], ("lightning", "hydra", "wandb", _PROJECT["modules"],
                                 _PROJECT["stages"])),
        (_PROJECT["interop"], ("lightning", "hydra", "wandb", _PROJECT["modules"],
                               _PROJECT["stages"])),
        (f"{PACKAGE}.core.specs", ("torch",)),
    ],
)  # fmt: skip
def test_layer_rules(layer: str, forbidden: tuple[str, ...]) -> None:
    broken = []
    modules = sorted(m for m in GRAPH if _in(m, layer))
    assert modules, f"no module in {layer}: the rule would hold for nothing"
    for module in modules:
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
