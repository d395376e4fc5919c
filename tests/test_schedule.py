"""Retraining that runs itself, against a real `prefect server start` on loopback (started by
`skyeye server up`, with the MLflow UI beside it) and `skyeye schedule up` serving the
deployments (retrain, serve, the daily drift monitor): listed with their schedules and
triggers; a retrain started through the API completes, the next reuses every step, a config
change reruns only what follows it; a data-version event starts retrain; moving production
starts the serve deployment with the new version; two starts at once run one retrain at a time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from processes import free_port, stop_group
from projects import REPO, write_project

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
def _wait_for(what: str, check, timeout: float = 300, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")


def _project(root: Path) -> None:
    write_project(root, schedule={
        "retrain": {"cron": "0 3 * * 1", "when_busy": "enqueue",
                    "parameters": {"model_file": "configs/model/test.yaml", "stage1_file": "configs/stage1.yaml",
                                   "stage2_file": "configs/stage2.yaml", "num_workers": 1, "eval_limit": 3}},
        "watch_every_s": 2})


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory):
    root = tmp_path_factory.mktemp("scheduled") / "project"
    _project(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "SKYEYE_", "RAY_"))}
    env |= {"SKYEYE_PROJECT_ROOT": str(root), "PYTHONPATH": str(REPO)}
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    logs = root / "logs"
    logs.mkdir()
    servers = subprocess.Popen([str(BIN / "skyeye"), "server", "up", "--prefect-port", str(prefect_port),
                                "--mlflow-port", str(mlflow_port)], cwd=root, env=env, start_new_session=True,
                               stdout=open(logs / "server-up.log", "w"), stderr=subprocess.STDOUT)
    runner = None
    try:
        _wait_for("skyeye server up", lambda: "export PREFECT_API_URL" in (logs / "server-up.log").read_text(), 240)
        assert httpx.get(f"http://127.0.0.1:{mlflow_port}/health").status_code == 200  # the MLflow UI beside it
        env |= {"PREFECT_API_URL": api}
        runner = subprocess.Popen([str(BIN / "skyeye"), "schedule", "up"], cwd=root, env=env, start_new_session=True,
                                  stdout=open(logs / "schedule-up.log", "w"), stderr=subprocess.STDOUT)
        # Prefect reads its settings once per process: earlier tests' servers must not answer here
        from prefect.settings import PREFECT_API_URL, temporary_settings
        with pytest.MonkeyPatch.context() as mp, temporary_settings({PREFECT_API_URL: api}):
            for key, value in env.items():
                mp.setenv(key, value)
            for key in [k for k in os.environ if k.startswith(("MLFLOW_", "RAY_"))]:
                mp.delenv(key)
            from skyeye.config import get_settings
            get_settings.cache_clear()
            _wait_for("the deployments", lambda: len(_status(root, env)) == 3, 180, 3)
            yield {"root": root, "env": env, "api": api, "logs": logs, "runner": runner, "servers": servers}
            get_settings.cache_clear()
    finally:
        if runner:
            stop_group(runner)
        stop_group(servers)


def _status(root: Path, env: dict) -> list[dict]:
    out = subprocess.run([str(BIN / "skyeye"), "schedule", "status", "--json"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout) if out.returncode == 0 else []


def _client():
    from prefect import get_client
    return get_client(sync_client=True)


def _runs(deployment: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    with _client() as client:
        return [r for r in client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC) if r.state_type.value != "SCHEDULED"]


def _finished(run_id) -> object:
    with _client() as client:
        run = client.read_flow_run(run_id)
    return run if run.state and run.state.is_final() else None


def _steps(run_id) -> dict[str, str]:
    """Task name -> its final state's name ("Cached" when reused)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    with _client() as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {t.name.rsplit("-", 1)[0]: t.state_name for t in tasks}


def _retrain(logs: Path, **parameters):
    from prefect.deployments import run_deployment
    run = run_deployment("retrain/retrain", parameters=parameters or None, timeout=0)
    done = _wait_for("retrain", lambda: _finished(run.id), 600, 2)
    assert done.state.is_completed(), (done.state.message, (logs / "schedule-up.log").read_text()[-4000:])
    return done


def test_deployments_are_listed_with_schedules_and_triggers(scheduled):
    rows = {r["deployment"]: r for r in _status(scheduled["root"], scheduled["env"])}
    assert set(rows) == {"retrain/retrain", "rollout/serve", "monitor/monitor"}
    assert rows["retrain/retrain"]["schedules"] == ["cron 0 3 * * 1 (UTC)"]
    assert sorted(rows["retrain/retrain"]["triggers"]) == ["retrain on a new data version", "retrain on drift"]
    assert rows["monitor/monitor"]["schedules"] == ["cron 0 4 * * * (UTC)"]
    _assert_next_monday_3am(rows["retrain/retrain"]["next_run"])
    assert rows["rollout/serve"]["triggers"] == ["serve the new production"]
    assert rows["rollout/serve"]["next_run"] is None  # event-driven only


