"""Beyond one machine, with the real servers on loopback: PostgreSQL 15 behind `mlflow server`
(artifacts in an S3-compatible store) and `prefect server start`; the DVC remote and Ray
Train's checkpoints in that store; a Ray cluster of a head and a worker node (`ray start`).
SkyEye reaches each only through the documented variables. The retrain flow runs end to end
on them and the audit follows it; then the faults: a worker node lost during stage 1, the
MLflow server away during a stage, PostgreSQL restarting under a running flow, the store
unreachable when a checkpoint is due, two promotions of one alias at once."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3
import pytest
import yaml
from mlflow.tracking import MlflowClient
from projects import REPO, write_project
from services import (
    MlflowServer,
    ObjectStore,
    Postgres,
    PrefectServer,
    RayNode,
    TcpProxy,
    stop_tree,
    wait_until,
)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
OURS = ("PREFECT_", "MLFLOW_", "SKYEYE_", "RAY_", "AWS_")


class Stack:
    def __init__(self, folder: Path) -> None:
        try:
            self._start(folder)
        except BaseException:
            self.stop()  # what did start
            raise

    def _start(self, folder: Path) -> None:
        self.folder = folder
        self.base = {k: v for k, v in os.environ.items() if not k.startswith(OURS)}
        self.pg = Postgres()
        self.pg.start()
        self.pg.create_database("mlflow")
        self.pg.create_database("prefect")
        self.s3 = ObjectStore(folder, self.base).start()
        self.s3.create_buckets("mlflow", "dvc", "ray")
        with_s3 = self.base | self.s3.client_env()
        # a plain postgresql:// URL, as a user writes it: read with psycopg 3, which the project installs
        self.mlflow = MlflowServer(folder, with_s3, self.pg.url("mlflow"), "s3://mlflow/artifacts")
        self.prefect = PrefectServer(folder, with_s3, self.pg.url("prefect", "asyncpg"))
        # the nodes' own temp folder: a stale cluster address elsewhere must not matter
        ray_env = with_s3 | {"TMPDIR": str(folder), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                             "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
        self.head = RayNode(folder, ray_env, num_cpus=2)
        self.worker = None
        _all_at_once([self.mlflow.start, self.prefect.start, self.head.start])
        self.worker = RayNode(folder, ray_env, num_cpus=1, head=self.head).start()
        self.root = write_project(folder / "project", max_steps=4, checkpoint_every=2)
        self.env = ray_env | {
            "MLFLOW_TRACKING_URI": self.mlflow.url, "PREFECT_API_URL": self.prefect.api,
            "RAY_ADDRESS": self.head.address, "SKYEYE_RAY_STORAGE": "s3://ray/checkpoints",
            "SKYEYE_DVC_REMOTE_URL": "s3://dvc/remote", "SKYEYE_PROJECT_ROOT": str(self.root)}

    def stop(self) -> None:
        """Whatever was started, also when starting failed half-way."""
        services = [getattr(self, name, None) for name in ("worker", "head", "prefect", "mlflow", "s3")]
        services = [s for s in services if s is not None]
        stoppers = [threading.Thread(target=s.stop) for s in services]  # at once: each may wait for its children
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        if getattr(self, "pg", None) is not None:
            self.pg.remove()

    def skyeye(self, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "skyeye"), *args], cwd=self.root, env=env or self.env, capture_output=True,
                              text=True, timeout=timeout)

    def client(self) -> MlflowClient:
        return MlflowClient(self.mlflow.url)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        s3 = boto3.client("s3", endpoint_url=self.s3.endpoint, **_boto_keys())
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _all_at_once(starts: list) -> None:
    errors = []

    def run(start):
        try:
            start()
        except BaseException as err:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(err)
    threads = [threading.Thread(target=run, args=(start,)) for start in starts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _boto_keys() -> dict:
    from services import S3_KEYS
    return {"aws_access_key_id": S3_KEYS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"], "region_name": S3_KEYS["AWS_DEFAULT_REGION"]}


@pytest.fixture(scope="module")
def stack():
    # tempfile's folder, not pytest's deep one: Ray's socket paths have a length limit
    folder = Path(tempfile.mkdtemp(prefix="skyeye-stack-"))
    try:
        built = Stack(folder)
        try:
            yield built
        finally:
            built.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _started(proc: subprocess.Popen, log: Path, what: str, check, timeout: float = 600):
    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"{what} ended ({proc.returncode}) first:\n{log.read_text()[-4000:]}")
        return check()
    try:
        return wait_until(what, ready, timeout, 1)
    except AssertionError as err:
        if "ended" in str(err):
            raise
        raise AssertionError(f"{err}\n{log.read_text()[-4000:]}") from None


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> str:
    proc.wait(timeout)
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    return text


def test_doctor_names_each_server_and_each_answers(stack):
    out = stack.skyeye("doctor", "--json", timeout=120)
    checks = {c["part"]: c for c in json.loads(out.stdout)}
    assert out.returncode == 0, checks
    assert checks["tracking + registry"]["backend"] == f"MLflow server {stack.mlflow.url}"
    assert checks["orchestration"]["backend"] == f"Prefect server {stack.prefect.api}"
    assert checks["compute"]["backend"] == f"Ray cluster {stack.head.address}"
    assert checks["checkpoints"]["backend"] == f"S3 bucket ray at {stack.s3.endpoint}"
    assert checks["data versions"]["backend"] == f"S3 bucket dvc at {stack.s3.endpoint}"


def test_retrain_end_to_end_on_the_servers_through_a_postgres_restart(stack):
    log = stack.folder / "retrain.log"
    proc = subprocess.Popen([str(BIN / "python"), "-m", "flows.retrain", "--model-config", "configs/model/test.yaml",
                             "--stage1-config", "configs/stage1.yaml", "--stage2-config", "configs/stage2.yaml",
                             "--num-workers", "2", "--eval-limit", "3", "--eval-workers", "2", "--no-rollout"],
                            cwd=stack.root, env=stack.env | {"PYTHONPATH": str(REPO)},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        def running_stage1():
            with temporary_settings({PREFECT_API_URL: stack.prefect.api}), get_client(sync_client=True) as client:
                return any(t.name.startswith("stage1") and t.state_type.value == "RUNNING"
                           for t in client.read_task_runs())
        _started(proc, log, "stage 1 running", running_stage1)
        # PostgreSQL restarts while the Prefect server holds the running flow (and MLflow's too)
        stack.pg.stop()
        time.sleep(5)
        stack.pg.start()
        text = _finish(proc, log)
    finally:
        stop_tree(proc) if proc.poll() is None else None
    with temporary_settings({PREFECT_API_URL: stack.prefect.api}), get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs()
        assert [r.state_type.value for r in flow_runs] == ["COMPLETED"], [(r.name, r.state) for r in flow_runs]
        tasks = {t.name.rsplit("-", 1)[0]: t.state_type.value for t in client.read_task_runs()}
    assert {"stage1", "stage2", "evaluate", "register", "promote"} <= set(tasks), tasks
    assert set(tasks.values()) == {"COMPLETED"}, tasks

    # everything went where the variables said
    client = stack.client()
    assert client.search_model_versions("name='skyeyegpt'"), text[-3000:]
    experiments = [e.experiment_id for e in client.search_experiments()]
    for stage in ("stage1", "stage2"):  # one worker per node
        (run,) = client.search_runs(experiments, filter_string=f"attributes.run_name = '{stage}'")
        assert run.data.metrics["nodes"] == 2, (stage, run.data.metrics)
    assert stack.keys("mlflow", "artifacts/"), "no MLflow artifacts in the object store"
    assert stack.keys("dvc", "remote/"), "the data version was not pushed to the S3 remote"
    assert any(k.endswith("/COMPLETE") for k in stack.keys("ray", "checkpoints/")), "no checkpoint in the store"
    md5 = yaml.safe_load((stack.root / "data.dvc").read_text())["outs"][0]["md5"]

    # the audit follows the chain through the servers: version -> evaluation -> training -> data
    out = stack.skyeye("audit", "--json", "--model", "1", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    audit = json.loads(out.stdout)
    assert md5 in json.dumps(audit), audit
    for stage in ("stage1", "stage2"):
        assert stage in json.dumps(audit), audit


def test_a_stage_on_the_cluster_learns_as_on_one_machine(stack):
    client = stack.client()
    experiments = [e.experiment_id for e in client.search_experiments()]
    (on_cluster,) = client.search_runs(experiments, filter_string="attributes.run_name = 'stage1'")
    one_machine = {k: v for k, v in stack.env.items() if k not in ("RAY_ADDRESS", "SKYEYE_RAY_STORAGE")}
    out = stack.skyeye("train", "--stage", "1", "--model", "configs/model/test.yaml", "--config",
                       "configs/stage1.yaml", "--num-workers", "2", env=one_machine)
    assert out.returncode == 0, out.stdout + out.stderr
    (local,) = [r for r in client.search_runs(experiments, filter_string="attributes.run_name = 'stage1'")
                if r.info.run_id != on_cluster.info.run_id]
    assert (on_cluster.data.metrics["nodes"], local.data.metrics["nodes"]) == (2, 1)
    # the same two DDP workers over the same data: the same figures, wherever the workers run
    curves = [{m.step: m.value for m in client.get_metric_history(r.info.run_id, "loss")} for r in (on_cluster, local)]
    assert curves[0].keys() == curves[1].keys() and curves[0]
    for step in curves[0]:
        assert curves[0][step] == pytest.approx(curves[1][step], rel=1e-3), (step, curves)


def _stage_config(stack: Stack, name: str, **kw) -> str:
    cfg = yaml.safe_load((stack.root / "configs/stage1.yaml").read_text()) | kw
    (stack.root / f"configs/{name}.yaml").write_text(yaml.safe_dump(cfg))
    return f"configs/{name}.yaml"


def _stage1_runs(stack: Stack, since_ms: int) -> list:
    runs = stack.client().search_runs(
        [e.experiment_id for e in stack.client().search_experiments()],
        filter_string=f"attributes.start_time > {since_ms} and attributes.run_name = 'stage1'")
    return runs


def test_mlflow_server_away_during_a_stage_loses_no_metric(stack):
    config = _stage_config(stack, "stage1-timed", max_steps=100000, time_budget_s=60, checkpoint_every=20,
                           log_every=2, validation={"samples": 2, "every_steps": 100000})
    env = {k: v for k, v in stack.env.items() if k != "SKYEYE_RAY_STORAGE"}  # --local: one process, local folder
    since = int(time.time() * 1000)
    log = stack.folder / "mlflow-away.log"
    proc = subprocess.Popen([str(BIN / "skyeye"), "train", "--stage", "1", "--model", "configs/model/test.yaml",
                             "--config", config, "--local"], cwd=stack.root, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    client = stack.client()
    run = _started(proc, log, "first metrics", lambda: next(
        (r for r in _stage1_runs(stack, since) if "loss" in r.data.metrics), None), 300)
    stack.mlflow.stop()
    away_from = time.time() * 1000
    time.sleep(20)
    stack.mlflow.start()
    back_at = time.time() * 1000
    assert proc.poll() is None, "the stage must outlast the outage for this test to mean anything"
    _finish(proc, log)
    history = client.get_metric_history(run.info.run_id, "loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), "a metric step stored twice"
    assert steps and sorted(steps) == list(range(2, max(steps) + 1, 2)), "a metric step lost"
    assert any(away_from < m.timestamp < back_at for m in history), "nothing was logged during the outage"
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert "is not taking metrics" in log.read_text()


def test_object_store_unreachable_at_a_checkpoint_fails_naming_it(stack, monkeypatch, tmp_path):
    from test_ray_train import toy_loop

    from skyeye.training.ray_train import FitConfig, TrainingFailed, fit
    proxy = TcpProxy(stack.s3.port)
    for key, value in stack.s3.client_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # SkyEye's own local Ray: the store is the point here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("toy")).info.run_id
    out = tmp_path / "out"
    out.mkdir()
    gate = {"step": 5, "reached": str(tmp_path / "reached"), "go": str(tmp_path / "go")}
    storage = "s3://ray/unreachable"
    cfg = FitConfig(num_workers=1, storage_path=storage, run_name="toy", mlflow_tracking_uri=uri, mlflow_run_id=run_id,
                    max_failures=1, env={"PYTHONPATH": str(Path(__file__).parent)})
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = fit(toy_loop, {"out": str(out), "steps": 10, "every": 5, "gate": gate}, cfg)
        except Exception as err:  # noqa: BLE001 - what the test looks at
            outcome["error"] = err
    thread = threading.Thread(target=run)
    thread.start()
    wait_until("the loop at its first checkpoint", lambda: Path(gate["reached"]).exists() or not thread.is_alive(),
               300)
    proxy.cut()
    Path(gate["go"]).touch()
    thread.join(300)
    assert "result" not in outcome, "a checkpoint was reported although the store was unreachable"
    error = outcome["error"]
    assert isinstance(error, TrainingFailed) and storage in str(error), error
    assert not [k for k in stack.keys("ray", "unreachable/") if "checkpoint_" in k]
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss")]
    assert steps and max(steps) < 10  # the loop never finished


def test_worker_node_lost_during_stage1_resumes_on_the_survivor(stack):
    config = _stage_config(stack, "stage1-long", max_steps=60, checkpoint_every=6, log_every=2,
                           validation={"samples": 2, "every_steps": 60})
    since = int(time.time() * 1000)
    log = stack.folder / "node-lost.log"
    proc = subprocess.Popen([str(BIN / "skyeye"), "train", "--stage", "1", "--model", "configs/model/test.yaml",
                             "--config", config, "--num-workers", "2"], cwd=stack.root, env=stack.env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        run = _started(proc, log, "the stage-1 run", lambda: next(iter(_stage1_runs(stack, since)), None), 300)
        prefix = f"checkpoints/stage1-{run.info.run_id[:8]}/"
        _started(proc, log, "a checkpoint in the store",
                 lambda: any(k.endswith("/COMPLETE") for k in stack.keys("ray", prefix)), 600)
        stack.worker.kill()
        text = _finish(proc, log)
    finally:
        stop_tree(proc) if proc.poll() is None else None
    runs = _stage1_runs(stack, since)
    assert [r.info.run_id for r in runs] == [run.info.run_id], "one MLflow run per stage"
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in stack.client().get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(2, 61, 2)), steps  # every step once, across the restart
    assert runs[0].data.metrics["restarts"] >= 1 and runs[0].data.metrics["nodes"] == 2, text[-3000:]
    stack.worker = None  # what follows needs no second node: the head alone stays


def test_two_promotions_of_one_alias_at_once(stack):
    client = stack.client()
    before = {int(v.version) for v in client.search_model_versions("name='skyeyegpt'")}
    assert before, "the end-to-end test registers a version first"
    model_dir = client.get_model_version("skyeyegpt", str(max(before))).tags["skyeye.model_dir"]
    new = []
    for _ in range(2):  # two evaluations of one model: two versions to race with each other
        out = stack.skyeye("evaluate", "--model", model_dir, "--benchmarks", "rsvqa_lr", "--limit", "2",
                           "--no-baselines", timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        eval_run = stack.client().search_runs(
            [e.experiment_id for e in client.search_experiments()], filter_string="tags.`skyeye.kind` = 'evaluation'",
            order_by=["attributes.start_time DESC"], max_results=1)[0].info.run_id
        out = stack.skyeye("register", "--eval-run", eval_run, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        new.append(int(out.stdout.strip().rsplit(" ", 1)[1]))
    # two machines: each its own state folder, so only the tracking server can order them
    procs = [subprocess.Popen([str(BIN / "skyeye"), "promote", "--version", str(v), "--to", "production", "--force",
                               "--reason", f"race {v}"], cwd=stack.root, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env=stack.env | {"SKYEYE_STATE_DIR": str(stack.folder / f"m{v}")}) for v in new]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    final = int(client.get_registered_model("skyeyegpt").aliases["production"])
    assert final in new
    registered = {int(v.version) for v in client.search_model_versions("name='skyeyegpt'")}
    assert final in registered
    records = {v: json.loads(client.get_model_version("skyeyegpt", str(v)).tags["skyeye.promotion.production"])
               for v in new}
    assert all(r["reason"] == f"race {v}" for v, r in records.items()), records
    loser = next(v for v in new if v != final)
    # serialized: the winner's record names the loser as the production it replaced
    assert records[final]["previous"] == str(loser), records
    assert not [m for m in client.search_registered_models() if ".lock." in m.name], "a lock was left behind"
