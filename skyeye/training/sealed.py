"""Test splits stay sealed while a model trains: inside `sealed_folder(path)`, opening any
file under `path` (the instruction folder's `eval/`) raises PermissionError, in this process.

A config check (`StageConfig`) refuses a stage file that names a test split; this guard
also covers code that would reach one some other way. It is a Python audit hook (PEP 578),
which sees every `open()`, `os.open` and what is built on them (json, PIL, torch.load), so
the tuning run's record "test splits read: none" is observed, not assumed. Audit hooks
cannot be removed: the hook is installed once per process and does nothing outside the
`with` block.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_sealed: list[str] = []  # absolute folder paths sealed now, each ending in os.sep
_installed = False


def _hook(event: str, args: tuple) -> None:
    if event != "open" or not _sealed or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.abspath(os.fsdecode(args[0]))
    for folder in _sealed:
        if path.startswith(folder):
            raise PermissionError(f"{path}: a test split is sealed while a model trains (only the evaluation "
                                  f"reads {folder}); training reads the validation splits")


@contextmanager
def sealed_folder(path: str | Path) -> Iterator[None]:
    """Refuse to open anything under `path` in this process until the block ends."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
    folder = os.path.join(os.path.abspath(path), "")
    _sealed.append(folder)
    try:
        yield
    finally:
        _sealed.remove(folder)
