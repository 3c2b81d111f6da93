"""The package's layering, checked on its source: lower layers never import higher ones, and no
module imports another's private names. Read from the syntax tree, so an import inside a
function counts as much as one at the top (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import defectlens

ROOT = Path(defectlens.__file__).parent

# What the applications are: nothing but themselves and the entry point may import them.
APPLICATIONS = {"cli", "serve", "distributed", "demo"}
# The foundation every method and application stands on: it imports nothing above it.
FOUNDATION = {"components", "backbones", "data", "errors", "params", "outputs", "results"}
ABOVE_FOUNDATION = {
    "methods",
    "training",
    "detector",
    "io",
    "loading",
    "runtime",
    "prediction",
    "evaluation",
    "selection",
    "scoring",
    "report",
} | APPLICATIONS
# A method is a module on components: the Detector, saving and the runtimes wrap it.
ABOVE_METHODS = {"detector", "io", "loading", "runtime", "evaluation", "selection"} | APPLICATIONS


def _imports() -> list[tuple[str, str, list[str]]]:
    """(importing module's package, imported module, names) for every defectlens import."""
    found = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        package = parts[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("defectlens"):
                found.append((package, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("defectlens"):
                        found.append((package, alias.name, []))
    return found


def _target(module: str, names: list[str]) -> set[str]:
    """The top-level packages an import reaches (`from defectlens import metrics` reaches
    metrics)."""
    parts = module.split(".")
    if len(parts) > 1:
        return {parts[1]}
    return {n for n in names if (ROOT / n).exists() or (ROOT / f"{n}.py").exists()}


def test_the_import_walk_sees_the_package():
    packages = {package for package, _, _ in _imports()}
    assert {"cli", "methods", "components", "detector", "serve"} <= packages


def test_applications_are_imported_only_by_themselves_and_the_entry_point():
    wrong = [
        (package, module)
        for package, module, names in _imports()
        for target in _target(module, names)
        if target in APPLICATIONS and package != target and package not in ("cli", "__main__")
    ]
    assert wrong == []


def test_the_foundation_imports_nothing_above_it():
    wrong = [
        (package, module)
        for package, module, names in _imports()
        if package in FOUNDATION and _target(module, names) & ABOVE_FOUNDATION
    ]
    assert wrong == []


def test_methods_do_not_import_what_wraps_them():
    wrong = [
        (package, module)
        for package, module, names in _imports()
        if package == "methods" and _target(module, names) & ABOVE_METHODS
    ]
    assert wrong == []


def test_no_module_imports_another_modules_private_names():
    wrong = [
        (package, module, name)
        for package, module, names in _imports()
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert wrong == []
