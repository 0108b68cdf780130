"""The exporter's structure, as a newcomer walks it (issue #24): no import circle, the model as
the ground floor, data flowing one way (sources -> model -> hang -> metrics/status -> web),
wings you can see, and nothing too long to read at once.

Every ``import`` counts, those under ``TYPE_CHECKING`` and inside functions included: a type
import is still a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "exporter"

MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600
MAX_TOP_LEVEL_MODULES = 9


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> Iterator[str]:
    """Every exporter module ``path`` imports, anywhere in it."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from exporter.model import collectors`` imports a module, ``from exporter.x
            # import y`` a name of exporter.x.
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if n in MODULES else node.module for n in names]
        else:
            continue
        yield from (n for n in names if n in MODULES)


GRAPH: dict[str, set[str]] = {m: set(imports_of(p)) - {m} for m, p in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    assert "exporter.metrics" in GRAPH and GRAPH["exporter.app"]  # the graph is not empty
    assert cycles(GRAPH) == []


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


SOURCES = ("exporter.qmp_watch", "exporter.qmp", "exporter.libvirt")
#: What each layer must not import: data flows sources -> model -> hang -> metrics/status ->
#: web, so a layer imports only what lies before it.
FORBIDDEN: dict[tuple[str, ...], tuple[str, ...]] = {
    ("exporter.hang",): (
        *SOURCES,
        "exporter.metrics",
        "exporter.web",
        "exporter.alerting",
        "exporter.runtime",
    ),
    SOURCES: ("exporter.hang", "exporter.metrics", "exporter.web", "exporter.alerting", "exporter.tools"),
    ("exporter.metrics",): (
        *SOURCES,
        "exporter.web",
        "exporter.alerting",
        "exporter.runtime",
        "exporter.tools",
    ),
    ("exporter.web",): ("exporter.tools", "exporter.app", "exporter.cli"),
}


@pytest.mark.parametrize("layer", FORBIDDEN, ids=lambda layer: layer[0])
def test_data_flows_one_way(layer: tuple[str, ...]) -> None:
    bad = {m: sorted(i for i in GRAPH[m] if _under(i, *FORBIDDEN[layer])) for m in GRAPH if _under(m, *layer)}
    assert {m: i for m, i in bad.items() if i} == {}


def test_the_model_is_the_ground_floor_and_the_config_stands_on_it() -> None:
    outside = {
        m: sorted(i for i in GRAPH[m] if not _under(i, "exporter.model"))
        for m in GRAPH
        if _under(m, "exporter.model")
    }
    assert {m: i for m, i in outside.items() if i} == {}
    config = {
        m: sorted(i for i in GRAPH[m] if not _under(i, "exporter.model", "exporter.config"))
        for m in GRAPH
        if _under(m, "exporter.config")
    }
    assert len(config) > 1 and {m: i for m, i in config.items() if i} == {}


def test_wings_you_can_see() -> None:
    """Few plain modules at the top (the design's qmp_watch and metrics among them); every
    subpackage says what lives in it and what it may import."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    assert {"qmp_watch.py", "metrics.py"} <= set(top)
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, init


def test_nothing_too_long_to_read_at_once() -> None:
    long_modules = {}
    long_functions = {}
    for name, path in MODULES.items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules[name] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions[f"{name}.{node.name}"] = lines
    assert long_modules == {}
    assert long_functions == {}
