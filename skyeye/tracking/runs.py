"""MLflow as every part of SkyEye reaches it: the configured store (embedded SQLite under
`mlruns/` unless the settings or `MLFLOW_TRACKING_URI` name a server), experiments with
their artifacts under the project when the store is local, and the life of a run.

Everything that talks to MLflow gets its client from `client()`, so no command writes to
MLflow's own default store in the working directory.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from ..config import Settings, configure_environment, get_settings
from .names import TAG_PARENT


def setup(settings: Settings | None = None) -> str:
    """Point MLflow at the configured store (embedded SQLite by default); returns the URI."""
    s = configure_environment(settings or get_settings())
    uri = s.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def client(settings: Settings | None = None) -> MlflowClient:
    """A client of the configured store."""
    return MlflowClient(setup(settings))


def experiment_id(name: str, settings: Settings | None = None) -> str:
    """The experiment's id, created with artifacts under mlruns/ when the store is local."""
    s = settings or get_settings()
    c = client(s)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if s.tracking_uri.startswith("sqlite:///"):
        location = Path(s.artifact_root, name).as_uri()
    return c.create_experiment(name, artifact_location=location)


def create_run(experiment: str, name: str, tags: dict[str, str], *, parent: str | None = None,
               settings: Settings | None = None) -> str:
    """A new RUNNING run (a child of `parent` when given); returns its id. Through the client,
    not `mlflow.start_run`: workers and threads log into it by id."""
    s = settings or get_settings()
    tags = {**tags, TAG_PARENT: parent} if parent else dict(tags)
    return client(s).create_run(experiment_id(experiment, s), run_name=name, tags=tags).info.run_id


def ui_base(settings: Settings | None = None) -> str:
    """The MLflow UI: the tracking server itself, or the UI started beside an embedded store."""
    s = settings or get_settings()
    return s.tracking_uri.rstrip("/") if s.tracking_uri.startswith("http") else s.mlflow_ui_url.rstrip("/")


def run_url(run_id: str, settings: Settings | None = None) -> str:
    """A run's page in the MLflow UI."""
    run = client(settings).get_run(run_id)
    return f"{ui_base(settings)}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0, settings: Settings | None = None) -> None:
    """Metrics of one step in one call (the store's batch limit is 1,000 a call)."""
    stamp = int(time.time() * 1000)
    batch = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
    c = client(settings)
    for i in range(0, len(batch), 1000):
        c.log_batch(run_id, metrics=batch[i:i + 1000])


@contextmanager
def tracked_run(experiment: str, name: str, tags: dict[str, str], *, parent: str | None = None,
                settings: Settings | None = None) -> Iterator[str]:
    """The life of a run: created, yielded (its id), then FINISHED when the block ends, or
    FAILED when it raises (the exception goes on). Training, evaluation and the data gate
    all record their runs this way, so no run is left RUNNING by a failure."""
    s = settings or get_settings()
    run_id = create_run(experiment, name, tags, parent=parent, settings=s)
    try:
        yield run_id
    except BaseException:
        client(s).set_terminated(run_id, "FAILED")
        raise
    client(s).set_terminated(run_id, "FINISHED")
