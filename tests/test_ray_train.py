"""The Ray Train layer with real Ray (2 CPU workers, gloo DDP) and a real SQLite MLflow store:
a toy linear regression trains N steps, checkpoints every K, and resumes from its checkpoint."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from skyeye.training.ray_train import (
    COMPLETE,
    FitConfig,
    TrainContext,
    complete_checkpoint,
    fit,
    fit_local,
    latest_complete_checkpoint,
    unwrap_model,
)

N_STEPS, EVERY = 20, 5
TRUE_W = torch.tensor([1.0, -2.0, 3.0, 0.5])


def toy_loop(ctx: TrainContext, config: dict) -> dict:
    """Linear regression; each rank draws its own data, so only DDP keeps the weights equal."""
    out = Path(config["out"])
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optim = torch.optim.SGD(model.parameters(), lr=0.05)
    start = 0
    if (ckpt := ctx.latest_checkpoint()) is not None:
        state = torch.load(ckpt / "state.pt")
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        start = state["step"]
    (out / f"resumed-rank{ctx.rank}-{time.time_ns()}").write_text(str(start))
    (out / f"env-rank{ctx.rank}").write_text(os.environ.get("SKYEYE_TOY_ENV", ""))
    model = ctx.prepare_model(model)
    gen = torch.Generator().manual_seed(1000 * (ctx.rank + 1) + start)
    for step in range(start + 1, config["steps"] + 1):
        x = torch.randn(16, 4, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), x @ TRUE_W + 0.1)
        optim.zero_grad()
        loss.backward()
        optim.step()
        kill = config.get("kill")
        if kill and ctx.rank == kill["rank"] and step == kill["step"] and not (out / "killed").exists():
            (out / "killed").touch()  # only the first attempt dies
            os.kill(os.getpid(), signal.SIGKILL)
        gate = config.get("gate")  # rank 0 waits here once, at this step, for the test to act
        if gate and ctx.rank == 0 and step == gate["step"] and not Path(gate["go"]).exists():
            Path(gate["reached"]).touch()
            while not Path(gate["go"]).exists():
                time.sleep(0.1)
        writer = None
        if step % config["every"] == 0 or step == config["steps"]:
            def writer(folder: Path, step: int = step) -> None:
                torch.save({"model": unwrap_model(model).state_dict(), "optim": optim.state_dict(), "step": step},
                           folder / "state.pt")
        ctx.report({"loss": loss.item()}, step, writer)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    (out / f"weights-rank{ctx.rank}.json").write_text(json.dumps(weights))
    return {"final_step": config["steps"]}


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"  # one store: creating it takes seconds


@pytest.fixture
def mlflow_run(tmp_path: Path, mlflow_uri: str) -> tuple[MlflowClient, str, str, str]:
    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment(tmp_path.name, artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    return client, mlflow_uri, exp, run_id


def _config(tmp_path: Path, uri: str, run_id: str, **kw) -> FitConfig:
    # PYTHONPATH lets workers import this test module (pickled by reference) and exercises `env`.
    env = {"PYTHONPATH": str(Path(__file__).parent), "SKYEYE_TOY_ENV": "reached"}
    return FitConfig(num_workers=2, storage_path=str(tmp_path / "ray"), run_name="toy",
                     mlflow_tracking_uri=uri, mlflow_run_id=run_id, env=env, **kw)


def _loop_config(tmp_path: Path, **kw) -> dict:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return {"out": str(out), "steps": N_STEPS, "every": EVERY, **kw}


def _assert_history(client: MlflowClient, exp: str, run_id: str) -> None:
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, N_STEPS + 1))  # every step, once: none from rank 1, none re-logged
    assert [r.info.run_id for r in client.search_runs([exp])] == [run_id]


def _checkpoint_step(folder: Path | None) -> int:
    assert folder is not None and complete_checkpoint(folder) == folder
    return torch.load(folder / "state.pt")["step"]


def _resumed_from(out: Path, rank: int) -> list[int]:
    return [int(p.read_text()) for p in sorted(out.glob(f"resumed-rank{rank}-*"))]


@pytest.mark.slow
def test_two_workers_ddp_checkpoint_and_rank0_mlflow(tmp_path, mlflow_run):
    client, uri, exp, run_id = mlflow_run
    result = fit(toy_loop, _loop_config(tmp_path), _config(tmp_path, uri, run_id))
    out = tmp_path / "out"

    _assert_history(client, exp, run_id)
    assert result.metrics["step"] == N_STEPS and result.output == {"final_step": N_STEPS}
    assert _checkpoint_step(result.checkpoint_dir) == N_STEPS
    assert result.checkpoint_dir.is_relative_to(tmp_path / "ray")
    w0, w1 = (json.loads((out / f"weights-rank{r}.json").read_text()) for r in (0, 1))
    assert w0 == w1  # DDP averaged the gradients of two different data streams
    assert (out / "env-rank1").read_text() == "reached"
    assert result.restarts == 0 and 0 < result.startup_seconds < result.seconds


@pytest.mark.slow
def test_worker_killed_restarts_from_last_checkpoint(tmp_path, mlflow_run):
    client, uri, exp, run_id = mlflow_run
    kill_step = 2 * EVERY + 2
    result = fit(toy_loop, _loop_config(tmp_path, kill={"rank": 1, "step": kill_step}),
                 _config(tmp_path, uri, run_id, max_failures=1))
    out = tmp_path / "out"

    assert (out / "killed").exists()
    assert _resumed_from(out, 1) == [0, 2 * EVERY]  # fresh start, then the last checkpoint before the kill
    assert _resumed_from(out, 0) == [0, 2 * EVERY]
    assert result.restarts == 1
    assert result.metrics["step"] == N_STEPS and _checkpoint_step(result.checkpoint_dir) == N_STEPS
    _assert_history(client, exp, run_id)  # the re-run steps 11-12 were not logged twice


@pytest.mark.slow
def test_a_stale_cluster_address_is_never_attached_to(tmp_path, mlflow_run, monkeypatch):
    """A `ray start --head` killed without `ray stop` leaves its address behind; with
    RAY_ADDRESS unset, SkyEye starts its own Ray instead of attaching to that dead cluster."""
    from processes import free_port
    from ray._common.utils import get_ray_address_file
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address_file = Path(get_ray_address_file(None))
    saved = address_file.read_text() if address_file.exists() else None
    address_file.parent.mkdir(parents=True, exist_ok=True)
    address_file.write_text(f"127.0.0.1:{free_port()}")  # nothing listens there
    client, uri, exp, run_id = mlflow_run
    try:
        result = fit(toy_loop, _loop_config(tmp_path), _config(tmp_path, uri, run_id))
    finally:
        address_file.write_text(saved) if saved is not None else address_file.unlink()
    assert result.metrics["step"] == N_STEPS and result.nodes == 1


def test_fit_local_same_loop_same_logging(tmp_path, mlflow_run):
    client, uri, exp, run_id = mlflow_run
    cfg = _config(tmp_path, uri, run_id)
    result = fit_local(toy_loop, _loop_config(tmp_path), cfg)

    _assert_history(client, exp, run_id)
    assert result.restarts == 0 and result.output == {"final_step": N_STEPS}
    assert _checkpoint_step(result.checkpoint_dir) == N_STEPS
    assert len(list((tmp_path / "ray" / "toy").glob("checkpoint_*"))) == cfg.checkpoints_to_keep
    assert "SKYEYE_TOY_ENV" not in os.environ  # env applied for the loop only

    again = fit_local(toy_loop, _loop_config(tmp_path), cfg)  # same run name: resumes, nothing left to do
    assert _resumed_from(tmp_path / "out", 0) == [0, N_STEPS] and again.checkpoint_dir == result.checkpoint_dir


def test_checkpoint_without_complete_marker_is_ignored(tmp_path):
    older, newer = tmp_path / "checkpoint_000000", tmp_path / "checkpoint_000001"
    for folder in (older, newer):
        folder.mkdir()
        (folder / "state.pt").write_bytes(b"x")
    assert complete_checkpoint(newer) is None and latest_complete_checkpoint(tmp_path) is None
    (older / COMPLETE).write_text("{}")
    assert latest_complete_checkpoint(tmp_path) == older  # the newer one was interrupted mid-write
    (newer / COMPLETE).write_text("{}")
    assert latest_complete_checkpoint(tmp_path) == newer
    assert complete_checkpoint(None) is None and latest_complete_checkpoint(tmp_path / "missing") is None


@pytest.mark.parametrize("kw", [{"num_workers": 0}, {"num_workers": 1.5}, {"cpus_per_worker": 0},
                                {"max_failures": -2}, {"checkpoints_to_keep": 0}])
def test_bad_config_is_rejected(kw):
    with pytest.raises(ValueError):
        FitConfig(**kw)
