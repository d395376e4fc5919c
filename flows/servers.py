"""`skyeye server up`: the Prefect server (schedules, triggers, the UI) and the MLflow UI on
this machine, on loopback, with their state under the project (`.skyeye/prefect`, the
SQLite store under `mlruns/`). In the foreground until Ctrl-C, which stops both."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from skyeye.config import LOCAL_HOST, MLFLOW_PORT, PREFECT_PORT, configure_environment


@dataclass
class Servers:
    prefect_url: str
    mlflow_url: str | None  # None: the tracking store is a server of its own
    processes: list[subprocess.Popen]

    def stop(self) -> None:
        for p in self.processes:
            p.terminate()
        for p in self.processes:
            try:
                p.wait(8)  # the whole stop stays under the supervisor's grace
            except subprocess.TimeoutExpired:
                p.kill()


def _wait(url: str, what: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before answering at {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s")


def start(host: str = LOCAL_HOST, prefect_port: int = PREFECT_PORT, mlflow_port: int = MLFLOW_PORT,
          log_dir: Path | None = None, timeout: float = 180) -> Servers:
    """Start both and wait until they answer."""
    settings = configure_environment()
    bin_dir = Path(sys.executable).parent
    log_dir = log_dir or settings.state / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)  # the server must not look for another server
    procs: list[subprocess.Popen] = []
    try:
        prefect = subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", host, "--port",
                                    str(prefect_port)], env=env, cwd=settings.project_root,
                                   stdout=open(log_dir / "prefect-server.log", "ab"), stderr=subprocess.STDOUT)
        procs.append(prefect)
        mlflow_url = None
        if not settings.tracking_uri.startswith("http"):
            mlflow = subprocess.Popen([str(bin_dir / "mlflow"), "ui", "--backend-store-uri", settings.tracking_uri,
                                       "--host", host, "--port", str(mlflow_port)], env=env,
                                      cwd=settings.project_root, stdout=open(log_dir / "mlflow-ui.log", "ab"),
                                      stderr=subprocess.STDOUT)
            procs.append(mlflow)
            mlflow_url = f"http://{host}:{mlflow_port}"
            _wait(f"{mlflow_url}/health", "the MLflow UI", mlflow, timeout)
        _wait(f"http://{host}:{prefect_port}/api/health", "the Prefect server", prefect, timeout)
    except BaseException:
        Servers("", None, procs).stop()
        raise
    return Servers(f"http://{host}:{prefect_port}", mlflow_url, procs)
