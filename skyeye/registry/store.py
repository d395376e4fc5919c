"""The whole SkyEyeGPT in the MLflow model registry: one pyfunc model per evaluated
checkpoint (packaged by `packaging`), its lineage tags, versions and aliases, and the
version listing. The aliases `staging` / `production` are moved by `promotion`
(configs/promotion.yaml), which builds on the helpers here; this module never imports it.

Links live in MLflow only (no side ledger): a version's tags name its evaluation run,
training run, tuning job and data version, and the tasks its evaluation approves it for;
the evaluation run is tagged with the version.
Registrations and promotions are serialized by a lock: on a tracking server, a lock entry
in its registry that every machine sees; on the embedded store, a file under the state folder.
"""
from __future__ import annotations

import getpass
import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from filelock import FileLock, Timeout
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..config import get_settings
from ..evaluation.baselines import approved_tasks
from ..formats.benchmarks import PRIMARY_SCORE, primary_metric, primary_of
from ..formats.licences import summary as licence_summary
from ..model.references import RegistryError, aliases, model_name
from ..tracking import runs
from ..tracking.names import (
    IMPORT_EXPERIMENT,
    IMPORTED_DATA,
    KIND_EVALUATION,
    KIND_IMPORT,
    TAG_APPROVED_TASKS,
    TAG_BACKBONES,
    TAG_DVC_MD5,
    TAG_EVAL_RUN,
    TAG_EVAL_TRAINING_RUN,
    TAG_GIT_REV,
    TAG_IMPORTED,
    TAG_KIND,
    TAG_MODEL_DIR,
    TAG_MODEL_VERSION,
    TAG_PARENT,
    TAG_TRAINING_RUN,
    TAG_TUNING_JOB,
    UNCOMMITTED,
    UNVERSIONED,
    licences_tag,
    read_approved,
    read_licences,
)
from .packaging import PackagingError, SkyEyeGPTModel, input_example, model_signature, requirements, stage_artifacts

ALIASES = ("staging", "production")
ARTIFACT_NAME = "skyeyegpt"
KEY_SCORES = tuple(primary_metric(k) for k in ("dior_rsvg_test", "rsvqa_lr_test", "ucm_captions_test"))
LOCK_TIMEOUT_S = 120
LOCK_STALE_S = 600  # a registry lock older than this was left by a holder that died


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def user() -> str:
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
    if kind != KIND_EVALUATION:
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
def lock(name: str, what: str = "promotion"):
    """One holder at a time per model (and per kind of change). On a tracking server, which
    processes on many machines share, the lock lives in the registry itself; on the embedded
    store, a file under the state folder."""
    if runs.client().tracking_uri.startswith(("http://", "https://")):
        with _registry_lock(name, what):
            yield
        return
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


@contextmanager
def _registry_lock(name: str, what: str):
    """A mutex every client of one tracking server shares: creating a registered model is
    atomic in its database (names are unique), so the creator holds the lock; deleting it
    releases it. A holder that died leaves it behind: after LOCK_STALE_S it is taken over."""
    client, lock_name = runs.client(), f"{name}.lock.{what}"
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            client.create_registered_model(lock_name, tags={"holder": user(), "at": str(time.time())},
                                           description=f"held during a {what} of {name}; deleted when done")
            break
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock_name)
            if time.time() - float(held.tags.get("at", time.time())) > LOCK_STALE_S:
                client.delete_registered_model(lock_name)  # a dead holder's; the next create decides
                continue
        except MlflowException:
            continue  # released in between
        if time.monotonic() > deadline:
            raise RegistryError(f"another {what} of {name} has held the lock {lock_name} on {client.tracking_uri} "
                                f"for {LOCK_TIMEOUT_S} s; try again") from None
        time.sleep(0.5)
    try:
        yield
    finally:
        try:
            client.delete_registered_model(lock_name)
        except MlflowException:
            pass  # taken over as stale: the record of this change is already written


def register(model_dir: str | Path | None, eval_run_id: str, training_run_id: str | None = None,
             tuning_job: str | None = None, *, example_image: str | Path | None = None,
             copy_backbones: bool = True) -> int:
    """Log the saved SkyEyeGPT at `model_dir` as a pyfunc and register it; returns the version.

    Refuses unless the evaluation run is a FINISHED `skyeye.kind=evaluation` run with a
    primary metric that scored this very folder. The model is logged into the training run
    (default: the one the evaluation names), else into the evaluation run; registering the
    same evaluation again returns the version it already produced."""
    client, name = runs.client(), model_name()
    with lock(name, "registration"):  # a retried task waits for, then finds, the version it is retrying
        run = check_eval_run(client, eval_run_id)
        done = _version_of(client, name, run)
        if done is not None:
            return done
        lineage = _lineage(client, run, model_dir, training_run_id, tuning_job)
        info, origin = _log_pyfunc(lineage.model_dir, lineage.source_run, example_image, copy_backbones)
        return _create_version(client, name, lineage, info, origin)


