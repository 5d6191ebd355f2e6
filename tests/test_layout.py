"""The package layout reads like the pipeline (DESIGN.md section 1.1): no import cycles among opgen's modules,
imports flow one way (``opgen.ir`` <- ``opgen.schedules`` <- ``opgen.targets`` <- ``opgen``), and no file in
``targets/`` or ``schedules/`` is over 1000 lines.

The import graph is read from the sources with ``ast`` (nothing is imported): every ``.py`` under ``opgen/``,
``ir/`` (``opgen.ir``), ``schedules/`` (``opgen.schedules``) and ``targets/`` (``opgen.targets``), with the
imports at module level and inside functions (a function-level import closes a cycle at run time just as well).
Imports under ``if TYPE_CHECKING:`` never run: they are left out of the cycle check and kept in the direction check.
``from package import name`` counts as an import of ``package.name`` when that is a module, else of ``package``.

Known debts in files other engineers own are strict xfails that list them, so that the marker fails (and must be
removed) on the day they are fixed.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"opgen": "opgen", "opgen.ir": "ir", "opgen.schedules": "schedules", "opgen.targets": "targets"}
LAYERS = ("opgen.ir", "opgen.schedules", "opgen.targets", "opgen")     # lower first: a layer imports only lower ones
MAX_LINES = 1000


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package ``__init__``)."""
    out = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = list(f.relative_to(ROOT / folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join([pkg] + parts)] = (f, is_pkg)
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, is_pkg: bool, known) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, typing only) for every import statement of the file."""
    package = name if is_pkg else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for stmt in child.body:
                    visit_stmt(stmt, True)
                for stmt in child.orelse:
                    visit_stmt(stmt, typing_only)
            else:
                visit_stmt(child, typing_only)

    def visit_stmt(node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((a.name, node.lineno, typing_only) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:
                sub = f"{module}.{a.name}"
                found.append((sub if sub in known else module, node.lineno, typing_only))
        else:
            visit(node, typing_only)

    visit(ast.parse(path.read_text(), str(path)), False)
    return [(m, line, t) for m, line, t in found if m in known and m != name]


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    """Modules and their imports; an edge's ``runtime`` is False when every import behind it is typing-only."""
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, (path, is_pkg) in mods.items():
        for target, line, typing_only in _imports(name, path, is_pkg, mods):
            if g.has_edge(name, target):
                g[name][target]["runtime"] |= not typing_only
                g[name][target]["lines"].append(line)
            else:
                g.add_edge(name, target, runtime=not typing_only, lines=[line])
    return g


def _layer(module: str) -> str:
    return next(layer for layer in LAYERS if module == layer or module.startswith(layer + "."))


def _cycles(g: nx.DiGraph, layers: tuple[str, ...]) -> list[list[str]]:
    """The simple cycles of runtime imports that stay inside ``layers`` (a cycle across layers is also an
    import-direction violation, reported by the direction test)."""
    runtime = nx.DiGraph([(a, b) for a, b, d in g.edges(data=True) if d["runtime"]
                          and _layer(a) in layers and _layer(b) in layers])
    return sorted((c for c in nx.simple_cycles(runtime)), key=lambda c: (len(c), c))


def _violations(g: nx.DiGraph, layers: tuple[str, ...]) -> list[str]:
    """Imports from a module of ``layers`` into a higher layer."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    out = []
    for a, b, d in sorted(g.edges(data=True)):
        if _layer(a) in layers and rank[_layer(b)] > rank[_layer(a)]:
            out.append(f"{a} (line {min(d['lines'])}) imports {b}")
    return out


def test_graph_sees_the_packages(graph):
    for name in ("opgen", "opgen.ir", "opgen.ir.passes.window", "opgen.schedules.window", "opgen.targets.tvm.window",
                 "opgen.targets.triton.scan", "opgen.tune.tuner"):
        assert name in graph, name
    assert graph.has_edge("opgen.targets.tvm.window", "opgen.schedules.window")
    assert graph.has_edge("opgen.schedules.window", "opgen.schedules.window_static")


# ------------------------------------------------------------------------------------------------ (a) cycles


def test_no_import_cycles_in_schedules_and_targets(graph):
    cycles = _cycles(graph, ("opgen.schedules", "opgen.targets"))
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_cycles_in_ir(graph):
    cycles = _cycles(graph, ("opgen.ir",))
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_cycles_in_opgen_top_level(graph):
    cycles = _cycles(graph, ("opgen",))
    assert cycles == [], f"{len(cycles)} cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


# --------------------------------------------------------------------------------------------- (b) direction


@pytest.mark.parametrize("layers", [("opgen.ir",), ("opgen.schedules",), ("opgen.targets",)])
def test_imports_flow_one_way(graph, layers):
    """Nothing in ir/ imports schedules, targets or the top-level opgen modules; nothing in schedules/ imports
    targets or top-level opgen; nothing in targets/ imports top-level opgen (opgen.ops, opgen.runtime, opgen.tune,
    ...)."""
    bad = _violations(graph, layers)
    assert bad == [], "\n".join(bad)


# --------------------------------------------------------------------------------------------- (c) file sizes


def test_no_file_in_targets_or_schedules_over_1000_lines(capsys):
    sizes = {}
    for folder in ("targets", "schedules"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            sizes[str(f.relative_to(ROOT))] = len(f.read_text().splitlines())
    with capsys.disabled():
        print("\nlines per file (targets/, schedules/), largest first:")
        for path, n in sorted(sizes.items(), key=lambda kv: -kv[1]):
            print(f"  {n:5d}  {path}")
    big = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert big == {}, f"files over {MAX_LINES} lines: {big}"
