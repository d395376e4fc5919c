"""The data gate as the platform runs it: validate the instruction folder, then store the
outcome in MLflow as a run of the validation experiment, tagged with the data version
(DVC hash + git revision) it belongs to. The audit and the promotion policy read these
runs back; there is no side ledger."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..config import LeakageConfig, Settings, get_settings
from ..formats.licences import card_licences
from ..tracking import runs
from ..tracking.names import (
    TAG_DVC_MD5,
    TAG_GIT_REV,
    TAG_OUTCOME,
    UNCOMMITTED,
    UNVERSIONED,
    VALIDATION_EXPERIMENT,
    licences_tag,
)
from .expectations import ValidationResult, validate
from .leakage import LEAKAGE_FILE, configured
from .versioning import current_version


class GateFailed(RuntimeError):
    """The data did not pass the gate: what failed, and the MLflow run that records it."""
    def __init__(self, result: ValidationResult, run_id: str | None):
        self.result, self.run_id = result, run_id
        where = f" (MLflow run {run_id}, Data Docs among its artifacts)" if run_id else ""
        super().__init__(f"data gate failed{where}:\n{result.render()}")


def data_version_of(folder: Path, settings: Settings | None = None) -> tuple[str | None, str | None]:
    """(DVC md5, git rev) of data.dvc when `folder` lies in the tracked data/; else (None, None)."""
    s = settings or get_settings()
    folder = Path(folder).resolve()
    if not (s.project_root / "data.dvc").exists() or s.data not in (folder, *folder.parents):
        return None, None
    version = current_version(s.project_root)
    if version is None:
        return None, None
    return version.md5, version.git_rev


def log_validation(result: ValidationResult, md5: str | None, git_rev: str | None,
                   settings: Settings | None = None, licences: dict[str, str] | None = None) -> str:
    """Record a data-gate result as an MLflow run tagged with the data version (and its sources'
    licences, from its data card); returns the run id."""
    s = settings or get_settings()
    tags = {TAG_DVC_MD5: md5 or UNVERSIONED, TAG_GIT_REV: git_rev or UNCOMMITTED,
            TAG_OUTCOME: "passed" if result.success else "failed", **licences_tag(licences)}
    with runs.tracked_run(VALIDATION_EXPERIMENT, f"validate-{(md5 or UNVERSIONED)[:8]}", tags, settings=s) as run_id:
        client = runs.client(s)
        leaks = getattr(result, "leaks", [])  # a result recorded by other means may not say
        runs.log_metrics(run_id, {"records": result.n_records, "failed_expectations": len(result.failures),
                                  "seconds": result.seconds, "leak_pairs": len(leaks),
                                  "hashes_computed": getattr(result, "hashes_computed", 0)}, settings=s)
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "validation.json"
            report.write_text(json.dumps(result.to_dict(), indent=1, default=str))
            client.log_artifact(run_id, str(report))
            pairs = Path(tmp) / LEAKAGE_FILE  # every pair, also when there are none: the check ran
            pairs.write_text(json.dumps({"pairs": leaks}, indent=1))
            client.log_artifact(run_id, str(pairs))
        docs = getattr(result, "data_docs_index", None)
        if docs and Path(docs).exists():
            client.log_artifacts(run_id, str(Path(docs).parent), artifact_path="data_docs")
    return run_id


def validation_outcome(md5: str, settings: Settings | None = None) -> str | None:
    """'passed' / 'failed' for the newest validation of this data version, None if never validated."""
    client = runs.client(settings)
    exp = client.get_experiment_by_name(VALIDATION_EXPERIMENT)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_DVC_MD5}` = '{md5}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].data.tags.get(TAG_OUTCOME) if found else None


def run_gate(folder: Path, record: bool = True, settings: Settings | None = None,
             leakage: LeakageConfig | None = None) -> tuple[ValidationResult, str | None]:
    """Validate `folder`; with `record`, store the outcome against its data version.
    `leakage` defaults to the project's configs/data.yaml (its defaults if absent)."""
    s = settings or get_settings()
    # Data Docs show the latest run only (each run's copy goes to MLflow), so neither the
    # folder nor the artifacts grow with every validation.
    gx_root = s.state / "gx"
    shutil.rmtree(gx_root, ignore_errors=True)
    configured_leakage, cache = configured(s)
    result = validate(Path(folder), gx_root, leakage=leakage or configured_leakage, hash_cache=cache)
    run_id = None
    if record:
        md5, rev = data_version_of(folder, s)
        run_id = log_validation(result, md5, rev, s, card_licences(folder))
    return result, run_id
