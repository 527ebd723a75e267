"""The package's import graph has no cycle (docs/design.md §3, module graph).

Every ``import`` / ``from … import`` of a varkernels module is an edge, at module level and inside
functions alike (a cycle held together by imports inside functions is a cycle all the same), read
with ``ast`` from the sources, so nothing is imported to find it. Importing a submodule also runs
its packages' ``__init__``; those implicit edges are not counted (every module would then depend
on the package root), but what an ``__init__`` itself imports is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import varkernels

PACKAGE_DIR = Path(varkernels.__file__).resolve().parent

# Leaves: they import nothing of varkernels (the loader is also loaded by path by setup.py).
LEAVES = ("varkernels._validation", "varkernels._env", "varkernels.csrc_loader", "varkernels._docs",
          "varkernels._extras")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """{module: the varkernels modules it imports anywhere in its source}."""
    files = {module_name(p, root): p for p in root.rglob("*.py") if "__pycache__" not in p.parts}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:  # `import a.b.c` of a name inside a module: its module
                    t = t.rpartition(".")[0]
                if t and t != name and t.split(".")[0] == root.name:
                    edges.add(t)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_leaf_modules_import_nothing_of_the_package():
    graph = import_graph()
    for leaf in LEAVES:
        assert leaf in graph, f"{leaf} is missing"
        assert not graph[leaf], f"{leaf} imports {sorted(graph[leaf])}"


def test_the_walker_sees_imports_inside_functions(tmp_path):
    """The walker itself: a cycle closed by an import inside a function is found."""
    pkg = tmp_path / "varkernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    assert cycles(import_graph(pkg)) == [["varkernels.a", "varkernels.b"]]


def test_reference_is_not_built_on_the_kernels():
    """reference.py is the spec in code: it checks the kernels, it does not import them."""
    graph = import_graph()
    seen, todo = set(), ["varkernels.reference"]
    while todo:
        m = todo.pop()
        for t in graph[m] - seen:
            seen.add(t)
            todo.append(t)
    assert not {m for m in seen if m.startswith(("varkernels.core", "varkernels.var"))}, sorted(seen)


if __name__ == "__main__":  # python tests/test_imports.py [package dir]: print the graph
    import sys

    g = import_graph(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else PACKAGE_DIR)
    for m in sorted(g):
        print(f"{m} -> {', '.join(sorted(x.removeprefix('varkernels.') for x in g[m])) or '(nothing)'}")
    print("cycles:", cycles(g))


def test_import_loads_neither_triton_nor_dynamo():
    """``import varkernels`` stays quick: triton and torch._dynamo (which imports triton) load on first use."""
    import subprocess
    import sys

    code = "import sys, varkernels; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE_DIR.parent)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def test_constant_result_is_torch_compilers_marker():
    """``_env.constant_result`` sets what ``torch.compiler.assume_constant_result`` sets, and nothing else (a torch
    release that changes the mechanism fails here, not as a graph break in a user's compiled loop)."""
    import torch

    from varkernels._env import constant_result

    def a():
        return 1

    def b():
        return 1

    marker = {"_dynamo_marked_constant": True}
    assert vars(torch.compiler.assume_constant_result(a)) == vars(constant_result(b)) == marker