def register_imported(model_dir: str | Path, imported: dict, backbones: dict[str, str],
                      licences: dict[str, str] | None = None) -> int:
    """Register a SkyEyeGPT folder converted from a checkpoint trained elsewhere (see
    `skyeye.model.minigpt_v2`): logged into an import run, tagged with the file it came from
    and no SkyEye data version; the backbones stay references (`backbones`: where and their
    sha256), never copied; `licences` (source -> terms: the checkpoint's, as the import declares
    them) are tagged like a trained version's. It has no evaluation until `skyeye evaluate` scores it
    (`attach_evaluation`), so promotion refuses it until then."""
    client, name = runs.client(), model_name()
    record = json.dumps(imported, sort_keys=True)
    with lock(name, "registration"):
        tags = {TAG_KIND: KIND_IMPORT, TAG_IMPORTED: record, TAG_MODEL_DIR: str(Path(model_dir).resolve()),
                TAG_DVC_MD5: IMPORTED_DATA, **licences_tag(licences)}
        with runs.tracked_run(IMPORT_EXPERIMENT, f"import {imported.get('file', '')}", tags) as run_id:
            info, origin = _log_pyfunc(Path(model_dir), run_id, None, copy_backbones=False)
        _ensure_registered_model(client, name)
        mv = client.create_model_version(
            name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
            tags={TAG_IMPORTED: record, TAG_DVC_MD5: IMPORTED_DATA, TAG_MODEL_DIR: tags[TAG_MODEL_DIR],
                  TAG_BACKBONES: json.dumps({k: f"{origin.get(k, '')} sha256:{v}" for k, v in backbones.items()}),
                  TAG_TRAINING_RUN: "", TAG_TUNING_JOB: "", **licences_tag(licences)})
        return int(mv.version)


def attach_evaluation(version: int, eval_run_id: str) -> bool:
    """Stand a FINISHED test-split evaluation behind a version that has none (an imported one);
    returns whether it was attached. A version with an evaluation keeps it."""
    client, name = runs.client(), model_name()
    with lock(name, "registration"):
        mv = client.get_model_version(name, str(version))
        if mv.tags.get(TAG_EVAL_RUN):
            return False
        run = check_eval_run(client, eval_run_id)
        approved = json.dumps(approved_tasks(run.data.metrics))
        client.set_model_version_tag(name, str(version), TAG_APPROVED_TASKS, approved)
        client.set_model_version_tag(name, str(version), TAG_EVAL_RUN, eval_run_id)
        client.set_tag(eval_run_id, TAG_MODEL_VERSION, str(version))
        return True


@dataclass(frozen=True)
class _Lineage:
    """What a new version stands on: its evaluation run, the folder that run scored, the
    training run and tuning job behind it (when known)."""
    eval_run: Run
    model_dir: Path
    training_run_id: str | None
    tuning_job: str | None

    @property
    def source_run(self) -> str:
        """The run the model is logged into: the training run, else the evaluation run."""
        return self.training_run_id or self.eval_run.info.run_id


def _version_of(client: MlflowClient, name: str, run: Run) -> int | None:
    """The version this evaluation run already registered, if it still exists."""
    done = run.data.tags.get(TAG_MODEL_VERSION)
    if done:
        try:
            if client.get_model_version(name, done).tags.get(TAG_EVAL_RUN) == run.info.run_id:
                return int(done)
        except MlflowException:
            pass  # that version was deleted: register again
    return None


def _lineage(client: MlflowClient, run: Run, model_dir: str | Path | None, training_run_id: str | None,
             tuning_job: str | None) -> _Lineage:
    """Check the folder against the one the evaluation scored, and find the training run (the
    evaluation's, unless given; it must be FINISHED) and its tuning job (unless given)."""
    eval_run_id, tags = run.info.run_id, run.data.tags
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
        tuning_job = tuning_job or training.data.tags.get(TAG_PARENT)
    return _Lineage(run, model_dir, training_run_id, tuning_job)


