"""When a `retrain` step is reused, and when it retries.

A step's cache key is what determines its output: the inputs named for it (the data
version, upstream results such as the stage-1 folder), the content of its config files,
and the code of its task and of the `skyeye` packages it runs. Prefect's default key holds
the flow run id, so a new run never hits it; this one does not. Results are persisted
under the project (`PREFECT_HOME` is `.skyeye/prefect`), so a new process, a new flow run
and the deployment runner all find them.

A cached result can dangle: its checkpoint folder deleted, its MLflow run purged. Each
step says how to check its result is still there; a dangling one is recomputed under a
successor key (never returned), and that key is found again by later runs.
"""
from __future__ import annotations

import hashlib
import inspect
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.utilities.hashing import hash_objects

from skyeye.config import get_settings

PACKAGE = Path(__file__).resolve().parents[1] / "skyeye"


def code_digest(packages: tuple[str, ...]) -> str:
    """The source of these `skyeye` subpackages (or modules), as one hash."""
    h = hashlib.sha256()
    for name in sorted(packages):
        base = PACKAGE / name
        files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
        for path in files:
            h.update(path.relative_to(PACKAGE).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """A config file's content (relative paths are the project's); '-' when it is absent."""
    path = Path(path)
    path = path if path.is_absolute() else get_settings().project_root / path
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "-"


def folder_stamp(path: str | Path) -> str:
    """A folder's files, sizes and modification times: cheap, and changes when its content does."""
    path = Path(path)
    if not path.is_dir():
        return "-"
    stats = [(p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
             for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.sha256(repr(stats).encode()).hexdigest()


def _stamps(value: str | dict[str, str]) -> str | dict[str, str]:
    return {k: folder_stamp(v) for k, v in value.items()} if isinstance(value, dict) else folder_stamp(value)


@dataclass
class StepKey(CachePolicy):
    """The cache key of one step (see the module's docstring)."""
    inputs: tuple[str, ...] = ()  # parameters whose values identify the result
    configs: tuple[str, ...] = ()  # parameters that name config files: their content counts
    folders: tuple[str, ...] = ()  # parameters that name input folders: their content stamp counts
    code: tuple[str, ...] = ()  # skyeye subpackages the step runs
    still_there: Callable[[Any], bool] | None = field(default=None, compare=False)

    def base_key(self, task_fn: Callable, inputs: dict[str, Any]) -> str:
        settings = get_settings()
        return hash_objects({
            "project": str(settings.project_root), "tracking": settings.tracking_uri,  # where results live
            "task": inspect.getsource(task_fn),
            "inputs": {k: inputs.get(k) for k in self.inputs},
            "configs": {k: file_digest(inputs[k]) for k in self.configs if inputs.get(k)},
            "folders": {k: _stamps(inputs[k]) for k in self.folders if inputs.get(k)},
            "code": code_digest(self.code)})

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        key = self.base_key(task_ctx.task.fn, inputs)
        store = task_ctx.result_store
        # a dangling result is skipped over: the step runs again under the next key of the chain
        for _ in range(100):
            if self.still_there is None or not store.exists(key) or self.still_there(store.read(key).result):
                return key
            key = hash_objects(key, "recomputed")
        return key


# ---------------------------------------------------------------- is a result still there

def folder_there(value: str) -> bool:
    return bool(value) and Path(value).is_dir()


def paths_there(value: dict[str, str]) -> bool:
    """Backbones: local folders must exist (hub ids are not checked here)."""
    return all(Path(v).exists() for v in value.values() if Path(v).is_absolute())


def run_there(run_id: str) -> bool:
    """An MLflow run that exists, is not deleted and FINISHED."""
    from mlflow.exceptions import MlflowException

    from skyeye.tracking import runs
    try:
        run = runs.client().get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage == "active" and run.info.status == "FINISHED"


def version_there(version: int) -> bool:
    from mlflow.exceptions import MlflowException

    from skyeye.registry.references import model_name
    from skyeye.tracking import runs
    try:
        runs.client().get_model_version(model_name(), str(version))
    except MlflowException:
        return False
    return True


# ---------------------------------------------------------------- which failures retry

TRANSIENT_MESSAGES = ("database is locked", "timed out", "timeout", "connection refused",
                      "temporarily unavailable")


def transient(exc: BaseException | None) -> bool:
    """A busy SQLite store, a Ray or server start-up that timed out: worth another attempt.
    Anything else (a failed gate, a refused promotion, a bug) is not."""
    from skyeye.datagate.gate import GateFailed
    from skyeye.registry.promotion import PromotionRefused
    if exc is None or isinstance(exc, (GateFailed, PromotionRefused)):
        return False
    if isinstance(exc, (sqlite3.OperationalError, TimeoutError, ConnectionError)):
        return True
    if type(exc).__name__ in ("GetTimeoutError", "RaySystemError", "OperationalError"):
        return True
    return any(m in str(exc).lower() for m in TRANSIENT_MESSAGES)


def retry_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry only what `transient` accepts."""
    exc = state.result(raise_on_failure=False)
    return transient(exc if isinstance(exc, BaseException) else None)
