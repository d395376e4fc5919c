"""The project code a piece of code runs, found statically, and its digest: what a cached
result must be keyed on so that a code change is never answered with a stale result.

A module's imports are read with `ast` from its source, wherever they are (inside functions
too: the code here imports lazily), and followed while they name a file under the project
root; anything else (the standard library, third-party packages) is left out.
"""
from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `skyeye` package


def module_file(name: str, root: Path) -> Path | None:
    """The source of project module `name` under `root`; None when it is not project code."""
    base = root.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def imported_names(tree: ast.AST, package: str) -> set[str]:
    """Every module the import statements in `tree` may load, absolute; `package` is the one
    relative imports start from. `from a import b` also gives `a.b` (b may be a submodule),
    and every dotted name gives its parent packages (their __init__ runs too)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from ..a import b: up level - 1 packages from `package`
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return found


@cache  # the code does not change under a running process
def import_closure(modules: frozenset[str], root: Path = ROOT) -> tuple[Path, ...]:
    """The files of these project modules and of every project module they import, transitively."""
    files: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        path = module_file(name, root) if name not in files else None
        if path is None:
            continue
        files[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo += imported_names(ast.parse(path.read_bytes()), package)
    return tuple(sorted(set(files.values())))


def code_digest(modules: Iterable[str], root: Path = ROOT) -> str:
    """One hash of the source of these project modules and of everything they import."""
    h = hashlib.sha256()
    for path in import_closure(frozenset(modules), root):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()