def _log_pyfunc(model_dir: Path, source_run: str, example_image: str | Path | None, copy_backbones: bool):
    """Log the folder as a pyfunc model into the source run; (MLflow's model info, where the
    backbones came from)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            artifacts, origin, meta = stage_artifacts(model_dir, Path(tmp), copy_backbones)
            # code_paths: the model carries the skyeye package it runs (the folder above this one);
            # SkyEyeGPTModel is pickled by reference, skyeye.registry.packaging.SkyEyeGPTModel
            with _in_run(source_run):
                info = mlflow.pyfunc.log_model(
                    name=ARTIFACT_NAME, python_model=SkyEyeGPTModel(), artifacts=artifacts,
                    signature=model_signature(meta["config"]),
                    input_example=input_example(example_image), pip_requirements=requirements(),
                    code_paths=[str(Path(__file__).resolve().parents[1])])
    except PackagingError as err:  # a folder or example image that cannot be packaged: refused as before
        raise RegistryError(str(err)) from None
    return info, origin


def _create_version(client: MlflowClient, name: str, lineage: _Lineage, info, origin) -> int:
    """The registered version of the logged model, with its lineage tags; the evaluation run
    is tagged with it."""
    _ensure_registered_model(client, name)
    run = lineage.eval_run
    eval_run_id, tags = run.info.run_id, run.data.tags
    # the licences of the data it was trained on: the training run's record, else the evaluation's
    licences = read_licences(tags)
    if lineage.training_run_id:
        licences = read_licences(client.get_run(lineage.training_run_id).data.tags) or licences
    version_tags = {**licences_tag(licences), TAG_EVAL_RUN: eval_run_id,
                    TAG_TRAINING_RUN: lineage.training_run_id or "", TAG_TUNING_JOB: lineage.tuning_job or "",
                    TAG_DVC_MD5: tags.get(TAG_DVC_MD5, UNVERSIONED),
                    TAG_GIT_REV: tags.get(TAG_GIT_REV, UNCOMMITTED), TAG_MODEL_DIR: str(lineage.model_dir.resolve()),
                    TAG_BACKBONES: json.dumps(origin), TAG_APPROVED_TASKS: json.dumps(approved_tasks(run.data.metrics))}
    # one call with the tags: a version is never visible without its lineage
    mv = client.create_model_version(name, source=info.model_uri, run_id=lineage.source_run, tags=version_tags,
                                     model_id=info.model_id)
    client.set_tag(eval_run_id, TAG_MODEL_VERSION, mv.version)
    return int(mv.version)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description="SkyEyeGPT, remote-sensing multimodal LLM (pyfunc: "
                                                         "image + prompt -> answer)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


# ------------------------------------------------------------------ scores
def primary_score(metrics: dict[str, float]) -> float | None:
    if PRIMARY_SCORE in metrics:
        return metrics[PRIMARY_SCORE]
    prim = primary_of(metrics)
    return sum(prim.values()) / len(prim) if prim else None


def eval_metrics(client: MlflowClient, name: str, version: int) -> tuple[dict[str, float], ModelVersion]:
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
    approved: list[str] | None = None  # its approved tasks; None: registered before they were recorded
    licences: dict[str, str] | None = None  # its data's sources -> licence; None: not recorded


def list_versions() -> list[VersionRow]:
    """Every version, newest first, with its aliases, key scores and data version."""
    client, name = runs.client(), model_name()
    held = aliases(client, name)
    rows = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        metrics: dict[str, float] = {}
        run_id = mv.tags.get(TAG_EVAL_RUN, "")
        if run_id:
            try:
                metrics = client.get_run(run_id).data.metrics
            except MlflowException:
                pass  # shown as missing scores
        rows.append(VersionRow(int(mv.version), sorted(a for a, v in held.items() if v == int(mv.version)),
                               datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC),
                               primary_score(metrics), {k: metrics.get(k) for k in KEY_SCORES},
                               "imported" if mv.tags.get(TAG_IMPORTED) else mv.tags.get(TAG_DVC_MD5, UNVERSIONED)[:8],
                               run_id, read_approved(mv.tags), read_licences(mv.tags)))
    return sorted(rows, key=lambda r: -r.version)


def render_versions(rows: list[VersionRow]) -> str:
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"
    def tasks(approved: list[str] | None) -> str:
        return "not recorded" if approved is None else ",".join(approved) or "none"
    head = ["version", "aliases", "created (UTC)", "primary", "dior@0.5", "lr aa", "ucm cider", "approved for", "data",
            "eval run", "licences"]
    body = [[str(r.version), ",".join(r.aliases) or "-", r.created.strftime("%Y-%m-%d %H:%M"), num(r.primary_score),
             *(num(r.scores.get(k)) for k in KEY_SCORES), tasks(r.approved), r.data_md5, r.eval_run[:12] or "-",
             licence_summary(r.licences)]
            for r in rows]
    if not body:
        return f"no versions of {model_name()} registered"
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in [head, *body])
