"""The whole SkyEyeGPT in the MLflow model registry: one pyfunc model per evaluated
checkpoint (packaged by skyeye.packaging), its lineage tags, references to versions and
aliases, and the version listing. The aliases `staging` / `production` are moved by
skyeye.promotion (configs/promotion.yaml), which builds on the helpers here; this module
never imports it.

Links live in MLflow only (no side ledger): a version's tags name its evaluation run,
training run, tuning job and data version; the evaluation run is tagged with the version.
Registrations and promotions are serialized by a file lock under the state folder, so
they are safe between processes of one machine sharing that folder (the embedded
store's case).
"""
from __future__ import annotations

import getpass
import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import tracking
from .config import get_settings
from .evaluation.benchmarks import primary_of
from .packaging import PackagingError, SkyEyeGPTModel, _requirements, _stage_artifacts, input_example, model_signature

ALIASES = ("staging", "production")
ARTIFACT_NAME = "skyeyegpt"
KEY_SCORES = ("dior_rsvg_test/acc_at_0.5", "rsvqa_lr_test/aa", "ucm_captions_test/cider")
LOCK_TIMEOUT_S = 120

TAG_KIND = "skyeye.kind"
TAG_MODEL_DIR = "skyeye.model_dir"
TAG_EVAL_TRAINING_RUN = "skyeye.eval.training_run"  # on the evaluation run
TAG_EVAL_RUN = "skyeye.eval_run"  # on the version, and the rest below
TAG_TRAINING_RUN = "skyeye.training_run"
TAG_TUNING_JOB = "skyeye.tuning_job"
TAG_BACKBONES = "skyeye.backbones"
TAG_MODEL_VERSION = "skyeye.model_version"  # on the evaluation run
TAG_DVC_MD5, TAG_GIT_REV = tracking.TAG_DVC_MD5, tracking.TAG_GIT_REV
PROMOTION_FIELDS = ("at", "from", "by", "reason", "forced", "deltas", "previous", "overridden")


def promotion_tag(alias: str, key: str) -> str:
    return f"skyeye.promotion.{alias}.{key}"


def rollback_tag(alias: str, key: str) -> str:
    return f"skyeye.rollback.{alias}.{key}"


class RegistryError(ValueError):
    """An unknown version/alias/run, or a request the registry must refuse."""


def model_name() -> str:
    """The registered model's name: SKYEYE_REGISTERED_MODEL read now (settings are cached)."""
    return os.environ.get("SKYEYE_REGISTERED_MODEL") or get_settings().registered_model


def _client() -> MlflowClient:
    tracking.setup()
    return MlflowClient()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "unknown"


