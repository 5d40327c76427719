"""The import graph: one direction between areas, no cycles between areas or between modules.

Every ``import`` counts, also those inside functions (a lazy import is still a dependency). We read the
graph from the source with ``ast`` rather than with import-linter: its graph builder (grimp) walks a
package's folder on disk and cannot follow the ``package-dir`` mapping that puts our top-level folders under
``persona_router``. Tried: import-linter 2.16 with a ``layers`` contract over the editable install stops at
"Missing layer 'persona_router.cli': module persona_router.cli does not exist".
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Area folder -> layer. An area may import its own layer's modules and anything below; areas that share a
# layer (router, training) are independent of each other.
LAYERS: dict[str, int] = {"core": 0, "adapters": 1, "router": 2, "training": 2, "eval": 3, "service": 4, "cli": 5,
                          "persona_router": 6}


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] == "persona_router":
        return ".".join(parts)
    return ".".join(["persona_router", *parts])


def source_files() -> dict[str, Path]:
    files = {}
    for area in LAYERS:
        for path in (ROOT / area).rglob("*.py"):
            files[module_name(path)] = path
    return files


def imports_of(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "persona_router" or m.startswith("persona_router.")}


def graph() -> dict[str, set[str]]:
    files = source_files()
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        # `from pkg import name` names a module or an attribute: keep only targets that are modules of ours.
        targets = {t for t in imports_of(path, name) if t in files}
        targets.discard(name)
        edges[name] = targets
    return edges


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "persona_router"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read() -> None:
    edges = graph()
    assert len(edges) > 60
    assert "persona_router.core.errors" in edges["persona_router.adapters.registry"]


def test_no_area_imports_upward_or_sideways() -> None:
    bad = []
    for source, targets in graph().items():
        for target in targets:
            a, b = area(source), area(target)
            if a == b:
                continue
            if LAYERS[b] >= LAYERS[a]:
                bad.append(f"{source} -> {target}")
    rule = "core <- adapters <- router, training <- eval <- service <- cli"
    assert not bad, f"imports against the layering ({rule}):\n" + "\n".join(sorted(bad))


def test_no_cycle_between_modules() -> None:
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()) or [])}"


def test_no_cycle_between_areas() -> None:
    areas: dict[str, set[str]] = {}
    for source, targets in graph().items():
        areas.setdefault(area(source), set()).update(area(t) for t in targets if area(t) != area(source))
    assert find_cycle(areas) is None


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
])
def test_cycle_finder_finds_cycles(edges: dict[str, set[str]], expected: list[str] | None) -> None:
    assert find_cycle(edges) == expected
