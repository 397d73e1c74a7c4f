"""The layering of the three packages: `models` <- `distill` <- `vishwam`, no import cycles, imports at the top;
inside `vishwam`, subpackages of at most 12 modules that import one way.

Read from the source with `ast` (nothing is imported), so a new upward import or cycle fails here by name.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "distill", "vishwam")
LAYER = {"models": 0, "distill": 1, "vishwam": 2}
#: Imports allowed inside functions: optional heavy dependencies, imported only when a feature is on.
LAZY_OK = {"aim", "pyarrow", "datasets", "lm_eval"}  # optional: aim at run time only; [data]: pyarrow, datasets; [eval]: lm_eval
MAX_LINES = 450
MAX_MODULES_A_FOLDER = 12


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, Path]) -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported project module, line, at module top)]."""
    graph: dict[str, list[tuple[str, int, bool]]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        edges = []
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                edges.append((target, node.lineno, id(node) in top))
        graph[module] = edges
    return graph


def test_dependencies_point_one_way():
    modules = _modules()
    bad = []
    for module, edges in _imports(modules).items():
        for target, line, _ in edges:
            root = target.split(".")[0]
            if root in LAYER and LAYER[root] > LAYER[module.split(".")[0]]:
                bad.append(f"{modules[module].relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "imports against the layering models <- distill <- vishwam:\n" + "\n".join(bad)


def test_import_graph_is_acyclic():
    modules = _modules()
    graph = {m: sorted({t for t, _, _ in edges if t in modules and t != m}) for m, edges in _imports(modules).items()}
    # A package's __init__ that re-exports its submodules is imported *by* them only through a cycle.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_imports_sit_at_module_top():
    modules = _modules()
    inner = [f"{modules[m].relative_to(ROOT)}:{line} imports {t}"
             for m, edges in _imports(modules).items() for t, line, at_top in edges
             if not at_top and t.split(".")[0] not in LAZY_OK]
    assert not inner, "imports inside functions or blocks:\n" + "\n".join(inner)


def test_no_module_is_a_hub_of_hundreds_of_lines():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)


def test_the_library_never_imports_torch():
    users = [f"{m}:{line}" for m, edges in _imports(_modules()).items() for t, line, _ in edges
             if t.split(".")[0] in ("torch", "transformers")]
    assert not users, users


def _unit(module: str) -> str:
    """The package-graph node of a `vishwam` module: its subpackage (`vishwam.plan`), or itself at the root."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_vishwam_subpackages_import_one_way():
    """The graph of `vishwam`'s subpackages (and root modules) is acyclic: a package never imports one that
    imports it back, also through others."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for module, edges in _imports(modules).items():
        if not module.startswith("vishwam.") or module == "vishwam":
            continue
        for target, line, _ in edges:
            if target.startswith("vishwam.") and target in modules and _unit(target) != _unit(module):
                graph.setdefault(_unit(module), set()).add(_unit(target))
                where.setdefault((_unit(module), _unit(target)), f"{modules[module].relative_to(ROOT)}:{line}")
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str):
        state[u] = 1
        stack.append(u)
        for t in sorted(graph.get(u, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                edges = [where[(a, b)] for a, b in zip(cycle, cycle[1:])]
                raise AssertionError("package cycle: " + " -> ".join(cycle) + " (" + ", ".join(edges) + ")")
            if t not in state:
                visit(t)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)
    assert len(graph) >= 8, sorted(graph)  # the graph was read: the subpackages import each other


def test_no_folder_holds_more_than_twelve_modules():
    folders: dict[Path, int] = {}
    for path in _modules().values():
        if path.name != "__init__.py":
            folders[path.parent] = folders.get(path.parent, 0) + 1
    big = [f"{f.relative_to(ROOT)}: {n} modules" for f, n in folders.items() if n > MAX_MODULES_A_FOLDER]
    assert not big, f"folders over {MAX_MODULES_A_FOLDER} modules:\n" + "\n".join(big)


def test_every_package_says_what_it_owns():
    """Each package's `__init__.py` opens with a docstring naming what it owns and what it may import."""
    bare = []
    for module, path in _modules().items():
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if len(doc.split()) < 20 or "import" not in doc.lower():
                bare.append(str(path.relative_to(ROOT)))
    assert not bare, "packages without a docstring of what they own and import:\n" + "\n".join(bare)
