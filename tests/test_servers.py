"""The same code against real servers on loopback, selected only by environment
variables: an MLflow tracking server and a Prefect API server."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from processes import free_port, stop_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent



def _serve(cmd: list[str], health: str, env: dict, timeout: float = 90.0) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(health, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}")
        time.sleep(0.5)
    stop_group(proc)
    raise TimeoutError(f"{health} not healthy after {timeout} s")



@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    (root / "configs").mkdir(parents=True)
    (root / "configs/data.yaml").write_text(yaml.safe_dump({"scale": "tiny", "seed": 0}))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


@pytest.mark.slow
def test_retrain_flow_against_prefect_and_mlflow_servers(project, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "SKYEYE_"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DVC_NO_ANALYTICS": "1"}
    mlflow_port, prefect_port = free_port(), free_port()
    mlflow = _serve([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                     "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                     "--artifacts-destination", str(tmp_path / "server-artifacts")],
                    f"http://127.0.0.1:{mlflow_port}/health", env)
    prefect = None
    try:
        prefect = _serve([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                         f"http://127.0.0.1:{prefect_port}/api/health", env)
        run_env = env | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
                         "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"}
        out = subprocess.run([sys.executable, "-m", "flows.retrain", "--data-only"], cwd=project, env=run_env | {
            "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        # The flow run is recorded by the Prefect server ...
        runs = httpx.post(f"http://127.0.0.1:{prefect_port}/api/flow_runs/filter", json={}).json()
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
        # ... and the data-gate result by the MLflow server, not in a local mlruns/.
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_port}")
        exp = client.get_experiment_by_name("skyeye-data-validation")
        found = client.search_runs([exp.experiment_id])
        assert len(found) == 1 and found[0].data.tags["skyeye.validation.outcome"] == "passed"
        assert not (project / "mlruns" / "mlflow.db").exists()
        assert client.list_artifacts(found[0].info.run_id)  # artifacts went through the server
    finally:
        if prefect:
            stop_group(prefect)
        stop_group(mlflow)
