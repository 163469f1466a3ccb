"""The shape of the code, checked from its imports (docs/architecture.md): no import circle
among moerun's modules, backends that use only the published toolkit, and a core that
imports no backend or plugin."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package-dir of pyproject.toml: folder -> dotted package
PACKAGES = {"core": "moerun", "backends": "moerun.backends", "plugins": "moerun.plugins"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """moerun modules `name` imports, at any depth of its code (lazy imports count: a circle
    through a function body is still a circle a reader has to untangle)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _without_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges into a package's __init__ are dropped where they only reach the package itself
    (`from moerun import x` from inside moerun re-exports, not a dependency of the init)."""
    packages = {n for n, p in _modules().items() if p.name == "__init__.py"}
    return {n: {t for t in ts if t not in packages} for n, ts in graph.items() if n not in packages}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_moerun_modules():
    graph = _without_packages(_graph())
    assert "moerun.runner" in graph and "moerun.point" in graph["moerun.runner"]  # the graph is read
    assert _cycles(graph) == []


def test_backends_use_only_the_toolkit():
    allowed = {"moerun.toolkit"}
    for name, targets in _graph().items():
        if not name.startswith("moerun.backends."):
            continue
        outside = {t for t in targets if not t.startswith("moerun.backends") and t not in allowed}
        assert not outside, f"{name} imports {sorted(outside)}; backends import moerun.toolkit only"


def test_the_core_imports_no_backend_or_plugin():
    for name, targets in _graph().items():
        if name.startswith(("moerun.backends", "moerun.plugins")):
            continue
        inner = {t for t in targets if t.startswith(("moerun.backends", "moerun.plugins"))}
        assert not inner, f"{name} imports {sorted(inner)}"
