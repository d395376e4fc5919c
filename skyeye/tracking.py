"""MLflow bookkeeping: where validation results (and later training and evaluation
runs) are recorded, keyed by the DVC hash of the data they concern. The audit reads
these records back; there is no side ledger.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from .config import Settings, configure_environment, get_settings

VALIDATION_EXPERIMENT = "skyeye-data-validation"
TAG_DVC_MD5 = "skyeye.data.dvc_md5"
TAG_GIT_REV = "skyeye.data.git_rev"
TAG_OUTCOME = "skyeye.validation.outcome"


def setup(settings: Settings | None = None) -> str:
    """Point MLflow at the configured store (embedded SQLite by default); returns the URI."""
    s = configure_environment(settings or get_settings())
    uri = s.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str, settings: Settings | None = None) -> str:
    """The experiment's id, created with artifacts under mlruns/ when the store is local."""
    s = settings or get_settings()
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if s.tracking_uri.startswith("sqlite:///"):
        location = Path(s.artifact_root, name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def log_validation(result, md5: str | None, git_rev: str | None, settings: Settings | None = None) -> str:
    """Record a data-gate result as an MLflow run tagged with the data version; returns the run id."""
    setup(settings)
    exp = experiment_id(VALIDATION_EXPERIMENT, settings)
    outcome = "passed" if result.success else "failed"
    tags = {TAG_DVC_MD5: md5 or "unversioned", TAG_GIT_REV: git_rev or "uncommitted", TAG_OUTCOME: outcome}
    with mlflow.start_run(experiment_id=exp, run_name=f"validate-{(md5 or 'unversioned')[:8]}", tags=tags) as run:
        mlflow.log_metrics({"records": result.n_records, "failed_expectations": len(result.failures),
                            "seconds": result.seconds})
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "validation.json"
            report.write_text(json.dumps(result.to_dict(), indent=1, default=str))
            mlflow.log_artifact(str(report))
        docs = getattr(result, "data_docs_index", None)
        if docs and Path(docs).exists():
            mlflow.log_artifacts(str(Path(docs).parent), artifact_path="data_docs")
        return run.info.run_id


def validation_outcome(md5: str, settings: Settings | None = None) -> str | None:
    """'passed' / 'failed' for the newest validation of this data version, None if never validated."""
    setup(settings)
    client = MlflowClient()
    exp = client.get_experiment_by_name(VALIDATION_EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_DVC_MD5}` = '{md5}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].data.tags.get(TAG_OUTCOME) if runs else None
