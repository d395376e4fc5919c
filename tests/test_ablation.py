"""The paper's ablation (two_stage vs one_stage vs single): the budget split, checked by hand;
then the flow end to end in a throw-away project at tiny scale (real Prefect test harness,
real DVC, Ray Train and MLflow): one parent run, the three recipes on the same number of
optimizer steps, single's three models each scored on its task only, the comparison table,
chart and metrics."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml
from mlflow.tracking import MlflowClient
from projects import REPO, enter_project, write_project

from skyeye.formats.benchmarks import BENCHMARKS, EVAL_KEYS, TASK, TASK_OF, TASKS, primary_metric
from skyeye.training.ablation import RECIPES, AblationConfig, load_ablation_config, plan, split_steps
from skyeye.training.stage_config import StageConfig, load_stage_config

SAMPLING = {"dior_rsvg": 0.35, "rsvg": 0.10, "rsvqa_lr": 0.15, "rsvqa_hr": 0.10, "ucm_captions": 0.08, "rsicd": 0.08,
            "sydney_captions": 0.04, "capera": 0.10}
COUNTS = {"stage1": Counter({"dior_rsvg": 81, "rsvg": 67, "rsvqa_lr": 40, "rsvqa_hr": 35, "rsicd": 16,
                             "ucm_captions": 8, "sydney_captions": 8, "capera": 8}),
          "stage2": Counter({b: 8 for b in BENCHMARKS})}


def _stages(**stage1) -> tuple[StageConfig, StageConfig]:
    s1 = StageConfig(stage=1, data="stage1.json", max_steps=950, time_budget_s=1800, warmup_steps=50,
                     sampling=SAMPLING, max_length=192, **stage1)
    s2 = StageConfig(stage=2, data="stage2.json", max_steps=230, time_budget_s=600, warmup_steps=20, max_length=256,
                     replay="stage1.json", replay_share=0.3)
    return s1, s2


def test_every_recipe_gets_the_same_steps_split_as_the_recipe_says():
    s1, s2 = _stages()
    jobs = plan(AblationConfig(), s1, s2, COUNTS)
    steps = {r: [j.config.max_steps for j in js] for r, js in jobs.items()}
    assert steps == {"two_stage": [950, 230], "one_stage": [1180], "single": [394, 393, 393]}
    times = {r: sum(j.config.time_budget_s for j in js) for r, js in jobs.items()}
    assert times == pytest.approx({r: 2400 for r in RECIPES})  # the safety net scales with the budget
    two = jobs["two_stage"]
    assert [j.stage for j in two] == [1, 2] and two[1].init == "stage1" and two[1].config.replay == "stage1.json"
    assert two[0].keys == () and two[1].keys == EVAL_KEYS  # only the final model is scored
    one = jobs["one_stage"][0].config  # stage 1's config, stage2.json mixed in at its share of all items
    assert (one.stage, one.data, one.replay, one.max_length) == (1, "stage1.json", "stage2.json", 256)
    assert one.replay_share == pytest.approx(64 / (263 + 64))
    assert one.validation.conversation == s2.validation.conversation
    for job, task in zip(jobs["single"], TASKS, strict=True):
        assert job.name == task and job.stage == 1 and job.config.replay is None
        assert set(job.config.sampling) == set(COUNTS["stage1"])  # every source named: the others at 0
        assert {b for b, r in job.config.sampling.items() if r > 0} == {b for b in BENCHMARKS if TASK[b] == task}
        assert all(job.config.sampling[b] == SAMPLING[b] for b in job.config.sampling if TASK[b] == task)
        assert job.keys == tuple(k for k in EVAL_KEYS if TASK_OF[k] == task)
        kept = {t for t in TASKS if getattr(job.config.validation, t)}
        assert kept == {task} and job.config.validation.conversation is None
    assert all(j.config.seed == 0 for js in jobs.values() for j in js)


def test_a_scaled_budget_keeps_the_totals_equal_and_the_warm_up_below_each_job():
    s1, s2 = _stages()
    jobs = plan(AblationConfig(budget=0.05, seed=7), s1, s2, COUNTS)  # 59 steps: 48 + 11 in two stages
    assert {r: sum(j.config.max_steps for j in js) for r, js in jobs.items()} == {r: 59 for r in RECIPES}
    assert [j.config.max_steps for j in jobs["two_stage"]] == [48, 11]
    assert [j.config.time_budget_s for j in jobs["two_stage"]] == pytest.approx([90, 30])
    assert [j.config.warmup_steps for j in jobs["two_stage"]] == [47, 10]
    assert all(j.config.seed == 7 for js in jobs.values() for j in js)
    assert split_steps(10, 3) == [4, 3, 3] and sum(split_steps(1180, 3)) == 1180
    # no sampling ratios in stage 1: each single-task model samples its sources by size
    s1, s2 = _stages()
    s1 = s1.model_copy(update={"sampling": {}})
    vqa = next(j for j in plan(AblationConfig(recipes=["single"]), s1, s2, COUNTS)["single"] if j.name == "vqa")
    assert {b: r for b, r in vqa.config.sampling.items() if r} == {"rsvqa_lr": 40.0, "rsvqa_hr": 35.0}


def test_a_budget_too_small_or_a_bad_field_is_refused_naming_it(tmp_path):
    s1, s2 = _stages()
    with pytest.raises(ValueError, match="budget 0.002: 2 steps cannot give each of the 3 single-task models one"):
        plan(AblationConfig(budget=0.002, recipes=["single"]), s1, s2, COUNTS)
    with pytest.raises(ValueError, match="budget 0.0001: gives 0 steps"):
        plan(AblationConfig(budget=0.0001, recipes=["one_stage"]), s1, s2, COUNTS)
    with pytest.raises(ValueError, match="gives no weight to a caption source"):
        plan(AblationConfig(), s1.model_copy(update={"sampling": {"rsvqa_lr": 1.0}}), s2, COUNTS)
    with pytest.raises(ValueError, match=r"(?s)ablation config.*budget"):
        load_ablation_config(None, budget=0)
    bad = tmp_path / "ablation.yaml"
    bad.write_text(yaml.safe_dump({"recipes": ["two_stage", "three_stage"]}))
    with pytest.raises(ValueError, match=rf"(?s){bad}.*recipes"):
        load_ablation_config(bad)
    from typer.testing import CliRunner

    from skyeye.cli import app
    refused = CliRunner().invoke(app, ["ablation", "--config", str(tmp_path / "none.yaml"), "--budget", "-1"])
    assert refused.exit_code == 2 and "budget" in refused.output


def test_the_shipped_config_plans_equal_budgets_on_the_shipped_stages():
    cfg = load_ablation_config(REPO / "configs/ablation.yaml")
    assert cfg.recipes == list(RECIPES) and cfg.budget == 1.0 and cfg.limit is None
    s1, s2 = load_stage_config(REPO / cfg.stage1), load_stage_config(REPO / cfg.stage2)
    jobs = plan(cfg, s1, s2, COUNTS)
    assert {r: sum(j.config.max_steps for j in js) for r, js in jobs.items()} == \
        {r: s1.max_steps + s2.max_steps for r in RECIPES}


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = write_project(tmp_path / "project", max_steps=4, checkpoint_every=4)
    (root / "configs/ablation.yaml").write_text(yaml.safe_dump(
        {"model": "configs/model/test.yaml", "stage1": "configs/stage1.yaml", "stage2": "configs/stage2.yaml",
         "limit": 4, "resamples": 200, "num_workers": 1,
         "local": True}))  # six stages: Ray's start-up would be most of the time (Ray Train: test_flow, test_ray_train)
    yield from enter_project(root, monkeypatch)


def test_an_ablation_whose_stage_names_a_test_split_is_refused_before_any_step(project):
    """The stage configs are read before the data steps: nothing is synthesized, built or trained."""
    from flows.ablation import ablation
    stage2 = project / "configs/stage2.yaml"
    raw = yaml.safe_load(stage2.read_text())
    stage2.write_text(yaml.safe_dump(raw | {"validation": raw["validation"] | {"vqa": "eval/rsvqa_lr_test.json"}}))
    with pytest.raises(ValueError, match=rf"(?s){stage2}.*validation.vqa: eval/rsvqa_lr_test.json is a test split"):
        ablation.fn()  # the flow's body: the refusal comes before any task or subflow
    assert not (project / "data").exists()


def _children(client: MlflowClient, experiment: str, parent: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


@pytest.mark.slow
def test_the_ablation_flow_trains_three_recipes_on_one_budget_and_compares_them(project, tmp_path,
                                                                                 prefect_harness):
    from flows.ablation import ablation
    out = ablation(budget=1.5)  # (4 + 4) x 1.5 = 12 steps a recipe: 6 + 6, 12, 4 + 4 + 4
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns/mlflow.db'}")
    parent = client.get_run(out["parent_run"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "ablation"
    recipes = {r.info.run_name: r for r in _children(client, "skyeye-tuning", out["parent_run"])
               if r.info.run_name in RECIPES}
    assert sorted(recipes) == sorted(RECIPES) and all(r.info.status == "FINISHED" for r in recipes.values())
    stages = {name: _children(client, "skyeye-tuning", run.info.run_id) for name, run in recipes.items()}
    assert {n: sorted(r.info.run_name for r in rs) for n, rs in stages.items()} == \
        {"two_stage": ["stage1", "stage2"], "one_stage": ["stage1"], "single": ["stage1"] * 3}
    # the same optimizer steps per recipe: as configured, and as trained (the last logged step)
    planned = {n: sum(int(r.data.params["stage.max_steps"]) for r in rs) for n, rs in stages.items()}
    trained = {n: sum(client.get_metric_history(r.info.run_id, "loss")[-1].step for r in rs)
               for n, rs in stages.items()}
    assert planned == trained == {r: 12 for r in RECIPES}
    assert {n: int(parent.data.metrics[f"{n}/steps"]) for n in RECIPES} == {r: 12 for r in RECIPES}
    one = stages["one_stage"][0].data.params
    assert one["stage.replay"] == "stage2.json" and 0 < float(one["stage.replay_share"]) < 1
    # single: three models, each trained on its task's sources only and scored on its task's splits only
    evaluations = _children(client, "skyeye-evaluation", recipes["single"].info.run_id)
    assert len(evaluations) == 3
    by_run = {r.info.run_id: r for r in stages["single"]}
    for ev in evaluations:
        keys = ev.data.tags["skyeye.eval.benchmarks"].split(",")
        task = TASK_OF[keys[0]]
        assert keys == [k for k in EVAL_KEYS if TASK_OF[k] == task]
        params = by_run[ev.data.tags["skyeye.eval.training_run"]].data.params
        sources = {k.removeprefix("stage.sampling.") for k, v in params.items()
                   if k.startswith("stage.sampling.") and float(v) > 0}  # the other tasks' sources at 0
        assert sources and {TASK[s] for s in sources} == {task}
    for name in ("two_stage", "one_stage"):
        [ev] = _children(client, "skyeye-evaluation", recipes[name].info.run_id)
        assert ev.data.tags["skyeye.eval.benchmarks"].split(",") == list(EVAL_KEYS)
    # the comparison: every split, three recipes with intervals around their scores, the paper beside them
    folder = client.download_artifacts(out["parent_run"], "ablation", str(tmp_path))
    table = json.loads(open(f"{folder}/comparison.json").read())
    rows = [dict(zip(table["columns"], values, strict=True)) for values in table["data"]]
    assert [row["split"] for row in rows] == list(EVAL_KEYS)
    for row in rows:
        for recipe in RECIPES:
            assert row[f"{recipe}.low"] - 1e-9 <= row[recipe] <= row[f"{recipe}.high"] + 1e-9, (row, recipe)
            assert parent.data.metrics[f"{recipe}/{primary_metric(row['split'])}"] == pytest.approx(row[recipe])
        for other in ("one_stage", "single"):
            d = f"two_stage-{other}"
            assert row[d] == pytest.approx(row["two_stage"] - row[other])
            assert row[f"{d}.low"] - 1e-9 <= row[d] <= row[f"{d}.high"] + 1e-9, (row, d)
            # the verdict is what the paired interval of the difference says about 0
            said = "better" if row[f"{d}.low"] > 0 else "worse" if row[f"{d}.high"] < 0 else "no significant difference"
            assert row[f"{d}.verdict"] == said, (row, d)
        assert row["trivial baseline"] is not None  # each task's trivial baseline, for context
    ucm = next(row for row in rows if row["split"] == "ucm_captions_test")
    assert (ucm["paper.two_stage"], ucm["paper.one_stage"]) == (236.75, 220.36)
    assert open(f"{folder}/comparison.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    markdown = open(f"{folder}/comparison.md").read()
    assert markdown == out["markdown"] + "\n" and "real data, 7B" in markdown
    assert "two_stage 12 of 12, one_stage 12 of 12, single 12 of 12" in markdown
