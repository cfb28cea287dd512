"""The package's import graph (every import, at module level or inside a function): no cycles, and no module
imports a higher layer than its own (the layer order of docs/ARCHITECTURE.md)."""
from __future__ import annotations

import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "mmbert")
# Lowest first. A module may import its own layer and the ones below; a prefix ending in "." is a package.
LAYERS = [
    ("foundations", ["mmbert.errors", "mmbert.fsutil", "mmbert.metrics", "mmbert.models.registry",
                     "mmbert.settings"]),
    ("typed settings", ["mmbert.task", "mmbert.config"]),
    ("building blocks", ["mmbert.data.", "mmbert.models.", "mmbert.distributed."]),
    ("model folders and scoring", ["mmbert.artifact", "mmbert.assembly", "mmbert.ensemble", "mmbert.scoring",
                                   "mmbert.serving"]),
    ("jobs", ["mmbert.training.", "mmbert.evaluation.", "mmbert.export.", "mmbert.tools."]),
    ("Python API", ["mmbert.api", "mmbert"]),
    ("command line", ["mmbert.cli", "mmbert.__main__"]),
]


def _module_name(path: str) -> str:
    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def modules() -> dict[str, str]:
    return {_module_name(os.path.join(d, f)): os.path.join(d, f)
            for d, _, files in os.walk(PACKAGE) for f in files if f.endswith(".py")}


def _targets(module: str, is_package: bool, node, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = module if is_package else module.rsplit(".", 1)[0]
        if node.level:
            base = ".".join(base.split(".")[: len(base.split(".")) - node.level + 1])
            target = base + ("." + node.module if node.module else "")
        else:
            target = node.module or ""
        names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
    out = []
    for name in names:
        while name and name not in known:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        if name and name != module:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        graph[name] = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                       for t in _targets(name, path.endswith("__init__.py"), node, set(mods))}
    return graph


def layer_of(module: str) -> int:
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix.rstrip(".") or (prefix.endswith(".") and module.startswith(prefix))]
    assert matches, f"{module} is in no layer of tests/test_imports.py LAYERS: place it"
    return max(matches)[1]  # the most specific prefix wins (mmbert.models.registry over mmbert.models.)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_whole():
    graph = import_graph()
    assert "mmbert.config" in graph["mmbert.cli"] and "mmbert.errors" in graph["mmbert.config"]
    assert len(graph) > 40


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_upward_imports():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in import_graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert upward == [], "\n".join(upward)
