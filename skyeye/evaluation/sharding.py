"""The evaluation on N Ray workers (`skyeye evaluate --num-workers N`): each bench split's
rows are cut into N contiguous shards, worker i answers shard i of every split with its own
copy of the model, and the answers come back in row order to the driver, which scores
them and logs the one MLflow run exactly as the in-process evaluation does.

- Workers never receive a live model: each loads it once from the reference the driver
  resolved (a model folder as an absolute path, or a registry URI pinned to its version,
  so an alias moving mid-evaluation changes nothing), through `model.references.load`,
  the loader the in-process path uses; the untuned baseline is rebuilt there the same way.
- Shards start on batch boundaries (multiples of the batch size), so every worker feeds
  the model exactly the batches one process would: greedy answers, hence the scores, are
  the same whatever the number of workers.
- Every split's shards are queued at once (in chunks of a few batches, in the in-process
  order: the model's answers, then the untuned model's, split by split), so the driver's
  scoring of one split overlaps the workers' answering of the next.
- Ray: `cluster.ray_session.connect` (the cluster RAY_ADDRESS names, else SkyEye's own
  local Ray, never a stray cluster); shut down only when started here. Workers get the
  driver's settings (tracking URI, project root, registered model name) as env vars
  (`ray_session.worker_env`).

`ray` is imported inside the functions that start workers (a second of import time that
the in-process evaluation, which imports this module too, never needs).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cluster import ray_session
from ..config import Settings
from ..formats.benchmarks import spread
from ..model.references import (
    URI_PREFIX,
    RegistryError,
    load,
    model_folder,
    model_name,
    resolve_version,
    training_run_of,
)
from ..model.skyeyegpt import META_FILE, untuned_like
from ..tracking import runs
from ..tracking.names import TAG_TRAINING_RUN
from .predictors import ModelPredictor, media_of

# a worker call answers this many batches: the progress bar moves once per call
CHUNK_BATCHES = 8


def check_num_workers(num_workers) -> int:
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1 (1: evaluate in this process; N > 1: N Ray "
                         f"workers), got {num_workers!r}")
    return num_workers


def shard_bounds(n: int, shards: int, align: int = 1) -> list[tuple[int, int]]:
    """[start, end) of at most `shards` contiguous, non-empty pieces covering `n` rows; each
    starts on a multiple of `align` and their sizes in `align`-blocks differ by at most one."""
    blocks = math.ceil(n / align)
    base, extra = divmod(blocks, shards)
    out, start = [], 0
    for i in range(shards):
        size = (base + (i < extra)) * align
        if size and start < n:
            out.append((start, min(n, start + size)))
        start += size
    return out


@dataclass(frozen=True)
class ModelRef:
    load_ref: str  # what each worker loads: an absolute model folder or models:/<name>/<version>
    source: str  # what the run records as the scored model (as the in-process path: `LoadedModel.source`)
    training_run: str  # the tuning-stage run that wrote the model, "" when unknown


def resolve_ref(ref: str) -> ModelRef:
    """What `model.references.load` would load, resolved on the driver without loading it."""
    text = str(ref).strip()
    try:
        if text.startswith(URI_PREFIX):
            version = resolve_version(text)
            mv = runs.client().get_model_version(model_name(), str(version))
            return ModelRef(f"{URI_PREFIX}{model_name()}/{version}", text, mv.tags.get(TAG_TRAINING_RUN, ""))
        folder = model_folder(text)
        if not (Path(folder) / META_FILE).exists():
            raise FileNotFoundError(f"{folder}: not a saved SkyEyeGPT (no {META_FILE})")
        run = text if folder != text else (training_run_of(folder) or "")
        return ModelRef(str(Path(folder).resolve()), folder, run)
    except Exception as err:  # noqa: BLE001 - reported as the in-process loader reports it
        raise RegistryError(f"{text}: does not load: {err}") from None


class _Worker:
    """One Ray actor: the model (and its untuned baseline) loaded once, answering row chunks."""

    def __init__(self, load_ref: str, untuned: bool, batch_size: int, threads: int, device: str) -> None:
        torch.set_num_threads(max(1, threads))
        model = load(load_ref).model.to(device)
        cache: dict = {}  # as in-process: the two models share the frozen encoder's output
        self.predictors = {"skyeyegpt": ModelPredictor(model, batch_size=batch_size, encoder_cache=cache)}
        if untuned:
            self.predictors["untuned"] = ModelPredictor(untuned_like(model).to(device), "untuned", batch_size, cache)

    def ready(self) -> int:
        return os.getpid()

    def answer(self, which: str, eval_dir: str, rows: list[dict], prompts: list[str], max_new_tokens: int
               ) -> list[str]:
        return self.predictors[which].answer(Path(eval_dir), rows, prompts, max_new_tokens)


@dataclass
class WorkerPool:
    workers: list  # Ray actor handles, worker i answers shard i
    batch_size: int
    chunk_batches: int = CHUNK_BATCHES

    @property
    def size(self) -> int:
        return len(self.workers)


@contextmanager
def worker_pool(model: ModelRef, num_workers: int, *, untuned: bool, batch_size: int, settings: Settings,
                cpus_per_worker: float = 1, gpus_per_worker: float = 0, start_timeout_s: float = 900
                ) -> Iterator[WorkerPool]:
    """`num_workers` Ray actors, each with the model loaded; a model that does not load on a
    worker is a RegistryError naming it. Ray is stopped at the end only if started here."""
    import ray
    check_num_workers(num_workers)
    started = ray_session.connect(max(1, math.ceil(num_workers * cpus_per_worker)), None if gpus_per_worker else 0)
    workers: list = []
    try:
        device = "cuda" if gpus_per_worker else "cpu"
        actor = ray.remote(_Worker).options(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=1, max_task_retries=1,
            runtime_env={"env_vars": ray_session.worker_env(settings)})
        workers = [actor.remote(model.load_ref, untuned, batch_size, math.ceil(cpus_per_worker), device)
                   for _ in range(num_workers)]
        try:
            ray.get([w.ready.remote() for w in workers], timeout=start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"{num_workers} evaluation workers ({cpus_per_worker} CPU, {gpus_per_worker} GPU "
                               f"each) did not start within {start_timeout_s:.0f} s; the cluster has "
                               f"{ray.available_resources()} free") from None
        except ray.exceptions.RayActorError as err:
            why = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            name, _, rest = why.partition(": ")  # "module.SomeError: message" -> "message"
            why = rest if rest and name.rsplit(".", 1)[-1].endswith(("Error", "Exception")) else why
            raise RegistryError(f"{model.source}: does not load on a Ray worker: {why}") from None
        yield WorkerPool(workers, batch_size)
    finally:
        for w in workers:
            ray.kill(w)
        if started:
            ray.shutdown()


@dataclass
class ShardedPredictor:
    """`ModelPredictor.answer` over a pool: contiguous batch-aligned shards, one per worker,
    answers back in row order."""
    pool: WorkerPool
    name: str = "skyeyegpt"  # which of the worker's models: "skyeyegpt" or "untuned"
    _queued: dict = field(default_factory=dict)  # _key -> queued calls, each [(rows, ObjectRef)]

    def _submit(self, root: Path, rows: list[dict], prompts: list[str], max_new_tokens: int) -> list[tuple]:
        chunk = self.pool.batch_size * self.pool.chunk_batches
        eval_dir = str(Path(root).resolve())  # a worker's working directory may differ from ours
        out = []
        for worker, (start, end) in zip(self.pool.workers, shard_bounds(len(rows), self.pool.size,
                                                                        self.pool.batch_size), strict=False):
            for a in range(start, end, chunk):
                b = min(end, a + chunk)
                out.append((b - a, worker.answer.remote(self.name, eval_dir, rows[a:b], prompts[a:b],
                                                        max_new_tokens)))
        return out

    @staticmethod
    def _key(root: Path, rows: list[dict], prompts: list[str], max_new_tokens: int) -> tuple:
        """What decides the answers: the media, the prompts and the budget (ids may repeat across splits)."""
        return str(root), max_new_tokens, tuple(zip((media_of(r) for r in rows), prompts, strict=True))

    def prefetch(self, root: Path, splits: list[tuple[list[dict], int]], untuned: ShardedPredictor | None = None,
                 untuned_limit: int | None = None) -> int:
        """Queue every split now (rows, answer budget), each split's untuned subset after its
        rows; returns the number of shards the model's answers were cut into."""
        shards = 0
        for rows, budget in splits:
            prompts = [r["prompt"] for r in rows]
            self._queued.setdefault(self._key(root, rows, prompts, budget), []).append(
                self._submit(root, rows, prompts, budget))
            shards += len(shard_bounds(len(rows), self.pool.size, self.pool.batch_size))
            if untuned is not None:
                some = spread(rows, untuned_limit)
                prompts = [r["prompt"] for r in some]
                untuned._queued.setdefault(self._key(root, some, prompts, budget), []).append(
                    untuned._submit(root, some, prompts, budget))
        return shards

    def answer(self, root: Path, rows: list[dict], prompts: list[str], max_new_tokens: int,
               progress=None) -> list[str]:
        import ray
        queued = self._queued.get(self._key(root, rows, prompts, max_new_tokens))
        pending = queued.pop(0) if queued else self._submit(root, rows, prompts, max_new_tokens)
        if progress is not None:
            left = {ref: n for n, ref in pending}
            while left:
                done, _ = ray.wait(list(left), num_returns=1)
                progress.update(sum(left.pop(ref) for ref in done))
        out = [a for n, ref in pending for a in ray.get(ref)]
        if len(out) != len(rows):
            raise RuntimeError(f"workers returned {len(out)} answers for {len(rows)} rows")
        return out
