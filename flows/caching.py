"""When a `retrain` step is reused, and when it retries.

A step's cache key is what determines its output:
- the inputs named for it (the data version, upstream results such as the stage-1 folder)
  and the content of the config files and input folders it reads;
- its code: the task's source and every project module it may run, found by reading
  import statements (`skyeye.tracking.codehash`): what its body imports, what its module
  imports under a name the body uses, and all these import in turn (`skyeye` and `flows`
  alike, inside functions too), however far; no hand-kept list of packages to forget;
- what else it reads at run time, where a step says so: `promote` judges a version against
  the production holder, so that holder and its scores are in its key.
Prefect's default key holds the flow run id, so a new run never hits it; this one does not.
Results are persisted under the project (`PREFECT_HOME` is `.skyeye/prefect`), so a new
process, a new flow run and the deployment runner all find them.

A cached result can dangle: its checkpoint folder deleted, its MLflow run purged. Each
step says how to check its result is still there; a dangling one is recomputed under a
successor key (never returned), and that key is found again by later runs.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sqlite3
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.utilities.hashing import hash_objects

from skyeye.config import get_settings
from skyeye.tracking.codehash import code_digest, imported_names


@cache  # a task's source does not change under a running process
def task_code(task_fn: Callable) -> tuple[frozenset[str], Path]:
    """Where a task's code digest starts: the modules its body imports and those its own module
    imports at the top under a name the body uses (not the decorator's: how a step is cached
    is not what it computes); with the folder its modules are found in."""
    module = inspect.getmodule(task_fn)
    name = module.__spec__.name if module.__spec__ else module.__name__  # flows.retrain, also run as __main__
    file = Path(module.__file__).resolve()
    is_package = file.name == "__init__.py"
    fn = ast.parse(textwrap.dedent(inspect.getsource(task_fn))).body[0]
    fn.decorator_list = []
    used = {node.id for node in ast.walk(fn) if isinstance(node, ast.Name)}
    top = [node for node in ast.parse(file.read_bytes()).body if isinstance(node, (ast.Import, ast.ImportFrom))
           and any((alias.asname or alias.name).split(".")[0] in used for alias in node.names)]
    modules = imported_names(ast.Module(body=[fn, *top], type_ignores=[]),
                             name if is_package else name.rpartition(".")[0])
    return frozenset(modules), file.parents[name.count(".") + is_package]


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
    # what the result also depends on outside its inputs, read when the key is computed
    reads: Callable[[dict[str, Any]], Any] | None = field(default=None, compare=False)
    still_there: Callable[[Any], bool] | None = field(default=None, compare=False)

    def base_key(self, task_fn: Callable, inputs: dict[str, Any]) -> str:
        settings = get_settings()
        return hash_objects({
            "project": str(settings.project_root), "tracking": settings.tracking_uri,  # where results live
            "task": inspect.getsource(task_fn),
            "inputs": {k: inputs.get(k) for k in self.inputs},
            "configs": {k: file_digest(inputs[k]) for k in self.configs if inputs.get(k)},
            "folders": {k: _stamps(inputs[k]) for k in self.folders if inputs.get(k)},
            "code": code_digest(*task_code(task_fn)),
            "reads": self.reads(inputs) if self.reads else None})

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

    from skyeye.model.references import model_name
    from skyeye.tracking import runs
    try:
        runs.client().get_model_version(model_name(), str(version))
    except MlflowException:
        return False
    return True


def production_agrees(value: dict) -> bool:
    """A cached promotion stands while the registry still says what it decided: the version holds
    production if it reached it, and does not if it did not (a rollback or a forced move since)."""
    from skyeye.model.references import production_version
    if "version" not in value:  # a result cached before the version was kept in it
        return False
    return (production_version() == value["version"]) == (value["alias"] == "production")


# ---------------------------------------------------------------- what promote reads

def production_holder(inputs: dict[str, Any]) -> dict[str, str]:
    """The production version `inputs["version"]` is judged against, and a digest of its scores:
    promote's decision turns on them. When the version holds production itself, that is the one
    it replaced (its promotion record), so a promotion does not undo its own cache entry."""
    from mlflow.exceptions import MlflowException

    from skyeye.model.references import RegistryError, model_name, production_version
    from skyeye.registry.store import eval_metrics
    from skyeye.tracking import runs
    from skyeye.tracking.names import PROMOTION, read_records
    client, name, holder = runs.client(), model_name(), production_version()
    if holder == int(inputs["version"]):
        tags = client.get_model_version(name, str(holder)).tags
        previous = read_records(tags, PROMOTION).get("production", {}).get("previous", "none")
        holder = None if previous == "none" else int(previous)
    if holder is None:
        return {"production": "none"}
    try:
        scores, _ = eval_metrics(client, name, holder)
        digest = hashlib.sha256(json.dumps(scores, sort_keys=True).encode()).hexdigest()
    except (RegistryError, MlflowException):
        digest = "unreadable"  # promote cannot compare with it: a state of its own
    return {"production": str(holder), "scores": digest}


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
