"""The project's import graph: no cycles, and no module imports from a floor above its own.

Floors (DEVELOPERS.md): benchmarks -> tools -> ascend -> common -> ops. Every `import` statement counts, also
the ones inside functions (a lazy import still ties the two modules together). Read with `ast`, nothing runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ("ops", "common", "ascend", "tools", "benchmarks")  # bottom to top


def project_modules() -> dict[str, Path]:
    mods = {}
    for floor in FLOORS:
        for f in sorted((ROOT / floor).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules `name` imports (`from pkg import sub` counts as pkg.sub when sub is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods]
            targets = subs if subs and len(subs) == len(node.names) else [module] + subs
        else:
            continue
        for t in targets:
            while t and t not in mods:  # `import a.b.c` of a non-module attribute: its module
                t = t.rpartition(".")[0]
            if t and t != name and t not in ancestors:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(m, p, mods) for m, p in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    cycles.append(sorted(comp))
    return cycles


def test_the_walker_sees_cycles_and_lazy_imports():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "ops.contract" in graph["ops.numpy_ref"] or "ops.contract" in graph["ops"]
    assert "ascend.torch_backend" in graph["ascend.backends"]  # imported inside get_backend


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_imports_a_floor_above_its_own():
    bad = []
    for m, targets in import_graph().items():
        for t in targets:
            if FLOORS.index(t.split(".")[0]) > FLOORS.index(m.split(".")[0]):
                bad.append(f"{m} -> {t}")
    assert not bad, "imports from a higher floor: " + ", ".join(sorted(bad))
