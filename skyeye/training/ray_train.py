"""Run a training loop on Ray Train (DDP over gloo on CPU, NCCL on GPU) or in one plain process.

A loop is `loop_fn(ctx, loop_config) -> dict | None`, written once against `TrainContext`:
`ctx.prepare_model`, `ctx.latest_checkpoint()` to resume, `ctx.report(metrics, step, writer)`.
`fit` runs it on a Ray worker group with checkpoints under `storage_path` and restarts from
the latest checkpoint when a worker dies; `fit_local` runs the same loop in this process
(benchmarks, debugging). Only rank 0 talks to MLflow, into the run id the caller created.

Decisions worth knowing:
- `report` without a checkpoint writer never calls `ray.train.report`: Ray Train V2 does not
  persist such reports, and each one is a barrier that waits on the controller's poll.
- A checkpoint is complete only with a `COMPLETE` marker, written after the writer returns,
  and a checkpoint report returns only once Ray has committed it (a worker dying right
  after would otherwise lose it: the controller registers checkpoints at its next poll).
- MLflow history is exactly-once across restarts: at start rank 0 reads the last logged step
  of each metric and skips reports at or below it (a resumed loop re-runs those steps).
- Reusing `storage_path` + `run_name` resumes that Ray run (Ray restores its checkpoints).
- Ray is `cluster.ray_session.connect`'s (RAY_ADDRESS's cluster, else a private local Ray);
  the health-check interval is lowered to 0.1 s (default 2 s per report).
"""
from __future__ import annotations

# imports inside functions: Ray and pyarrow load only where a worker group runs; MLflow only on rank 0, which logs
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..cluster import ray_session
from ..config import WORKERS_PER_STAGE, get_settings

COMPLETE = "COMPLETE"  # marker file, written last: a checkpoint without it is ignored
_ATTEMPTS_DIR = ".skyeye_attempts"  # one file per worker-group start, to count restarts
_HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
_HEALTH_CHECK_S = "0.1"  # default 2 s: every checkpoint report would wait that long
_FLUSH_EVERY_S = 10.0  # MLflow flush cadence between checkpoints (plus at every checkpoint)
_MLFLOW_BATCH = 1000  # MLflow's log_batch limit on metrics per call
_DRAIN_S = 600.0  # at the end of a loop, how long buffered metrics wait for a tracking server that is away

CheckpointWriter = Callable[[Path], None]


@dataclass
class FitConfig:
    num_workers: int = WORKERS_PER_STAGE
    use_gpu: bool = False  # NCCL when True, gloo otherwise
    cpus_per_worker: float = 1
    storage_path: str | None = None  # default SKYEYE_RAY_STORAGE or <state>/ray_results
    run_name: str = "skyeye"  # the same name and storage resume that run's checkpoints
    max_failures: int = 2  # worker-group restarts from the latest checkpoint; -1 unlimited
    mlflow_tracking_uri: str | None = None  # default: settings.tracking_uri, resolved on the driver
    mlflow_run_id: str | None = None  # the (child) run rank 0 logs into; created by the caller
    env: dict[str, str] = field(default_factory=dict)  # extra env vars for workers (Prefect, MLflow, HF)
    checkpoints_to_keep: int | None = 3  # older ones are deleted; None keeps all
    verbose: bool = False  # forward worker stdout/stderr and Ray Train INFO logs to the driver

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {self.num_workers!r}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")
        if self.checkpoints_to_keep is not None and self.checkpoints_to_keep < 1:
            raise ValueError(f"checkpoints_to_keep must be >= 1 or None, got {self.checkpoints_to_keep}")

    def resolved_storage(self) -> str:
        if self.storage_path is None:
            return get_settings().checkpoint_storage
        if "://" in self.storage_path:
            return self.storage_path
        return str(Path(self.storage_path).expanduser().resolve())  # Ray wants absolute paths

    def resolved_tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return get_settings().tracking_uri  # explicit, so workers need not share the driver's setup


