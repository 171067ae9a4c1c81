"""The package's layout rules, read from the source: no import cycle, layers import no training or
verification code, the gradient path never imports autodiff.

Imports are read with ``ast`` (nothing is imported), in two graphs:

* every import statement, also those inside functions (a late import hides
  a cycle from Python, not from the design);
* what Python runs at import time: module-level statements only, plus the
  ``__init__`` of each package a module imports from outside it (``from
  jaxprop.train.step import x`` runs ``jaxprop/train/__init__.py`` first).

``from P import name`` is an edge to the module ``P.name`` when that is a
module, else to ``P``. The root package ``jaxprop`` is a node like any other
(a module that the root imports must not import the root).
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxprop")


def _modules() -> dict:
    """``{module name: file path}`` for every ``.py`` file under jaxprop/."""
    out = {}
    base = os.path.dirname(ROOT)
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), base)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, "").endswith("__init__.py")


def _statements(tree, top_level_only: bool):
    """Import statements of a module; with ``top_level_only``, not those in
    function bodies (which run when called, not when the module is imported)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))


def _targets(module: str, node) -> set:
    """The jaxprop modules one import statement of ``module`` names."""
    if isinstance(node, ast.Import):                  # import a.b.c: loads a.b.c
        return {a.name for a in node.names if a.name in MODULES}
    if node.level:                                    # relative: from . import x / from .a import b
        package = module if _is_package(module) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if base not in MODULES:
        return set()
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.add(sub if sub in MODULES else base)
    return out


def _graph(top_level_only: bool) -> dict:
    graph = {}
    for name, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        edges = set()
        for node in _statements(tree, top_level_only):
            edges |= _targets(name, node)
        if top_level_only:                        # importing a.b.c from outside a.b runs a.b's __init__
            for target in list(edges):
                parts = target.split(".")
                for i in range(2, len(parts)):
                    package = ".".join(parts[:i])
                    if not (name == package or name.startswith(package + ".")):
                        edges.add(package)
        edges.discard(name)
        graph[name] = edges
    return graph


def _cycle(graph: dict):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _reach(graph: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


ALL, AT_IMPORT = _graph(top_level_only=False), _graph(top_level_only=True)


def test_the_reader_sees_the_package():
    """The checks below can fail: the graph has the modules and edges it should."""
    for name in ("jaxprop", "jaxprop.core", "jaxprop.train", "jaxprop.train.step", "jaxprop.distributed",
                 "jaxprop.runner.cli", "jaxprop.layers.dense"):
        assert name in MODULES, name
    assert "jaxprop.train.step" in ALL["jaxprop.distributed"]
    assert "jaxprop.train" in AT_IMPORT["jaxprop.distributed"]        # the package's __init__ runs first
    assert "jaxprop.core" in ALL["jaxprop.layers.dense"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("graph", ["every import", "at import time"])
def test_no_import_cycle(graph):
    cycle = _cycle(ALL if graph == "every import" else AT_IMPORT)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


VERIFICATION_AND_TRAINING = ("jaxprop.train", "jaxprop.runner", "jaxprop.check", "jaxprop.testing",
                             "jaxprop.autodiff", "jaxprop.distributed", "jaxprop.cli", "jaxprop.models")


@pytest.mark.parametrize("layer", sorted(m for m in MODULES if m.startswith("jaxprop.layers")))
def test_layers_import_no_training_or_verification(layer):
    bad = sorted(m for m in _reach(ALL, layer) if _within(m, VERIFICATION_AND_TRAINING) or m == "jaxprop")
    assert not bad, f"{layer} imports (directly or through others) {bad}"


GRADIENT_PATH = ("jaxprop.core", "jaxprop.grad", "jaxprop.combinators", "jaxprop.layers", "jaxprop.losses",
                 "jaxprop.precision", "jaxprop.initializers", "jaxprop.train.step")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _within(m, GRADIENT_PATH)))
def test_gradient_path_never_imports_autodiff_at_import_time(module):
    """``jaxprop.train.step`` imports :mod:`jaxprop.autodiff` only when
    ``grad="autodiff"`` is asked for, so the import-time graph is the one to check."""
    bad = sorted(m for m in _reach(AT_IMPORT, module)
                 if _within(m, ("jaxprop.autodiff", "jaxprop.check", "jaxprop.testing")))
    assert not bad, f"{module} imports {bad} at import time"
