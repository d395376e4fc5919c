"""`skyeye doctor` on the embedded defaults and with each variable pointing at nothing: every
part names its backend, a dead one fails with what to set, and the exit code says so. (The
servers answering is tested in test_cluster.py, against real ones.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from processes import free_port

BIN = Path(sys.executable).parent


def _doctor(root: Path, **env: str) -> tuple[int, dict[str, dict]]:
    ours = ("PREFECT_", "MLFLOW_", "SKYEYE_", "RAY_", "AWS_")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    out = subprocess.run([str(BIN / "skyeye"), "doctor", "--json"], cwd=root, capture_output=True, text=True,
                         timeout=120, env=clean | {"SKYEYE_PROJECT_ROOT": str(root)} | env)
    return out.returncode, {c["part"]: c for c in json.loads(out.stdout)}


def test_embedded_defaults_all_answer(tmp_path):
    (tmp_path / "mlruns").mkdir()
    code, checks = _doctor(tmp_path)
    assert code == 0, checks
    assert set(checks) == {"tracking + registry", "orchestration", "compute", "checkpoints", "data versions"}
    assert all("embedded default" in c["backend"] for c in checks.values()), checks
    assert str(tmp_path / "mlruns" / "mlflow.db") in checks["tracking + registry"]["backend"]


def test_each_server_that_does_not_answer_fails_with_what_to_set(tmp_path):
    (tmp_path / "mlruns").mkdir()
    dead = free_port()  # nothing listens there
    code, checks = _doctor(tmp_path, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{dead}",
                           PREFECT_API_URL=f"http://127.0.0.1:{dead}/api", RAY_ADDRESS=f"127.0.0.1:{dead}",
                           SKYEYE_DVC_REMOTE_URL="s3://skyeye-dvc/remote", AWS_ENDPOINT_URL=f"http://127.0.0.1:{dead}",
                           AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_DEFAULT_REGION="us-east-1")
    assert code == 1
    assert not any(c["ok"] for c in checks.values()), checks
    assert checks["tracking + registry"]["backend"] == f"MLflow server http://127.0.0.1:{dead}"
    assert "MLFLOW_TRACKING_URI" in checks["tracking + registry"]["hint"]
    assert "PREFECT_API_URL" in checks["orchestration"]["hint"]
    assert "RAY_ADDRESS" in checks["compute"]["hint"]
    # a cluster cannot share a folder on this machine: checkpoints need SKYEYE_RAY_STORAGE
    assert "SKYEYE_RAY_STORAGE" in checks["checkpoints"]["hint"]
    assert checks["data versions"]["backend"] == f"S3 bucket skyeye-dvc at http://127.0.0.1:{dead}"
    assert "AWS_ENDPOINT_URL" in checks["data versions"]["hint"]
