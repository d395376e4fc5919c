"""The drift monitor flow against a real `prefect server start` with the retrain deployment
registered as `skyeye schedule up` registers it (its triggers become automations): a registered
dim-64 version in production, trained on the tiny instruction set (its data version is the one
data.dvc records); an unshifted window emits nothing and starts no retrain; a window of
inverted images (a negative: re-coloured) emits `skyeye.drift.detected` and the automation creates a retrain flow run.
No runner serves the deployment, so that run waits as Scheduled instead of training."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from inference_rows import invert, rows, unshifted, write_log
from processes import free_port
from projects import project_environment, write_project
from services import stop_tree, wait_until
from support import eval_run, scores

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MD5 = "0123456789abcdef0123456789abcdef.dir"


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefect")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(folder), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=folder, start_new_session=True, stdout=open(folder / "server.log", "w"),
                            stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    try:
        import httpx
        wait_until("the Prefect server", lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 180)
        # Prefect's event worker is one per process whatever the server: one started for the
        # session's test server would carry this module's events there
        from prefect.events.worker import EventsWorker
        EventsWorker.drain_all()
        yield api
    finally:
        # nothing left for this server in Prefect's event and log workers: a later test's
        # harness drains them all and would wait on retries to a server that is gone
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        EventsWorker.drain_all()
        APILogWorker.drain_all()
        stop_tree(proc)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_backbones, tiny_instructions, prefect_api):
    """A project serving version 1 (trained on data version MD5, whose files are data/ here),
    the retrain deployment registered, PREFECT_API_URL pointing at the server."""
    root = write_project(tmp_path_factory.mktemp("monitored") / "project")
    (root / "data").symlink_to(tiny_instructions.parent, target_is_directory=True)
    (root / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": MD5, "path": "data"}]}))
    (root / "configs/monitor.yaml").write_text(yaml.safe_dump(
        {"min_rows": 40, "reference_images": 64, "permutations": 200}))
    from prefect.settings import PREFECT_API_URL, temporary_settings
    with pytest.MonkeyPatch.context() as mp, project_environment(root, mp, store=True, chdir=True), \
            temporary_settings({PREFECT_API_URL: prefect_api}):
        mp.setenv("SKYEYE_INFERENCE_LOG", str(root / "inference_log"))
        mp.setenv("PREFECT_API_URL", prefect_api)
        from test_drift import CFG

        from flows.schedule import ScheduleConfig, deployments
        from skyeye.model.skyeyegpt import build_model
        from skyeye.registry import store
        from skyeye.tracking import runs
        runs.setup()
        b = tiny_backbones
        model_dir = build_model(CFG, b["vision"], b["llm"], b["tokenizer"]).save(root / "model")
        version = store.register(model_dir, eval_run(model_dir, scores(1, 1, 1), md5=MD5))
        runs.client().set_registered_model_alias("skyeyegpt", "production", str(version))
        # no cron: the scheduler's runs would stand beside the one the event creates
        cfg = ScheduleConfig.model_validate({"retrain": {"cron": None}})
        retrain = next(d for d in deployments(cfg) if d.name == "retrain")
        retrain.apply()
        from skyeye.model.references import load
        yield {"root": root, "model": load(f"models:/skyeyegpt/{version}").model, "version": version}


def _retrain_runs() -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["retrain"])))


def test_unshifted_no_event_then_shifted_starts_retrain(served, fresh_instructions):
    from flows.monitor import monitor
    from skyeye.tracking import runs
    now = datetime.now(UTC)
    quiet, shifted = now - timedelta(hours=3), now - timedelta(hours=30)
    requests = unshifted(fresh_instructions, 80)
    store = served["root"] / "inference_log"
    write_log(store, rows(served["model"], requests, quiet)
              + rows(served["model"], requests, shifted, recoloured=invert))

    out = monitor(window_hours=2, until=(quiet + timedelta(hours=2)).isoformat())
    assert out["rows"] == 80 and out["drifted"] == [] and not out["event"], out["table"]
    assert out["data_md5"] == MD5 and out["reference"].startswith("the local data/")
    run = runs.client().get_run(out["run_id"])
    assert run.data.metrics["image_content_drifted"] == 0.0
    assert {a.path for a in runs.client().list_artifacts(out["run_id"], "plots")} >= {
        "plots/image_content.png", "plots/task_mix.png", "plots/overview.png"}
    time.sleep(10)  # an event would have reached the automation by now
    assert _retrain_runs() == []

    out = monitor(window_hours=2, until=(shifted + timedelta(hours=2)).isoformat())
    assert out["drifted"] == ["image_content"] and out["event"], out["table"]
    assert out["reference"].startswith("cached")  # the same data version and encoder: not rebuilt
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    with get_client(sync_client=True) as client:
        notes = [a.data for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["drift"])))]
    assert any("**drift**: image_content; `skyeye.drift.detected` emitted" in n for n in notes), notes
    started = wait_until("a retrain run created by the drift event", _retrain_runs, 120, 2)
    assert len(started) == 1 and started[0].created_by and started[0].created_by.type == "AUTOMATION"
    assert started[0].parameters.get("rollout") is False  # the deployment's parameters


def test_skyeye_monitor_by_hand(served, fresh_instructions):
    """The command: a quiet window is "not enough traffic" and emits nothing; a bad time is
    refused before anything runs; with --no-event a drifted window is reported and starts nothing."""
    def skyeye(*args):
        return subprocess.run([str(BIN / "skyeye"), "monitor", *args], cwd=served["root"], capture_output=True,
                              text=True, timeout=300)
    before = len(_retrain_runs())
    out = skyeye("--window-hours", "1", "--until", "2020-01-01T00:00:00+00:00")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 requests" in out.stdout and "not enough traffic: 0 requests in the window, 40 needed" in out.stdout
    bad = skyeye("--until", "yesterday")
    assert bad.returncode == 2 and "--until 'yesterday': not an ISO time" in bad.stdout + bad.stderr
    inverted = datetime.now(UTC) - timedelta(hours=60)  # a window of its own, apart from the other test's
    write_log(served["root"] / "inference_log", rows(served["model"], unshifted(fresh_instructions, 60, seed=2),
                                                     inverted, recoloured=invert))
    quiet = skyeye("--window-hours", "2", "--until", (inverted + timedelta(hours=2)).isoformat(), "--no-event")
    assert quiet.returncode == 0 and "60 requests" in quiet.stdout, quiet.stdout + quiet.stderr
    assert "drift in image_content: no event (--no-event)" in quiet.stdout and "emitted" not in quiet.stdout
    time.sleep(5)  # an event would have reached the automation by now
    assert len(_retrain_runs()) == before
