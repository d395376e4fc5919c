"""The retrain flow end to end at tiny scale, in a throw-away project: real Prefect
(test harness server), real DVC, real Great Expectations, real MLflow (SQLite)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from projects import enter_project

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "configs").mkdir(parents=True)
    (root / "configs/data.yaml").write_text(yaml.safe_dump({"scale": "tiny", "seed": 0}))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    (root / "mlruns").mkdir()
    shutil.copy(REPO / "mlruns/.gitignore", root / "mlruns/.gitignore")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    yield from enter_project(root, monkeypatch)


@pytest.mark.slow
def test_retrain_flow_versions_and_validates_the_data(project, prefect_harness):
    from flows.retrain import retrain
    from skyeye.datagate.gate import validation_outcome
    from skyeye.datagate.versioning import history
    from skyeye.tracking.names import TAG_DVC_MD5, TAG_OUTCOME

    first = retrain(train=False)
    # Stored under the project: data in DVC (pushed to the local remote), result in MLflow.
    md5 = first["data_md5"]
    assert md5 in (project / "data.dvc").read_text()
    assert any((project / ".dvc-storage").rglob("*"))
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns/mlflow.db'}")
    run = client.get_run(first["validation_run"])
    assert run.data.tags[TAG_DVC_MD5] == md5
    assert run.data.tags[TAG_OUTCOME] == "passed"
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "demo data"], cwd=project, check=True)
    # Deterministic data: a second run reproduces the same version, and git stays clean.
    second = retrain(train=False)
    forced = retrain(train=False, force=True)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout
    entries = history(project, validation_lookup=validation_outcome)
    # a defect in the data: the gate fails once (no retry), the run fails naming the step and where to look
    items = json.loads((project / "data/instructions/stage1.json").read_text())
    items[0]["conversations"][1]["value"] = ""
    (project / "data/instructions/stage1.json").write_text(json.dumps(items))
    failed = retrain(train=False, return_state=True)
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    with get_client(sync_client=True) as prefect:
        tasks = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[failed.state_details.flow_run_id])))
    assert failed.is_failed()
    message = str(failed.result(raise_on_failure=False))
    assert "validate failed: data gate failed" in message and "where to look: the validation run" in message
    validate = next(t for t in tasks if t.name.startswith("validate"))
    assert validate.state_name == "Failed" and validate.run_count == 1  # a failed gate is not retried
    assert set(forced["steps"].values()) == {"ran"} and forced["validation_run"] != first["validation_run"]
    assert first["steps"] == {"synth": "ran", "build": "ran", "version": "ran", "validate": "ran"}
    # nothing changed: every step reused but the version check; the same validation run answers
    assert second["steps"] == {"synth": "reused", "build": "reused", "version": "ran", "validate": "reused"}
    assert second["validation_run"] == first["validation_run"]
    assert second["data_md5"] == md5
    assert status == ""
    assert len(entries) == 1 and entries[0].md5 == md5 and entries[0].validation == "passed"


@pytest.mark.slow
def test_retrain_flow_trains_both_stages_after_the_gate(project, prefect_harness):
    """The whole chain with a dim-64 model and a few steps per stage, each step its own task."""
    from flows.retrain import retrain
    tiny = {"vision": {"image_size": 64}, "lora": {"r": 8, "alpha": 16},
            "backbones": {"vision": {"image_size": 64, "patch_size": 16, "hidden_size": 64, "layers": 1, "heads": 2},
                          "llm": {"hidden_size": 64, "layers": 2, "heads": 2, "intermediate_size": 128},
                          "vocab_size": 400, "vision_seconds": 2, "llm_seconds": 2, "vision_batch": 8, "llm_batch": 8}}
    # floors at zero and no approved task needed: the dim-64 model trained a few steps scores ~0 (below its
    # trivial baselines), and the promotion path must run to the end
    (project / "configs/promotion.yaml").write_text(yaml.safe_dump(
        {"staging": {"floor": 0.0, "task_floors": {"caption": 0.0, "vqa": 0.0, "grounding": 0.0},
                     "require_approved_task": False}}))
    (project / "configs/model").mkdir()
    (project / "configs/model/test.yaml").write_text(yaml.safe_dump(tiny))
    for n, data in ((1, "stage1.json"), (2, "stage2.json")):
        (project / f"configs/stage{n}.yaml").write_text(yaml.safe_dump(
            {"stage": n, "data": data, "max_steps": 4, "warmup_steps": 1, "batch_size": 4, "log_every": 2,
             "checkpoint_every": 4, "validation": {"samples": 4, "every_steps": 4}}))
    kwargs = {"model_file": "configs/model/test.yaml", "stage1_file": "configs/stage1.yaml",
              "stage2_file": "configs/stage2.yaml", "num_workers": 1, "eval_limit": 3}
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns/mlflow.db'}")
    out = retrain(**kwargs)
    aliases = client.get_registered_model("skyeyegpt").aliases  # before the reruns below move them
    assert Path(out["stage2_model"], "skyeyegpt.json").exists()
    again = retrain(**kwargs)  # nothing changed
    # (a changed config rerunning what follows it: tests/test_schedule.py, through the server)
    shutil.rmtree(out["stage2_model"])
    dangling = retrain(**kwargs)  # stage 2's result deleted
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey
    with get_client(sync_client=True) as prefect:  # what the last run shows in the Prefect UI
        shown = {a.key: a.data for a in prefect.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(
            key=ArtifactCollectionFilterKey(any_=["retrain-data", "retrain-benchmarks", "retrain-promotion"])))}
    assert set(out["steps"].values()) == {"ran"}
    assert {s for s, how in again["steps"].items() if how == "ran"} == {"version"}
    assert again["model_version"] == out["model_version"] and again["eval_run"] == out["eval_run"]
    downstream = {"version", "stage2", "evaluate", "register", "promote"}
    assert {s for s, how in dangling["steps"].items() if how == "ran"} == downstream
    assert dangling["stage1_model"] == out["stage1_model"] and dangling["stage2_model"] != out["stage2_model"]
    assert Path(dangling["stage2_model"], "skyeyegpt.json").exists()
    from skyeye.formats.benchmarks import EVAL_KEYS
    table = json.loads(shown["retrain-benchmarks"]) if isinstance(shown["retrain-benchmarks"], str) \
        else shown["retrain-benchmarks"]
    assert sorted(row["benchmark"] for row in table) == sorted(EVAL_KEYS)
    assert all({"candidate", "production", "vs production", "trivial baseline", "vs trivial"} <= set(row)
               for row in table)
    assert dangling["data_md5"] in shown["retrain-data"] and dangling["validation_run"] in shown["retrain-data"]
    assert f"version {dangling['model_version']}" in shown["retrain-promotion"]
    assert dangling["eval_run"] in shown["retrain-promotion"] and "### Decision" in shown["retrain-promotion"]
    children = client.search_runs([client.get_run(out["tuning_run"]).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{out['tuning_run']}'")
    assert sorted(r.info.run_name for r in children) == ["backbones", "stage1", "stage2"]
    assert client.get_run(out["tuning_run"]).info.status == "FINISHED"  # the job is closed once its stages are
    assert all(r.data.tags["skyeye.data.dvc_md5"] == out["data_md5"] for r in children)
    # evaluate -> register -> promote, each its own task, linked through MLflow
    from skyeye.formats.benchmarks import EVAL_KEYS, primary_of
    evaluation = client.get_run(out["eval_run"])
    assert evaluation.info.status == "FINISHED"
    assert sorted(primary_of(evaluation.data.metrics)) == sorted(EVAL_KEYS)
    assert evaluation.data.tags["skyeye.eval.training_run"] == next(r.info.run_id for r in children
                                                                     if r.info.run_name == "stage2")
    version = client.get_model_version("skyeyegpt", str(out["model_version"]))
    assert version.tags["skyeye.eval_run"] == out["eval_run"]
    assert version.tags["skyeye.data.dvc_md5"] == out["data_md5"]
    # the project's policy has zero floors: a first model reaches staging, then production (no holder yet)
    assert out["alias"] == "production"
    assert aliases == {"staging": version.version, "production": version.version}
    from flows.retrain import summary  # what `make demo` prints at the end
    assert f"skyeyegpt version {version.version}, alias reached: production" in summary(out)


def test_the_flow_and_its_command_line_take_their_parameters_from_one_typed_object():
    """RetrainParams is the one home of retrain's parameters: the flow's signature has its fields
    and defaults, and `python -m flows.retrain` its flags, defaults and help."""
    import argparse
    import inspect

    from flows.retrain import RetrainParams, add_arguments, retrain
    from skyeye.config import DEFAULT_MODEL_FILE, SCALE_NAMES
    signature = inspect.signature(retrain.fn).parameters
    assert {n: p.default for n, p in signature.items()} == RetrainParams().model_dump()
    assert RetrainParams().model_file == DEFAULT_MODEL_FILE
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert RetrainParams.model_validate(vars(parser.parse_args([]))) == RetrainParams()
    given = RetrainParams.model_validate(vars(parser.parse_args(
        ["--data-only", "--scale", "tiny", "--model-config", "m.yaml", "--stage1-config", "s1.yaml", "--num-workers",
         "3", "--eval-limit", "5", "--no-promote", "--force", "--no-rollout", "--eval-workers", "2"])))
    assert given == RetrainParams(train=False, scale="tiny", model_file="m.yaml", stage1_file="s1.yaml",
                                  num_workers=3, eval_limit=5, promote=False, force=True, rollout=False, eval_workers=2)
    assert next(a for a in parser._actions if a.dest == "scale").choices == SCALE_NAMES
    assert "expected_md5" not in {a.dest for a in parser._actions}  # an event's, not a person's
    out = subprocess.run([sys.executable, "-m", "flows.retrain", "--help"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--stage2-config" in out.stdout and DEFAULT_MODEL_FILE in out.stdout
