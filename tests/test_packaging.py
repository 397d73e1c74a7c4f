"""What the library imports is what `pyproject.toml` declares: every third-party module imported anywhere in
`models/`, `distill/` or `vishwam/` (at the top or inside a function) comes from a declared dependency, not from
one that happens to arrive through another package (tqdm once did)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "distill", "vishwam")


def _declared() -> set[str]:
    """The dependencies, and the optional extras the library offers (not `dev`, the tests'): an extra's module
    is imported where it is used (test_structure's LAZY_OK), and CI imports every module without the extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    deps = project["dependencies"] + [d for name, ds in extras.items() if name != "dev" for d in ds]
    return {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def _imported_roots() -> dict[str, str]:
    roots = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                for name in names:
                    roots.setdefault(name.split(".")[0], f"{path.relative_to(ROOT)}:{node.lineno}")
    return roots


def test_every_third_party_import_is_a_declared_dependency():
    declared = _declared()
    providers = importlib.metadata.packages_distributions()
    missing = []
    for root, where in sorted(_imported_roots().items()):
        if root in sys.stdlib_module_names or root in PACKAGES or root == "__future__":
            continue
        dists = {d.lower().replace("_", "-") for d in providers.get(root, [])}
        if not dists & declared:
            missing.append(f"{root} ({where}; from {sorted(dists) or 'no installed distribution'})")
    assert not missing, "imported but not declared in pyproject.toml: " + ", ".join(missing)