@dataclass
class FitResult:
    metrics: dict  # the last reported metrics (rank 0), with "step"
    checkpoint_dir: Path | None  # local path to the final checkpoint's files
    restarts: int  # worker-group restarts; -1 if unknown
    seconds: float
    startup_seconds: float  # fit() call until the loop first started (Ray start-up + worker group)
    output: dict | None = None  # what loop_fn returned on rank 0
    nodes: int = 1  # Ray nodes the workers ran on, over all restarts; 0 if unknown


def complete_checkpoint(path: Path | str | None) -> Path | None:
    """`path` if it is a finished checkpoint (holds `COMPLETE`), else None."""
    if path is None:
        return None
    path = Path(path)
    return path if (path / COMPLETE).is_file() else None


def latest_complete_checkpoint(root: Path | str) -> Path | None:
    """The newest finished `checkpoint_*` folder under `root` (names sort by age), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    for path in sorted(root.glob("checkpoint_*"), reverse=True):
        if complete_checkpoint(path):
            return path
    return None


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside a DDP wrapper, so checkpoints load with or without DDP."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class TrainingFailed(RuntimeError):
    """A Ray Train run that did not finish; the message names the run and its storage."""


class CheckpointStoreError(RuntimeError):
    """A checkpoint could not be written to the storage (the message names it)."""


class _MetricLog:
    """Rank 0's MLflow writer: buffers metrics and sends them with `log_batch`.

    The tracking server may be away for a while (a restart, a network blip): a failed send
    keeps the buffer and training goes on; the next flush sends it again, with the same
    timestamps, so a batch the server did take before the error is not stored twice (it keys
    metrics on key, step, timestamp and value). Sends fail fast instead of blocking a step in
    MLflow's own retries. At the end of the loop the buffer must drain: `close` retries for
    up to `drain_s`, then fails naming the server. Metrics buffered when a worker dies during
    an outage are lost with it; the resumed loop logs its steps again from the checkpoint.
    """

    def __init__(self, tracking_uri: str, run_id: str, drain_s: float = _DRAIN_S) -> None:
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri, self.run_id, self.drain_s = tracking_uri, run_id, drain_s
        self._buffer: list = []
        self._last_flush = time.monotonic()
        self._failing_since: float | None = None
        # After a restart the loop re-runs the steps since its checkpoint; their metrics may
        # already be in MLflow, so each key skips steps at or below its last logged one.
        self._logged_up_to = {key: max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)
                              for key in self.client.get_run(run_id).data.metrics}

    def add(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if step > self._logged_up_to.get(key, -1):
                self._buffer.append(Metric(key, float(value), now, step))
                self._logged_up_to[key] = step
        if len(self._buffer) >= _MLFLOW_BATCH or time.monotonic() - self._last_flush > _FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> bool:
        """Send what is buffered; False (buffer kept) when the server does not take it now."""
        self._last_flush = time.monotonic()
        try:
            with _fail_fast_mlflow():
                while self._buffer:
                    self.client.log_batch(self.run_id, metrics=self._buffer[:_MLFLOW_BATCH], synchronous=True)
                    del self._buffer[:_MLFLOW_BATCH]
        except Exception as err:  # noqa: BLE001 - any transport or server error: keep the metrics, go on
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                print(f"[skyeye] MLflow at {self.tracking_uri} is not taking metrics ({type(err).__name__}); "
                      f"training goes on, {len(self._buffer)} metric value(s) kept for the next flush", flush=True)
            return False
        if self._failing_since is not None:
            print(f"[skyeye] MLflow at {self.tracking_uri} is back after "
                  f"{time.monotonic() - self._failing_since:.0f} s; buffered metrics sent", flush=True)
            self._failing_since = None
        return True

    def close(self) -> None:
        deadline = time.monotonic() + self.drain_s
        while not self.flush():
            if time.monotonic() > deadline:
                raise RuntimeError(f"MLflow at {self.tracking_uri} did not take {len(self._buffer)} metric value(s) "
                                   f"of run {self.run_id} within {self.drain_s:.0f} s; is the tracking server up?")
            time.sleep(2)

    def log_artifact(self, path: Path, artifact_path: str | None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


class TrainContext:
    """What a loop sees: its rank, device, checkpoints and metric reporting."""

    def __init__(self, rank: int, world_size: int, device: torch.device, mlflow_log: _MetricLog | None) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self._mlflow = mlflow_log
        self.last_metrics: dict[str, float] = {}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def latest_checkpoint(self) -> Path | None:
        """A local folder with the latest finished checkpoint's files, or None on a fresh start."""
        raise NotImplementedError

    def report(self, metrics: dict[str, float], step: int, checkpoint_writer: CheckpointWriter | None = None) -> None:
        """Every rank calls this, all with or all without a writer (a checkpoint report is a barrier).
        Rank 0 logs the metrics and, given a writer, lets it fill a temporary folder that becomes
        the checkpoint once the writer has returned."""
        metrics = {k: float(v) for k, v in metrics.items()}  # tensors would not survive Ray's pickling
        self.last_metrics = {**metrics, "step": step}
        if self._mlflow is not None:
            self._mlflow.add(metrics, step)
        if checkpoint_writer is None:
            return
        if self._mlflow is not None:
            self._mlflow.flush()  # the history reaches MLflow before the checkpoint (if the server is up)
        self._save_checkpoint(self.last_metrics, step, checkpoint_writer)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None:
            self._mlflow.log_artifact(Path(path), artifact_path)

    def _save_checkpoint(self, metrics: dict[str, float], step: int, writer: CheckpointWriter) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        if self._mlflow is not None:
            self._mlflow.close()


