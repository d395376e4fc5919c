"""skyeye.audit against a real throw-away git + DVC repository and a real SQLite MLflow
store: validation, tuning, evaluation runs and registered versions written the way the
platform writes them, then followed back by the audit."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from projects import project_environment

from skyeye.audit.chain import audit_data, audit_model
from skyeye.audit.records import is_missing
from skyeye.datagate.expectations import ValidationResult
from skyeye.datagate.gate import log_validation
from skyeye.tracking import runs

MODEL = "skyeyegpt"


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


class Trivial(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The project folder (not made yet), with its own SQLite store and DVC's own config folders."""
    tmp = tmp_path_factory.mktemp("audit")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"DVC_NO_ANALYTICS": "1", "DVC_GLOBAL_CONFIG_DIR": str(tmp / "dvc-global"),
                           "DVC_SYSTEM_CONFIG_DIR": str(tmp / "dvc-system"),
                           "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site")}.items():
            mp.setenv(key, value)
        with project_environment(tmp / "project", mp, store=True) as root:
            yield root


@pytest.fixture(scope="module")
def world(project):
    """Two data versions in git/DVC; v1 validated and trained on by a complete tuning job,
    evaluated, registered as version 1 and promoted to production; v2 never validated,
    its stage-2 run deleted, registered as version 2; version 3 has no records at all."""
    from skyeye.config import Settings
    from skyeye.datagate.versioning import ensure_dvc, version_data
    from skyeye.training.jobs import child_run, log_data_input, parent_run

    root = project
    (root / "data/instructions").mkdir(parents=True)
    git(root, "init", "-q")
    git(root, "config", "commit.gpgsign", "false")
    (root / "data/instructions/stage1.json").write_text('[{"id": "s1-0"}]')
    ensure_dvc(root)
    v1 = version_data(root, commit=True, message="data v1")
    (root / "data/instructions/stage1.json").write_text('[{"id": "s1-0"}, {"id": "s1-1"}]')
    v2 = version_data(root, commit=True, message="data v2")

    s = Settings(project_root=root, mlflow_tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs.setup(s)
    client = MlflowClient(s.tracking_uri)
    passed = log_validation(ValidationResult(success=True, n_records=2, seconds=0.1), v1.md5, v1.git_rev, s)
    instructions = root / "data/instructions"

    def job(md5: str, rev: str, input_md5: str | None = None) -> dict[str, str]:
        parent = parent_run("retrain", s, {"skyeye.data.dvc_md5": md5})
        ids = {"job": parent}
        for name, tags in (("backbones", {"skyeye.kind": "backbones"}),
                           ("stage1", {"skyeye.kind": "tuning-stage", "skyeye.stage": "1"}),
                           ("stage2", {"skyeye.kind": "tuning-stage", "skyeye.stage": "2"})):
            run_id = child_run(parent, name, s, {**tags, "skyeye.data.dvc_md5": md5, "skyeye.data.git_rev": rev,
                                                 "skyeye.git_commit": rev, "skyeye.model_dir": f"/m/{name}",
                                                 **({"skyeye.test_splits_read": "none"} if "stage" in name else {})})
            log_data_input(run_id, instructions, input_md5 if name == "stage2" and input_md5 else md5, rev)
            client.log_metric(run_id, "loss", 0.5)
            client.log_metric(run_id, "validation/dior_rsvg_val/acc_at_0.5", 0.25)
            client.set_terminated(run_id, "FINISHED")
            ids[name] = run_id
        client.set_terminated(parent, "FINISHED")
        return ids

    job1 = job(v1.md5, v1.git_rev)
    # Job 2's stage-2 run logged the wrong dataset input: the audit must flag it.
    job2 = job(v2.md5, v2.git_rev, input_md5=v1.md5)

    eval_exp = runs.experiment_id("skyeye-evaluation", s)
    with mlflow.start_run(experiment_id=eval_exp, tags={
            "skyeye.kind": "evaluation", "skyeye.model_dir": "/m/stage2", "skyeye.eval.training_run": job1["stage2"],
            "skyeye.data.dvc_md5": v1.md5, "skyeye.data.git_rev": v1.git_rev,
            "skyeye.eval.benchmarks": "rsvg_test,rsvqa_lr_test",
            "skyeye.test_splits_read": "rsvg_test,rsvqa_lr_test"}) as run:
        mlflow.log_metrics({"primary_score": 41.5, "rsvg_test/acc_at_0.5": 33.0, "rsvqa_lr_test/aa": 50.0,
                            "rsvqa_lr_test/oa": 52.0, "baseline.centred_box/rsvg_test/acc_at_0.5": 4.0})
        eval_run = run.info.run_id

    def register(tags: dict[str, str]) -> str:
        with mlflow.start_run(experiment_id=eval_exp, run_name="register"):
            info = mlflow.pyfunc.log_model(name="model", python_model=Trivial(), registered_model_name=MODEL,
                                           pip_requirements=["mlflow"])
        version = str(info.registered_model_version)
        for k, v in tags.items():
            client.set_model_version_tag(MODEL, version, k, v)
        return version

    promoted = {"skyeye.promotion.production.at": "2026-11-29T10:00:00+00:00",
                "skyeye.promotion.production.from": "staging", "skyeye.promotion.production.by": "alice",
                "skyeye.promotion.production.reason": "beats v0 on every benchmark",
                "skyeye.promotion.production.forced": "false",
                "skyeye.promotion.production.deltas": json.dumps({"rsvg_test": 2.5}),
                "skyeye.promotion.production.previous": ""}
    version1 = register({"skyeye.eval_run": eval_run, "skyeye.training_run": job1["stage2"],
                         "skyeye.tuning_job": job1["job"], "skyeye.data.dvc_md5": v1.md5,
                         "skyeye.data.git_rev": v1.git_rev, "skyeye.approved_tasks": json.dumps(["grounding"]),
                         **promoted})
    client.set_registered_model_alias(MODEL, "production", version1)
    version2 = register({"skyeye.training_run": job2["stage2"], "skyeye.tuning_job": job2["job"],
                         "skyeye.data.dvc_md5": v2.md5, "skyeye.data.git_rev": v2.git_rev})
    client.set_registered_model_alias(MODEL, "staging", version2)  # an alias with no promotion record
    client.delete_run(job2["stage2"])
    version3 = register({"skyeye.data.dvc_md5": "0" * 32 + ".dir"})

    yield {"settings": s, "root": root, "v1": v1, "v2": v2, "job1": job1, "job2": job2, "eval_run": eval_run,
           "validation": passed, "versions": (version1, version2, version3)}


def test_the_world_holds_two_committed_data_versions(world):
    v1, v2 = world["v1"], world["v2"]
    assert v1.md5 != v2.md5 and v1.git_rev and v2.git_rev and v1.git_rev != v2.git_rev


def test_production_audit_follows_the_whole_chain(world):
    v1, job1 = world["v1"], world["job1"]
    audit = audit_model("production")
    assert (audit.model, audit.version, audit.aliases) == (MODEL, world["versions"][0], ["production"])
    assert audit.missing == [] and audit.disagreements == []
    assert audit.training_run == job1["stage2"]
    assert audit.tuning_job.run_id == job1["job"] and audit.tuning_job.kind == "tuning-job"
    assert {r.label: r.run_id for r in audit.training_runs} == {
        "backbones": job1["backbones"], "stage1": job1["stage1"], "stage2": job1["stage2"]}
    assert all(r.status == "FINISHED" and r.metrics["validation/dior_rsvg_val/acc_at_0.5"] == 0.25
               for r in audit.training_runs)
    assert all(r.dataset_digests == [v1.md5] for r in audit.training_runs)
    assert audit.data_md5 == v1.md5
    assert "stage2 run dataset input" in audit.data_sources and len(set(audit.data_sources.values())) == 1
    assert [r.rev for r in audit.data_revisions] == [v1.git_rev] and audit.data_revisions[0].message == "data v1"
    assert audit.validation.outcome == "passed" and audit.validation.run_id == world["validation"]
    assert audit.evaluation.run_id == world["eval_run"]
    assert audit.evaluation.metrics == {"primary_score": 41.5, "rsvqa_lr_test": 50.0, "rsvg_test": 33.0}
    (promo,) = audit.promotions
    assert promo["to"] == "production" and promo["by"] == "alice" and promo["from"] == "staging"
    assert promo["deltas"] == {"rsvg_test": 2.5} and promo["reason"] == "beats v0 on every benchmark"

    assert audit.approved_tasks == ["grounding"]
    text = audit.render()
    assert "approved for: grounding (" in text
    for needle in (job1["job"], job1["stage1"], job1["stage2"], job1["backbones"], v1.md5, v1.git_rev,
                   "PASSED", world["validation"], world["eval_run"], "by alice", "production", "missing links: none"):
        assert needle in text, needle
    # the stage runs read no test split, the evaluation the ones it scored
    stage_lines = [line for line in text.splitlines()
                   if "FINISHED" in line and (job1["stage1"] in line or job1["stage2"] in line)]
    assert stage_lines and all("test splits read: none" in line for line in stage_lines)
    assert "test splits read: rsvg_test,rsvqa_lr_test" in next(line for line in text.splitlines()
                                                               if world["eval_run"] in line)
    back = json.loads(json.dumps(audit.to_dict()))
    assert back["data_revisions"][0]["rev"] == v1.git_rev and back["validation"]["outcome"] == "passed"

    # Every way of naming the version gives the same audit.
    for ref in (f"models:/{MODEL}@production", int(audit.version), f"v{audit.version}",
                f"models:/{MODEL}/{audit.version}"):
        assert audit_model(ref).to_dict() == audit.to_dict()


def test_broken_links_are_reported_not_skipped(world):
    v2, job2 = world["v2"], world["job2"]
    audit = audit_model(world["versions"][1])
    assert is_missing(audit.training_run) and "was deleted" in audit.training_run
    assert job2["stage2"] in audit.training_run
    assert audit.tuning_job.run_id == job2["job"]  # the job itself is still there
    assert [r.run_id for r in audit.training_runs if r.deleted] == [job2["stage2"]]
    assert is_missing(audit.validation) and "never validated" in audit.validation and v2.md5 in audit.validation
    assert is_missing(audit.evaluation) and "skyeye.eval_run" in audit.evaluation
    assert [r.rev for r in audit.data_revisions] == [v2.git_rev]  # the data link itself holds
    assert any("'staging' points here but no skyeye.promotion.staging" in m for m in audit.missing)
    sections = {m.split(":")[0] for m in audit.missing}
    assert {"training", "validation", "evaluation", "promotions"} <= sections
    # the deleted stage-2 run had logged v1 as its input while its tags say v2
    assert audit.disagreements == [f"stage2 run dataset input records data {world['v1'].md5}, not {v2.md5}"]
    text = audit.render()
    assert "missing: training run (tag skyeye.training_run)" in text and "DISAGREEMENTS: 1" in text
    assert audit.approved_tasks is None and "approved for: not recorded" in text  # no tag: served as approved for none
    json.dumps(audit.to_dict())

    bare = audit_model(world["versions"][2])  # nothing recorded but an md5 no commit holds
    assert is_missing(bare.training_run) and is_missing(bare.tuning_job) and is_missing(bare.evaluation)
    assert is_missing(bare.data_revisions) and "in no committed revision of data.dvc" in bare.data_revisions
    assert is_missing(bare.validation) and bare.promotions == [] and bare.training_runs == []
    assert "none recorded" in bare.render()
    json.dumps(bare.to_dict())


def test_data_audit_lists_the_models_trained_on_it(world):
    v1, job1 = world["v1"], world["job1"]
    audit = audit_data(v1.git_rev)
    assert audit.md5 == v1.md5 and audit.missing == []
    assert [r.rev for r in audit.revisions] == [v1.git_rev]
    assert [(v.run_id, v.outcome) for v in audit.validations] == [(world["validation"], "passed")]
    # job 2's stage-2 input names v1, but that run is deleted: only job 1's runs are listed
    assert {r.run_id for r in audit.tuning_runs} == set(job1.values())
    assert [r.run_id for r in audit.evaluation_runs] == [world["eval_run"]]
    assert [(v.version, v.aliases) for v in audit.versions] == [(world["versions"][0], ["production"])]
    text = audit.render()
    assert f"version {world['versions'][0]} [production]" in text and job1["stage2"] in text
    assert json.loads(json.dumps(audit.to_dict()))["md5"] == v1.md5
    # the md5, with or without DVC's .dir suffix, names the same data
    assert audit_data(v1.md5.removesuffix(".dir")).to_dict()["versions"] == audit.to_dict()["versions"]

    second = audit_data("HEAD")  # data v2: registered as version 2, never validated
    assert second.md5 == world["v2"].md5
    assert [(v.version, v.aliases) for v in second.versions] == [(world["versions"][1], ["staging"])]
    assert is_missing(second.validations) and second.missing == [f"validation: {second.validations}"]


def test_unknown_references_raise_naming_them(world):
    with pytest.raises(ValueError, match="has no version 99"):
        audit_model(99)
    with pytest.raises(ValueError, match="has no alias 'nightly'"):
        audit_model("nightly")
    with pytest.raises(ValueError, match="no registered model 'other'"):
        audit_model("models:/other@production")
    with pytest.raises(ValueError, match="'no-such-rev' is neither a DVC md5 nor a git revision"):
        audit_data("no-such-rev")


def test_stage_one_run_as_its_own_job_is_followed_from_stage_two(world):
    """`skyeye train --stage 1` then `--stage 2 --init ...`: two jobs, linked by the stage-2 run's init tag."""
    from skyeye.training.jobs import child_run, parent_run
    s, client = world["settings"], MlflowClient(world["settings"].tracking_uri)
    md5 = "1" * 32 + ".dir"
    runs = {}
    for n in ("1", "2"):
        job = parent_run(f"tune-stage{n}", s)
        tags = {"skyeye.kind": "tuning-stage", "skyeye.stage": n, "skyeye.data.dvc_md5": md5}
        if n == "2":
            tags["skyeye.init_run"] = runs["1"]
        runs[n] = child_run(job, f"stage{n}", s, tags)
        runs[f"job{n}"] = job
        for run_id in (runs[n], job):
            client.set_terminated(run_id, "FINISHED")
    with mlflow.start_run(experiment_id=client.get_run(runs["1"]).info.experiment_id, run_name="register"):
        info = mlflow.pyfunc.log_model(name="model", python_model=Trivial(), registered_model_name=MODEL,
                                       pip_requirements=["mlflow"])
    version = str(info.registered_model_version)
    for k, v in {"skyeye.training_run": runs["2"], "skyeye.tuning_job": runs["job2"],
                 "skyeye.data.dvc_md5": md5}.items():
        client.set_model_version_tag(MODEL, version, k, v)
    audit = audit_model(version)
    assert {r.label: r.run_id for r in audit.training_runs} == {"stage1": runs["1"], "stage2": runs["2"]}
    assert not [g for g in audit.missing if g.startswith("training")]


def test_serving_periods_are_listed_per_version(world):
    """Each time a version is served: endpoint, since, until; two servers at once are two periods,
    and a replacement closes the one at its endpoint only."""
    from skyeye.serving.deploy import Deployed, record, record_stop
    v = world["versions"][2]
    uri = f"models:/{MODEL}/{v}"
    record(Deployed(v, uri, "http://127.0.0.1:8001", None))
    record(Deployed(v, uri, "http://127.0.0.1:8002", None))
    until = record_stop(v, "http://127.0.0.1:8001")
    periods = audit_model(v).serving
    assert [(p["endpoint"], p["until"]) for p in periods] == [("http://127.0.0.1:8001", until),
                                                               ("http://127.0.0.1:8002", None)]
    text = audit_model(v).render()
    assert f"http://127.0.0.1:8001  since {periods[0]['since']}  until {until}" in text
    assert "http://127.0.0.1:8002  since" in text and "now (still served" in text
    assert "never served" in audit_model(world["versions"][1]).render()
