"""The package's import graph: no circles, and no import from a lower layer to a higher one.

Every ``import`` / ``from ... import`` statement of every module under ``vlmfast/`` counts, the ones inside
functions included (a lazy import is still a dependency); only ``if TYPE_CHECKING:`` blocks are skipped (they
never run). A module belongs to the layer of the longest prefix in ``LAYERS``; an import may go to its own layer
or a lower one. docs/architecture.md (Layering) draws the same picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "vlmfast"

#: lowest first. The library is everything up to the package root; datasets and the tools sit above it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("vlmfast.errors", "vlmfast._compat", "vlmfast._logging", "vlmfast.hooks", "vlmfast.stats",
              "vlmfast.kv_quant", "vlmfast.argtypes", "vlmfast.budget")),
    ("adapters", ("vlmfast.adapters",)),
    ("contract", ("vlmfast.method", "vlmfast.registry")),
    ("core", ("vlmfast.attention", "vlmfast.layer_stage", "vlmfast.request", "vlmfast.decoding", "vlmfast.inputs")),
    ("zoo", ("vlmfast.zoo",)),
    ("methods", ("vlmfast.pruners", "vlmfast.sparse", "vlmfast.reweight", "vlmfast.grounding")),
    ("policy", ("vlmfast.policy",)),
    ("accelerator", ("vlmfast.accelerator",)),
    ("package", ("vlmfast",)),
    # above the library
    ("datasets", ("vlmfast.datasets",)),
    ("eval", ("vlmfast.eval",)),
    ("search", ("vlmfast.search",)),
    ("bench", ("vlmfast.bench",)),
    ("integrations", ("vlmfast.integrations",)),
    ("demo", ("vlmfast.demo",)),
    ("cli", ("vlmfast.cli", "vlmfast.__main__")),
]
#: top-level folders of the repository that the package must never import
OUTSIDE = ("training", "tests", "demo", "examples")


def modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package __init__)"""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports(name: str, path: Path, is_pkg: bool, known: set[str]) -> set[str]:
    """The modules of the package (and the OUTSIDE names) that ``name`` imports."""
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        for t in targets:
            if t.split(".")[0] in OUTSIDE:
                out.add(t.split(".")[0])
                continue
            while t and t not in known:  # `from pkg import name`: the submodule if there is one, else pkg
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    g = {}
    for name, (path, is_pkg) in mods.items():
        g[name] = imports(name, path, is_pkg, known)
    return g


def layer_of(name: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"module {name} is in no layer of LAYERS: add it")
    return rank


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    found = cycles(graph())
    assert not found, "import circles (each a set of modules that import each other):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_no_upward_import():
    bad = []
    for name, deps in sorted(graph().items()):
        for d in sorted(deps):
            if d in OUTSIDE:
                bad.append(f"{name} imports the repository's {d}/ (never imported by the package)")
            elif layer_of(d) > layer_of(name):
                bad.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})")
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


@pytest.mark.parametrize("source, expected", [
    ("import vlmfast.accelerator\n", {"vlmfast.accelerator"}),
    ("from ..policy import Policy\n", {"vlmfast.policy"}),
    ("from . import fopru\n", {"vlmfast.pruners.fopru"}),
    ("def f():\n    from ..eval import shapes\n", {"vlmfast.eval.shapes"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..request import Request\n", set()),
    ("import training.train_sam\n", {"training"}),
])
def test_the_walker_sees_each_kind_of_import(tmp_path, source, expected):
    """The checks above are only as good as the walk: each kind of statement, a lazy import, a skipped
    TYPE_CHECKING block (module: vlmfast.pruners.x)."""
    path = tmp_path / "x.py"
    path.write_text(source)
    known = set(modules()) | {"vlmfast.pruners.x"}
    got = imports("vlmfast.pruners.x", path, False, known) - {"typing"}
    assert got == expected


def test_a_circle_and_an_upward_import_are_caught():
    g = {"vlmfast.policy": {"vlmfast.accelerator"}, "vlmfast.accelerator": {"vlmfast.policy"}}
    assert cycles(g) == [["vlmfast.accelerator", "vlmfast.policy"]]
    assert layer_of("vlmfast.eval.shapes") > layer_of("vlmfast.accelerator") > layer_of("vlmfast.policy")
