"""Every name SkyEye writes into MLflow: experiments, run and version tags, the values of
`skyeye.kind`. The one home of these names; the training, evaluation, gate, registry and
audit import them from here. Free of MLflow and torch, so light code (the audit, the
CLI) reads them without loading either.

Links live in these tags only (no side ledger): a stage run names its data version and
model folder, an evaluation run the training run it scored, a registered version its
evaluation run, training run, tuning job and data version.
"""
from __future__ import annotations

import json

# experiments
TUNING_EXPERIMENT = "skyeye-tuning"  # tuning jobs (parent runs) with their backbones / stage runs
EVALUATION_EXPERIMENT = "skyeye-evaluation"
# the same scoring on the validation splits (recipe checks); never a registry candidate
EVALUATION_ON_VALIDATION_EXPERIMENT = "skyeye-evaluation-on-validation"
VALIDATION_EXPERIMENT = "skyeye-data-validation"
IMPORT_EXPERIMENT = "skyeye-imports"  # checkpoints trained outside SkyEye, brought in as versions
MONITORING_EXPERIMENT = "skyeye-monitoring"  # drift monitor runs: a window of the inference log vs training data

# what a run is
TAG_KIND = "skyeye.kind"
KIND_TUNING_JOB, KIND_TUNING_STAGE = "tuning-job", "tuning-stage"
KIND_BACKBONES, KIND_EVALUATION = "backbones", "evaluation"
KIND_EVALUATION_ON_VALIDATION = "evaluation-on-validation"
KIND_IMPORT = "import"
KIND_DRIFT = "drift-monitor"
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: a stage run's tuning job

# the data a run saw, and the code that ran
TAG_DVC_MD5 = "skyeye.data.dvc_md5"
TAG_GIT_REV = "skyeye.data.git_rev"  # the commit of data.dvc holding that md5
TAG_GIT_COMMIT = "skyeye.git_commit"  # the project's HEAD when the run started
UNVERSIONED, UNCOMMITTED = "unversioned", "uncommitted"
# which test splits (`eval/` files) a run read: the bench splits on an evaluation run, `none` on a
# tuning run (observed: `skyeye.training.sealed` refuses to open them while a stage trains)
TAG_TEST_SPLITS_READ = "skyeye.test_splits_read"
NO_TEST_SPLITS = "none"
# the licence or terms of every source of that data (JSON {source: licence}, from its data card,
# skyeye.formats.licences); on gate, tuning and evaluation runs and on registered versions
TAG_DATA_LICENCES = "skyeye.data.licences"
DATASET_NAME = "skyeye-instructions"  # the instruction data as a run's dataset input (digest: DVC md5)

# tuning runs
TAG_STAGE = "skyeye.stage"
TAG_MODEL_DIR = "skyeye.model_dir"  # the model folder a stage wrote, or an evaluation scored
TAG_INIT_RUN = "skyeye.init_run"  # on a stage-2 run: the stage-1 run it started from
TAG_BACKBONES_KEY = "skyeye.backbones.key"
TAG_BACKBONES_DIR = "skyeye.backbones.dir"

# validation runs
TAG_OUTCOME = "skyeye.validation.outcome"  # "passed" | "failed"

# evaluation runs
TAG_EVAL_BENCHMARKS = "skyeye.eval.benchmarks"
TAG_EVAL_TRAINING_RUN = "skyeye.eval.training_run"  # the stage run that wrote the scored model
TAG_MODEL_VERSION = "skyeye.model_version"  # the registered version this evaluation stands behind