def _assert_next_monday_3am(text: str | None) -> None:
    from datetime import UTC, datetime, timedelta
    assert text, "no next run"
    when = datetime.fromisoformat(text).astimezone(UTC)
    now = datetime.now(UTC)
    assert (when.weekday(), when.hour, when.minute) == (0, 3, 0) and now < when <= now + timedelta(days=7), text


def test_pause_and_resume(scheduled):
    root, env = scheduled["root"], scheduled["env"]

    def run(*args):
        out = subprocess.run([str(BIN / "skyeye"), "schedule", *args], cwd=root, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return {r["deployment"]: r for r in _status(root, env)}

    try:
        rows = run("pause", "retrain/retrain")
        assert rows["retrain/retrain"]["paused"] and rows["retrain/retrain"]["next_run"] is None
        assert not rows["rollout/serve"]["paused"]
    finally:
        rows = run("resume", "retrain/retrain")
    assert not rows["retrain/retrain"]["paused"]
    _assert_next_monday_3am(rows["retrain/retrain"]["next_run"])


def test_a_run_through_the_api_completes_and_the_next_reuses_every_step(scheduled):
    first = _retrain(scheduled["logs"])
    steps = _steps(first.id)
    assert {"synth", "validate", "stage1", "stage2", "evaluate", "register", "promote"} <= set(steps)
    assert set(steps.values()) == {"Completed"}
    again = _steps(_retrain(scheduled["logs"]).id)
    assert {name for name, state in again.items() if state != "Cached"} == {"version"}
    # stage 2's config changed: stage 2 and what follows run, nothing before it
    path = scheduled["root"] / "configs/stage2.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "max_steps": 6}))
    changed = _steps(_retrain(scheduled["logs"]).id)
    assert {name for name, state in changed.items() if state != "Cached"} == {
        "version", "stage2", "evaluate", "register", "promote"}


def test_a_data_version_event_starts_retrain(scheduled):
    before = len(_runs("retrain"))
    out = subprocess.run([str(BIN / "skyeye"), "data", "version", "--commit", "-m", "data: test"],
                         cwd=scheduled["root"], env=scheduled["env"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "announced skyeye.data.versioned" in out.stdout, out.stdout + out.stderr
    md5 = yaml.safe_load((scheduled["root"] / "data.dvc").read_text())["outs"][0]["md5"]
    run = _wait_for("a triggered retrain", lambda: (r := _runs("retrain"))[before:] and r[-1], 120, 2)
    assert run.parameters["expected_md5"] == md5
    assert _wait_for("it ends", lambda: _finished(run.id), 600, 2).state.is_completed()


def test_moving_production_starts_serve_with_the_new_version(scheduled):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{scheduled['root'] / 'mlruns/mlflow.db'}")
    production = int(client.get_registered_model("skyeyegpt").aliases["production"])
    from flows.schedule import last_seen
    _wait_for("the watcher saw production", lambda: last_seen() == production, 60)
    before = len(_runs("serve"))
    other = next(int(v.version) for v in client.search_model_versions("name='skyeyegpt'")
                 if int(v.version) != production)  # the earlier runs registered two versions at least
    out = subprocess.run([str(BIN / "skyeye"), "promote", "--version", str(other), "--to", "production", "--force",
                          "--reason", "test: move production by hand"], cwd=scheduled["root"], env=scheduled["env"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    moved_to = int(client.get_registered_model("skyeyegpt").aliases["production"])
    assert moved_to == other
    run = _wait_for("a serve run", lambda: (r := _runs("serve"))[before:] and r[-1], 120, 2)
    assert int(run.parameters["version"]) == moved_to
    assert _wait_for("it ends", lambda: _finished(run.id), 300, 2).state.is_completed()


def test_two_starts_at_once_run_one_retrain_at_a_time(scheduled):
    from prefect.deployments import run_deployment
    started = [run_deployment("retrain/retrain", timeout=0) for _ in range(2)]
    done = [_wait_for("retrain", lambda r=r: _finished(r.id), 600, 2) for r in started]
    assert all(d.state.is_completed() for d in done)
    (a, b) = sorted(done, key=lambda d: d.start_time)
    assert a.end_time <= b.start_time, (a.start_time, a.end_time, b.start_time, b.end_time)


def test_ctrl_c_stops_schedule_up_then_server_up_within_15_s(scheduled):
    """Last in the module: Ctrl-C as a terminal sends it (SIGINT to the process group) stops
    `skyeye schedule up`, then `skyeye server up`, each within 15 s: exit 0, a goodbye line, no
    traceback, nothing of the group left."""
    import signal
    import time
    logs = scheduled["logs"]
    for name, proc in (("schedule-up", scheduled["runner"]), ("server-up", scheduled["servers"])):
        asked = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
        took = time.time() - asked
        out = (logs / f"{name}.log").read_text()
        assert code == 0 and took < 15, f"{name}: exit {code} after {took:.1f} s\n{out[-3000:]}"
        assert "Traceback" not in out, out[-3000:]
        assert sum(line.startswith("stopped: ") for line in out.splitlines()) == 1, out[-1000:]
        left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert not left, f"{name}: processes of the group still running: {left}"