@contextmanager
def _environ(values: dict[str, str]):
    """These environment variables set for the block, then put back as they were."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _fail_fast_mlflow():
    """MLflow's client retries a failed request for minutes by default; a metric send that
    blocks a training step that long is worse than one kept for the next flush."""
    return _environ({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})


def _write_checkpoint(folder: Path, step: int, writer: CheckpointWriter) -> None:
    writer(folder)
    (folder / COMPLETE).write_text(json.dumps({"step": step, "time": time.time()}))


class LocalContext(TrainContext):
    """One process, no Ray: checkpoints are `<storage>/<run_name>/checkpoint_NNNNNN`, renamed
    into place from a temporary sibling so a killed write never looks finished."""

    def __init__(self, root: Path, device: torch.device, mlflow_log: _MetricLog | None, keep: int | None) -> None:
        super().__init__(0, 1, device, mlflow_log)
        self.root, self.keep = root, keep
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-checkpoint-*"):  # left by a killed process
            shutil.rmtree(stale, ignore_errors=True)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self) -> Path | None:
        return latest_complete_checkpoint(self.root)

    def _save_checkpoint(self, metrics: dict[str, float], step: int, writer: CheckpointWriter) -> None:
        existing = sorted(self.root.glob("checkpoint_*"))
        index = int(existing[-1].name.split("_")[1]) + 1 if existing else 0
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-checkpoint-", dir=self.root))
        try:
            _write_checkpoint(tmp, step, writer)
            tmp.rename(self.root / f"checkpoint_{index:06d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        finished = [p for p in sorted(self.root.glob("checkpoint_*")) if complete_checkpoint(p)]
        for old in finished[:-self.keep] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)


class RayContext(TrainContext):
    """Inside a Ray Train worker."""

    def __init__(self, mlflow_log: _MetricLog | None, storage: str = "") -> None:
        import ray.train
        import ray.train.torch
        ctx = ray.train.get_context()
        super().__init__(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), mlflow_log)
        self._restored: Path | None | bool = False  # False: not looked up yet
        self.storage = storage

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch
        return ray.train.torch.prepare_model(model)  # moves to device; DDP when world_size > 1

    def latest_checkpoint(self) -> Path | None:
        if self._restored is False:
            import pyarrow.fs
            import ray.train
            ckpt = ray.train.get_checkpoint()
            if ckpt is None:
                self._restored = None
            elif isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
                self._restored = complete_checkpoint(ckpt.path)
            else:  # remote storage: download once per worker
                self._restored = complete_checkpoint(ckpt.to_directory())
        return self._restored

    def _save_checkpoint(self, metrics: dict[str, float], step: int, writer: CheckpointWriter) -> None:
        import ray.train
        if self.is_main:
            with tempfile.TemporaryDirectory(prefix="skyeye-ckpt-") as tmp:
                _write_checkpoint(Path(tmp), step, writer)
                try:
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
                except Exception as err:  # the upload: Ray commits nothing, so no checkpoint is claimed
                    raise CheckpointStoreError(f"the checkpoint of step {step} could not be written to "
                                               f"{self.storage}: {type(err).__name__}: {err}") from err
        else:
            ray.train.report(metrics, checkpoint=None)
        # report() returns once the files are uploaded, but the controller registers the checkpoint
        # only at its next poll; a worker dying before that would lose it. Wait, on every rank.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def _ray_worker(config: dict) -> dict:
    """The function every Ray Train worker runs: wraps the user loop in a RayContext."""
    import ray.train
    from ray import cloudpickle
    started = time.time()
    rank = ray.train.get_context().get_world_rank()
    _record_attempt(config["fit_token"], started, rank)
    mlflow_log = _MetricLog(config["tracking_uri"], config["run_id"]) if rank == 0 and config["run_id"] else None
    ctx = RayContext(mlflow_log, config.get("storage", ""))
    try:
        loop_fn, loop_config = cloudpickle.loads(config["payload"])
        output = loop_fn(ctx, loop_config)
    finally:
        ctx._close()
    return {"output": output, "metrics": ctx.last_metrics}


def _record_attempt(token: str, started: float, rank: int) -> None:
    """Rank 0 writes one file per worker-group start (restarts are counted from them); every
    rank names its node (the nodes a run used)."""
    # Best effort: these are only counted, never needed; get_storage is a DeveloperAPI.
    try:
        import ray
        import ray.train
        storage = ray.train.get_context().get_storage()
        folder = f"{storage.experiment_fs_path}/{_ATTEMPTS_DIR}"
        storage.storage_filesystem.create_dir(folder)
        node = ray.get_runtime_context().get_node_id()
        name = f"{token}-start-{uuid.uuid4().hex}" if rank == 0 else f"{token}-node-{uuid.uuid4().hex}"
        with storage.storage_filesystem.open_output_stream(f"{folder}/{name}") as f:
            f.write(json.dumps({"started": started, "node": node}).encode())
    except Exception:
        pass


def _read_attempts(result: Any, token: str) -> tuple[list[float], set[str]]:
    """The start times of the worker groups, and the nodes their workers ran on."""
    starts, nodes = [], set()
    try:
        import pyarrow.fs
        fs = result.filesystem
        infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{result.path}/{_ATTEMPTS_DIR}", allow_not_found=True))
        for info in infos:
            if info.base_name.startswith(token):
                with fs.open_input_stream(info.path) as f:
                    record = json.loads(f.read().decode())
                if "-start-" in info.base_name:
                    starts.append(record["started"])
                nodes.add(record["node"])
    except Exception:
        return [], set()
    return sorted(starts), nodes


def fit(loop_fn: Callable[[TrainContext, dict], dict | None], loop_config: dict, cfg: FitConfig) -> FitResult:
    """Run `loop_fn` on `cfg.num_workers` Ray Train workers; a local Ray unless RAY_ADDRESS is set."""
    t0 = time.time()
    try:  # what _trainer and _fit_result use, checked before any Ray starts
        import pyarrow.fs  # noqa: F401
        import ray
        import ray.train.torch  # noqa: F401
        import ray.train.v2.api.config  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"Ray Train is not importable ({err}); install it: pip install 'ray[train]>=2.60'") from err
    if not isinstance(cfg, FitConfig):
        raise TypeError(f"cfg must be a FitConfig, got {type(cfg).__name__}")

    # Read by the driver and propagated by Ray Train to the controller and the workers.
    user_interval = os.environ.get(_HEALTH_CHECK_ENV)
    os.environ[_HEALTH_CHECK_ENV] = user_interval or _HEALTH_CHECK_S
    started_ray = ray_session.connect(max(1, math.ceil(cfg.num_workers * cfg.cpus_per_worker)),
                                      None if cfg.use_gpu else 0, cfg.verbose)
    token = uuid.uuid4().hex
    try:
        trainer = _trainer(loop_fn, loop_config, cfg, token)
        try:
            result = trainer.fit()
        except Exception as err:  # Ray's error holds the workers' tracebacks; say where first
            raise TrainingFailed(f"Ray Train run {cfg.run_name!r} failed after {cfg.max_failures} restart(s) "
                                 f"at most (checkpoints: {cfg.resolved_storage()}): {err}") from err
    finally:
        if started_ray:
            ray.shutdown()
        if user_interval is None:
            os.environ.pop(_HEALTH_CHECK_ENV, None)
    return _fit_result(result, token, t0, time.time() - t0)


def _trainer(loop_fn: Callable[[TrainContext, dict], dict | None], loop_config: dict, cfg: FitConfig, token: str):
    """The TorchTrainer that runs `loop_fn` in `_ray_worker` on cfg's workers and storage."""
    from ray import cloudpickle
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig
    return TorchTrainer(
        _ray_worker,
        # Pickled here so the controller, which lacks the workers' env (PYTHONPATH), never unpickles it.
        train_loop_config={"payload": cloudpickle.dumps((loop_fn, loop_config)), "fit_token": token,
                           "tracking_uri": cfg.resolved_tracking_uri() if cfg.mlflow_run_id else None,
                           "run_id": cfg.mlflow_run_id, "storage": cfg.resolved_storage()},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        # SPREAD: one worker per node where there are enough nodes (a lost node costs one
        # worker, and the restart packs onto the others); on one machine it is the same as PACK
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     placement_strategy="SPREAD"),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=cfg.resolved_storage(),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
            worker_runtime_env={"env_vars": dict(cfg.env)} if cfg.env else None,
            logging_config=LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING"),
        ),
    )


