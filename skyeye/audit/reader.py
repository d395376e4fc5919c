"""Where the audit reads: MLflow runs, experiments and model versions, the git history of
data.dvc and the validation runs of a data version, looked up for `chain` by `Reader`
with per-audit caches, and turned into the records of `records`. A run or data.dvc
revision that cannot be found comes back as "missing: <why>".

Apart from `chain` so that the lookups and the way the links are followed stay
separate; it imports nothing of `chain`.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from ..config import Settings, get_settings
from ..datagate.versioning import DVC_FILE, VersioningError, dvc_file_at, git, parse_dvc_file
from ..formats.benchmarks import VALIDATION, primary_metric
from ..tracking import runs
from ..tracking.names import (
    TAG_DVC_MD5,
    TAG_GIT_COMMIT,
    TAG_GIT_REV,
    TAG_KIND,
    TAG_MODEL_DIR,
    TAG_OUTCOME,
    TAG_PARENT,
    TAG_STAGE,
    TAG_TEST_SPLITS_READ,
    VALIDATION_EXPERIMENT,
    read_licences,
)
from .records import GitRevision, RunSummary, Validation, md5_key, missing

# What a training run is judged by at a glance: its loss, the scores of the stage configs'
# validation sets, its wall time.
KEY_METRICS = ("loss", *(VALIDATION + primary_metric(k) for k in ("dior_rsvg_val", "rsvqa_lr_val",
                                                                  "ucm_captions_val")), "wall_s")


def md5_variants(md5: str) -> list[str]:
    return [md5_key(md5) + ".dir", md5_key(md5)]


def when(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds") if ms else None


class Reader:
    """MLflow and git lookups shared by both audits, with per-audit caches."""

    def __init__(self, settings: Settings | None):
        self.settings = settings or get_settings()
        self.client = runs.client(self.settings)
        self.root = Path(self.settings.project_root).resolve()
        self._experiments: dict[str, str] = {}
        self._dvc_log: list[tuple[str, str, str, str | None]] | None = None

    def experiment_name(self, experiment_id: str) -> str:
        if experiment_id not in self._experiments:
            self._experiments[experiment_id] = self.client.get_experiment(experiment_id).name
        return self._experiments[experiment_id]

    def run(self, run_id: str | None, what: str) -> tuple[Any, str | None]:
        """(run, None), or (run or None, "missing: ...") when it is absent or deleted."""
        if not run_id:
            return None, missing(f"no {what} recorded")
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None, missing(f"{what} {run_id} is not in the tracking store {self.settings.tracking_uri} "
                                 "(deleted and garbage-collected, or logged to another store)")
        if run.info.lifecycle_stage == "deleted":
            return run, missing(f"{what} {run_id} was deleted")
        return run, None

    def summary(self, run: Any, metrics: tuple[str, ...] | None = KEY_METRICS) -> RunSummary:
        tags, info = run.data.tags, run.info
        values = run.data.metrics
        return RunSummary(
            run_id=info.run_id, name=info.run_name, experiment=self.experiment_name(info.experiment_id),
            kind=tags.get(TAG_KIND), stage=tags.get(TAG_STAGE), status=info.status, started=when(info.start_time),
            deleted=info.lifecycle_stage == "deleted",
            metrics={k: values[k] for k in (values if metrics is None else metrics) if k in values},
            data_md5=tags.get(TAG_DVC_MD5), data_git_rev=tags.get(TAG_GIT_REV),
            dataset_digests=[d.dataset.digest for d in (run.inputs.dataset_inputs if run.inputs else [])],
            git_commit=tags.get(TAG_GIT_COMMIT), model_dir=tags.get(TAG_MODEL_DIR),
            test_splits_read=tags.get(TAG_TEST_SPLITS_READ))

    def children(self, parent_id: str, experiment_id: str) -> list[Any]:
        return list(self.client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}'",
                                            run_view_type=ViewType.ALL, order_by=["attributes.start_time ASC"]))

    def search(self, experiment: str, filters: list[str], view: int = ViewType.ACTIVE_ONLY) -> list[Any]:
        """Runs matching any of the filters, newest first, each once."""
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        found: dict[str, Any] = {}
        for f in filters:
            for run in self.client.search_runs([exp.experiment_id], filter_string=f, run_view_type=view):
                found[run.info.run_id] = run
        return sorted(found.values(), key=lambda r: r.info.start_time or 0, reverse=True)

    def validations(self, md5: str) -> list[Validation]:
        found = self.search(VALIDATION_EXPERIMENT, [f"tags.`{TAG_DVC_MD5}` = '{v}'" for v in md5_variants(md5)])
        return [Validation(r.info.run_id, r.data.tags.get(TAG_OUTCOME) or missing(f"run has no {TAG_OUTCOME} tag"),
                           when(r.info.start_time), r.data.tags.get(TAG_GIT_REV), read_licences(r.data.tags))
                for r in found]

    def dvc_log(self) -> list[tuple[str, str, str, str | None]]:
        """(rev, date, subject, md5 or None) for every commit on any branch that touched data.dvc."""
        if self._dvc_log is None:
            self._dvc_log = []
            out = git(self.root, "log", "--all", "--format=%H%x1f%cI%x1f%s", "--", DVC_FILE, check=False)
            for line in out.stdout.splitlines() if out.returncode == 0 else []:
                rev, date, subject = line.split("\x1f", 2)
                text = dvc_file_at(self.root, rev)
                try:
                    md5 = parse_dvc_file(text, f"{DVC_FILE} at {rev[:12]}")["md5"] if text else None
                except VersioningError:
                    md5 = None
                self._dvc_log.append((rev, date, subject, md5))
        return self._dvc_log

    def revisions(self, md5: str) -> list[GitRevision] | str:
        if git(self.root, "rev-parse", "--git-dir", check=False).returncode != 0:
            return missing(f"{self.root} is not a git repository, so no {DVC_FILE} revision can be read")
        revs = [GitRevision(rev, date, subject) for rev, date, subject, m in self.dvc_log()
                if m and md5_key(m) == md5_key(md5)]
        return revs or missing(f"DVC md5 {md5} is in no committed revision of {DVC_FILE} in {self.root}")

    def versions(self, name: str) -> list[Any]:
        try:
            found = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            return []
        # Searches may leave aliases out; a direct read has them.
        return sorted((self.client.get_model_version(name, v.version) for v in found), key=lambda v: int(v.version))

