"""The packages are layers with arrows one way: read every import of kvcore and ui and check the order.

A package may import only packages of a lower layer (or itself); modules never import each other in a
circle; no function-level import of the project's own code hides a circle (command-line modules may
defer model code so ``--help`` starts fast); nothing looks the project's modules up by name; kvcore
never imports streamlit or plotly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Lower index = lower layer. DESIGN: models <- eviction, quant <- plans, needle <- engine, pages.
LAYERS = (
    ("kvcore.checks", "kvcore.tensors", "kvcore.device", "kvcore.noise"),
    ("kvcore.shapes",),
    ("kvcore.calculator",),
    ("kvcore.models",),
    ("kvcore.eviction", "kvcore.quant", "kvcore.sharing"),
    ("kvcore.kernels",),
    ("kvcore.paged",),
    ("kvcore.sched", "kvcore.plans", "kvcore.needle"),
    ("kvcore.hierarchy", "kvcore.engine"),
    ("kvcore.study",),
    ("kvcore.cli",),
    ("kvcore.__main__",),
    ("ui",),
)
RANK = {package: rank for rank, names in enumerate(LAYERS) for package in names}
# Function-level imports of project code that are not about import order, with the reason.
DEFERRED = {
    "kvcore/kernels/paged_triton.py": "Triton is optional: its kernels load only when the Triton backend runs",
    "ui/warmup.py": "the background warm-up imports the model pages' code in its thread, so the first page a server "
                    "serves never waits for torch's import",
}


def _sources() -> dict[str, Path]:
    files = [*ROOT.glob("kvcore/**/*.py"), *ROOT.glob("ui/*.py")]
    out = {}
    for path in files:
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


SOURCES = _sources()


def _package(module: str) -> str:
    parts = module.split(".")
    return "ui" if parts[0] == "ui" else ".".join(parts[:2])


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported project module, at top level?) for every import of ``module``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(n, id(node) in top) for n in names if n.split(".")[0] in ("kvcore", "ui")]
    return found


def test_every_package_has_a_layer():
    assert {_package(m) for m in SOURCES} <= set(RANK) | {"kvcore"}


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_imports_point_down_the_layers(module):
    mine = _package(module)
    for target, _ in _imports(module, SOURCES[module]):
        theirs = _package(target)
        if theirs in (mine, "kvcore"):
            continue
        assert RANK[theirs] < RANK[mine], f"{module} imports {target}: {mine} may not import {theirs}"


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_project_imports_sit_at_the_top_of_the_module(module):
    path = SOURCES[module]
    rel = str(path.relative_to(ROOT))
    if path.name == "cli.py" or rel in DEFERRED:
        return
    inner = [target for target, top in _imports(module, path) if not top]
    assert not inner, f"{rel} imports {inner} inside a function"


def test_no_module_imports_a_module_that_imports_it_back():
    graph = {m: {t for t, top in _imports(m, p) if top and t in SOURCES and t != m} for m, p in SOURCES.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*trail[trail.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_no_lookup_by_name_and_no_ui_in_kvcore(module):
    text = SOURCES[module].read_text(encoding="utf-8")
    for lookup in ("import_module(", "__import__("):
        assert lookup not in text, f"{module} looks modules up by name"
    if module.startswith("kvcore"):
        for statement in ("import streamlit", "from streamlit", "import plotly", "from plotly"):
            assert statement not in text, f"{module}: {statement}"