# registered model versions (and TAG_DVC_MD5, TAG_GIT_REV, TAG_MODEL_DIR)
TAG_EVAL_RUN = "skyeye.eval_run"
TAG_TRAINING_RUN = "skyeye.training_run"
TAG_TUNING_JOB = "skyeye.tuning_job"  # also on evaluation runs
TAG_BACKBONES = "skyeye.backbones"  # where each backbone comes from (artifact, folder or hub id), JSON
# on an imported version (and its import run): the file it came from, JSON {format, file, bytes, sha256};
# such a version has no SkyEye data version (its training data is the authors')
TAG_IMPORTED = "skyeye.imported"
IMPORTED_DATA = "none: imported"
# the tasks the version is approved for (JSON list, e.g. ["caption", "vqa"]): those whose primary metric is
# significantly above the task's trivial baseline on every split (skyeye.evaluation.baselines.approved_tasks)
TAG_APPROVED_TASKS = "skyeye.approved_tasks"
# one record per decision, a JSON tag on the version: `skyeye.promotion.<alias>` (the last move of
# the alias to it), `skyeye.refusal.<alias>` (the last refusal), `skyeye.rollback.<alias>`
PROMOTION, REFUSAL, ROLLBACK = "skyeye.promotion", "skyeye.refusal", "skyeye.rollback"
# serving, on the version: since when it is served, where, the version it replaced, and until when
TAG_SERVED_SINCE, TAG_SERVED_ENDPOINT = "skyeye.serving.since", "skyeye.serving.endpoint"
TAG_SERVED_REPLACED, TAG_SERVED_UNTIL = "skyeye.serving.replaced", "skyeye.serving.until"
# every period the version was served: JSON list of {endpoint, since, until} (until null while served)
TAG_SERVED_PERIODS = "skyeye.serving.periods"
MAX_PERIODS = 40  # the newest kept: a tag holds at most a few thousand characters


def serving_periods(tags: dict[str, str]) -> list[dict]:
    """A version's serving periods, oldest first; a version recorded before periods were kept
    gives its one period from the since / endpoint / until tags."""
    if tags.get(TAG_SERVED_PERIODS):
        return json.loads(tags[TAG_SERVED_PERIODS])
    if tags.get(TAG_SERVED_SINCE):
        return [{"endpoint": tags.get(TAG_SERVED_ENDPOINT), "since": tags[TAG_SERVED_SINCE],
                 "until": tags.get(TAG_SERVED_UNTIL)}]
    return []
PROMOTION_FIELDS = ("at", "by", "previous", "forced", "reason", "policy", "comparison", "overridden")
REFUSAL_FIELDS = ("at", "by", "against", "policy", "comparison", "failures")
ROLLBACK_FIELDS = ("at", "from", "by", "reason")


def record_tag(kind: str, alias: str) -> str:
    """`skyeye.promotion.production`: the tag holding one decision's record (JSON)."""
    return f"{kind}.{alias}"


def read_records(tags: dict[str, str], kind: str) -> dict[str, dict]:
    """{alias: record} of one kind from a version's tags. Versions promoted before records were
    one tag carry one tag per field (`skyeye.promotion.production.at`, ...): read those too."""
    out: dict[str, dict] = {}
    for key, value in tags.items():
        if not key.startswith(kind + "."):
            continue
        rest = key[len(kind) + 1:]
        try:
            decoded = json.loads(value) if value[:1] in "[{" else value
        except json.JSONDecodeError:
            decoded = value
        if "." not in rest and isinstance(decoded, dict):
            out.setdefault(rest, {}).update(decoded)
        elif "." in rest:  # the older per-field layout
            alias, field = rest.rsplit(".", 1)
            out.setdefault(alias, {})[field] = decoded
    return out


def read_approved(tags: dict[str, str]) -> list[str] | None:
    """A version's approved tasks (its TAG_APPROVED_TASKS); None when it has no readable tag."""
    try:
        tasks = json.loads(tags[TAG_APPROVED_TASKS])
    except (KeyError, ValueError, TypeError):
        return None
    return [str(t) for t in tasks] if isinstance(tasks, list) else None


def read_licences(tags: dict[str, str]) -> dict[str, str] | None:
    """A run's or version's source -> licence (its TAG_DATA_LICENCES); None when it has no readable tag."""
    try:
        found = json.loads(tags[TAG_DATA_LICENCES])
    except (KeyError, ValueError, TypeError):
        return None
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else None


def licences_tag(licences: dict[str, str] | None) -> dict[str, str]:
    """{TAG_DATA_LICENCES: JSON} to merge into a run's or version's tags; {} when none is known."""
    return {TAG_DATA_LICENCES: json.dumps(dict(sorted(licences.items())))} if licences else {}