def _fit_result(result: Any, token: str, t0: float, seconds: float) -> FitResult:
    """What a finished Ray Train run returned: the workers' metrics and output, its last
    checkpoint (downloaded when remote), and the restarts and nodes its attempts recorded."""
    import pyarrow.fs
    returned = result.return_value or {}
    checkpoint_dir = None
    if result.checkpoint is not None:
        local = isinstance(result.checkpoint.filesystem, pyarrow.fs.LocalFileSystem)
        checkpoint_dir = Path(result.checkpoint.path if local else result.checkpoint.to_directory())
    starts, nodes = _read_attempts(result, token)
    return FitResult(
        metrics=returned.get("metrics") or dict(result.metrics or {}),
        checkpoint_dir=checkpoint_dir,
        restarts=len(starts) - 1 if starts else -1,
        seconds=seconds,
        nodes=len(nodes),
        startup_seconds=(starts[0] - t0) if starts else float("nan"),
        output=returned.get("output"),
    )


def fit_local(loop_fn: Callable[[TrainContext, dict], dict | None], loop_config: dict, cfg: FitConfig) -> FitResult:
    """The same loop in this process (rank 0 of 1): no Ray, no restarts; same MLflow and checkpoints."""
    t0 = time.time()
    storage = cfg.resolved_storage()
    if "://" in storage:
        raise ValueError(f"fit_local needs a local storage_path, got {storage}")
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    with _environ(cfg.env):  # what workers would get through their runtime_env
        mlflow_log = _MetricLog(cfg.resolved_tracking_uri(), cfg.mlflow_run_id) if cfg.mlflow_run_id else None
        ctx = LocalContext(Path(storage) / cfg.run_name, device, mlflow_log, cfg.checkpoints_to_keep)
        started = time.time()
        try:
            output = loop_fn(ctx, loop_config)
        finally:
            ctx._close()
    return FitResult(metrics=ctx.last_metrics, checkpoint_dir=ctx.latest_checkpoint(), restarts=0,
                     seconds=time.time() - t0, startup_seconds=started - t0, output=output)