# ------------------------------------------------------------------ registration
def _get_run(client: MlflowClient, run_id: str, what: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise RegistryError(f"{what} {run_id!r} not found in the MLflow store {mlflow.get_tracking_uri()}") from None


def check_eval_run(client: MlflowClient, run_id: str):
    """The evaluation run, if it may stand behind a version: complete, of the right kind, scored."""
    run = _get_run(client, run_id, "evaluation run")
    kind = run.data.tags.get(TAG_KIND)
    if kind != "evaluation":
        raise RegistryError(f"run {run_id} is not an evaluation run ({TAG_KIND}={kind!r})")
    if run.info.status != "FINISHED":
        raise RegistryError(f"evaluation run {run_id} is {run.info.status}, not FINISHED: an incomplete or failed "
                            "evaluation never registers or promotes a model")
    if not primary_of(run.data.metrics):
        raise RegistryError(f"evaluation run {run_id} holds no primary metric (e.g. dior_rsvg_test/acc_at_0.5)")
    return run


@contextmanager
def _in_run(run_id: str):
    """Log into an existing run (reopened if finished; it ends FINISHED again)."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield


@contextmanager
def _lock(name: str, what: str = "promotion"):
    """One holder at a time per model (and per kind of change) among processes sharing the state folder."""
    from filelock import FileLock, Timeout
    path = get_settings().state / f"registry-{name}-{what}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise RegistryError(f"another {what} of {name} has held {path} for {LOCK_TIMEOUT_S} s; try again") from None
    try:
        yield
    finally:
        lock.release()


def register(model_dir: str | Path | None, eval_run_id: str, training_run_id: str | None = None,
             tuning_job: str | None = None, *, example_image: str | Path | None = None,
             copy_backbones: bool = True) -> int:
    """Log the saved SkyEyeGPT at `model_dir` as a pyfunc and register it; returns the version.

    Refuses unless the evaluation run is a FINISHED `skyeye.kind=evaluation` run with a
    primary metric that scored this very folder. The model is logged into the training run
    (default: the one the evaluation names), else into the evaluation run; registering the
    same evaluation again returns the version it already produced."""
    client, name = _client(), model_name()
    with _lock(name, "registration"):  # a retried task waits for, then finds, the version it is retrying
        return _register(client, name, model_dir, eval_run_id, training_run_id, tuning_job, example_image,
                         copy_backbones)


def _register(client, name, model_dir, eval_run_id, training_run_id, tuning_job, example_image, copy_backbones):
    run = check_eval_run(client, eval_run_id)
    tags = run.data.tags
    done = tags.get(TAG_MODEL_VERSION)
    if done:
        try:
            if client.get_model_version(name, done).tags.get(TAG_EVAL_RUN) == eval_run_id:
                return int(done)
        except MlflowException:
            pass  # that version was deleted: register again
    scored = tags.get(TAG_MODEL_DIR)
    if not (model_dir or scored):
        raise RegistryError(f"evaluation run {eval_run_id} names no model folder ({TAG_MODEL_DIR}): pass model_dir")
    model_dir = Path(model_dir or scored)
    if scored and Path(scored).resolve() != model_dir.resolve():
        raise RegistryError(f"{model_dir} is not the model evaluation run {eval_run_id} scored ({scored})")
    training_run_id = training_run_id or tags.get(TAG_EVAL_TRAINING_RUN) or None
    if training_run_id:
        training = _get_run(client, training_run_id, "training run")
        if training.info.status != "FINISHED":
            raise RegistryError(f"training run {training_run_id} is {training.info.status}, not FINISHED")
        tuning_job = tuning_job or training.data.tags.get("mlflow.parentRunId")
    source_run = training_run_id or eval_run_id
    try:
        with tempfile.TemporaryDirectory() as tmp:
            artifacts, origin, meta = _stage_artifacts(model_dir, Path(tmp), copy_backbones)
            # code_paths: the model carries the skyeye package it runs (this file's folder, which holds
            # skyeye/packaging.py); SkyEyeGPTModel is pickled by reference, skyeye.packaging.SkyEyeGPTModel
            with _in_run(source_run):
                info = mlflow.pyfunc.log_model(
                    name=ARTIFACT_NAME, python_model=SkyEyeGPTModel(), artifacts=artifacts,
                    signature=model_signature(meta["config"].get("max_new_tokens", 48)),
                    input_example=input_example(example_image), pip_requirements=_requirements(),
                    code_paths=[str(Path(__file__).resolve().parent)])
    except PackagingError as err:  # a folder or example image that cannot be packaged: refused as before
        raise RegistryError(str(err)) from None
    try:
        client.create_registered_model(name, description="SkyEyeGPT, remote-sensing multimodal LLM (pyfunc: "
                                                         "image + prompt -> answer)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version_tags = {TAG_EVAL_RUN: eval_run_id, TAG_TRAINING_RUN: training_run_id or "",
                    TAG_TUNING_JOB: tuning_job or "", TAG_DVC_MD5: tags.get(TAG_DVC_MD5, "unversioned"),
                    TAG_GIT_REV: tags.get(TAG_GIT_REV, "uncommitted"), TAG_MODEL_DIR: str(model_dir.resolve()),
                    TAG_BACKBONES: json.dumps(origin)}
    # one call with the tags: a version is never visible without its lineage
    mv = client.create_model_version(name, source=info.model_uri, run_id=source_run, tags=version_tags,
                                     model_id=info.model_id)
    client.set_tag(eval_run_id, TAG_MODEL_VERSION, mv.version)
    return int(mv.version)


# ------------------------------------------------------------------ references
def _aliases(client: MlflowClient, name: str) -> dict[str, int]:
    try:
        return {a: int(v) for a, v in client.get_registered_model(name).aliases.items()}
    except MlflowException:
        raise RegistryError(f"no model registered as {name!r} yet (register an evaluated model first)") from None


def _version_exists(client: MlflowClient, name: str, version: int) -> int:
    try:
        client.get_model_version(name, str(version))
        return version
    except MlflowException:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise RegistryError(f"version {version} of {name} not found (versions: "
                            f"{', '.join(map(str, known)) or 'none'})") from None


def resolve(ref: str | int) -> int:
    """'3', 'v3', 3, 'staging', 'production', 'models:/skyeyegpt@production' or
    'models:/skyeyegpt/3' -> the version number; errors name the reference."""
    client, name = _client(), model_name()
    text = str(ref).strip()
    if text.startswith("models:/"):
        body = text.removeprefix("models:/")
        mname, sep, target = body.partition("@") if "@" in body else body.partition("/")
        if not sep or not target or (sep == "/" and not target.isdigit()):
            raise RegistryError(f"model URI {text!r}: expected models:/{name}@<alias> or models:/{name}/<version>")
        if mname != name:
            raise RegistryError(f"model URI {text!r} names {mname!r}, not the registered model {name!r}")
        text = target
    if re.fullmatch(r"[vV]?\d+", text):
        return _version_exists(client, name, int(text.lstrip("vV")))
    aliases = _aliases(client, name)
    if text in aliases:
        return aliases[text]
    held = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none set"
    if text in ALIASES:
        raise RegistryError(f"alias {text!r} of {name} is not set (aliases: {held})")
    raise RegistryError(f"unknown model reference {ref!r}: not a version (N, vN) nor an alias of {name} "
                        f"(aliases: {held})")


# ------------------------------------------------------------------ scores
def primary_score(metrics: dict[str, float]) -> float | None:
    if "primary_score" in metrics:
        return metrics["primary_score"]
    prim = primary_of(metrics)
    return sum(prim.values()) / len(prim) if prim else None


def _eval_metrics(client: MlflowClient, name: str, version: int) -> tuple[dict[str, float], ModelVersion]:
    mv = client.get_model_version(name, str(version))
    run_id = mv.tags.get(TAG_EVAL_RUN)
    if not run_id:
        raise RegistryError(f"version {version} of {name} has no {TAG_EVAL_RUN} tag: not registered from an evaluation")
    try:
        return check_eval_run(client, run_id).data.metrics, mv
    except RegistryError as err:
        raise RegistryError(f"version {version} of {name}: {err}") from None


# ------------------------------------------------------------------ listing
@dataclass
class VersionRow:
    version: int
    aliases: list[str]
    created: datetime
    primary_score: float | None
    scores: dict[str, float | None]
    data_md5: str
    eval_run: str


def list_versions() -> list[VersionRow]:
    """Every version, newest first, with its aliases, key scores and data version."""
    client, name = _client(), model_name()
    aliases = _aliases(client, name)
    rows = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        metrics: dict[str, float] = {}
        run_id = mv.tags.get(TAG_EVAL_RUN, "")
        if run_id:
            try:
                metrics = client.get_run(run_id).data.metrics
            except MlflowException:
                pass  # shown as missing scores
        rows.append(VersionRow(int(mv.version), sorted(a for a, v in aliases.items() if v == int(mv.version)),
                               datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC),
                               primary_score(metrics), {k: metrics.get(k) for k in KEY_SCORES},
                               mv.tags.get(TAG_DVC_MD5, "unversioned")[:8], run_id))
    return sorted(rows, key=lambda r: -r.version)


def render_versions(rows: list[VersionRow]) -> str:
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"
    head = ["version", "aliases", "created (UTC)", "primary", "dior@0.5", "lr aa", "ucm cider", "data", "eval run"]
    body = [[str(r.version), ",".join(r.aliases) or "-", r.created.strftime("%Y-%m-%d %H:%M"), num(r.primary_score),
             *(num(r.scores.get(k)) for k in KEY_SCORES), r.data_md5, r.eval_run[:12] or "-"] for r in rows]
    if not body:
        return f"no versions of {model_name()} registered"
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in [head, *body])
