"""The data gate as the platform runs it: validate the instruction folder, then store
the outcome in MLflow against the data version (DVC hash + git revision) it belongs to."""
from __future__ import annotations

import shutil
from pathlib import Path

from .config import Settings, get_settings
from .validation import ValidationResult, validate


def data_version_of(folder: Path, settings: Settings) -> tuple[str | None, str | None]:
    """(DVC md5, git rev) of data.dvc when `folder` lies in the tracked data/; else (None, None)."""
    from .versioning import current_version
    folder = Path(folder).resolve()
    if not (settings.project_root / "data.dvc").exists() or settings.data not in (folder, *folder.parents):
        return None, None
    version = current_version(settings.project_root)
    if version is None:
        return None, None
    return version.md5, version.git_rev


def run_gate(folder: Path, record: bool = True, settings: Settings | None = None) -> tuple[ValidationResult, str | None]:
    s = settings or get_settings()
    # Data Docs show the latest run only (each run's copy goes to MLflow), so neither the
    # folder nor the artifacts grow with every validation.
    gx_root = s.state / "gx"
    shutil.rmtree(gx_root, ignore_errors=True)
    result = validate(Path(folder), gx_root)
    run_id = None
    if record:
        from . import tracking
        md5, rev = data_version_of(folder, s)
        run_id = tracking.log_validation(result, md5, rev, s)
    return result, run_id
