"""The 8-benchmark evaluation with a dim-64 model on the tiny corpus: one MLflow run
holding every bench split's metrics, the baselines, predictions tables and the report;
the baselines themselves; refusals of bad input before any compute."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from skyeye.config import Settings
from skyeye.data.items import load_items
from skyeye.data.records import DataFormatError
from skyeye.evaluation.baselines import approved_tasks, centred_boxes, majority_answers, nearest_captions
from skyeye.evaluation.comparison import load_item_stats
from skyeye.evaluation.runner import EvalConfig, evaluate, load_eval_file, score
from skyeye.formats.benchmarks import EVAL_KEYS, TASK_OF, VALIDATION_KEYS, primary_metric, primary_of, select
from skyeye.formats.boxes import first_box_pixels
from skyeye.model.config import LoRAConfig, ModelConfig, VisionConfig
from skyeye.model.skyeyegpt import build_model, untuned_like

CFG = ModelConfig(vision=VisionConfig(image_size=64), lora=LoRAConfig(r=8, alpha=16))


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    return Settings(project_root=root, mlflow_tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


@pytest.fixture(scope="module")
def model(tiny_backbones):
    torch.manual_seed(1)
    return build_model(CFG, tiny_backbones["vision"], tiny_backbones["llm"], tiny_backbones["tokenizer"]).eval()


@pytest.mark.slow
def test_one_run_holds_every_benchmark_baselines_tables_and_report(model, settings, tiny_instructions):
    result = evaluate(model, "all", cfg=EvalConfig(limit=3, batch_size=2), untuned=untuned_like(model),
                      instructions=tiny_instructions, model_ref="tiny-test-model", settings=settings, progress=False)
    client = MlflowClient(settings.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["skyeye.kind"] == "evaluation"
    assert run.data.tags["skyeye.test_splits_read"] == ",".join(EVAL_KEYS)  # the test splits it read, recorded
    metrics = run.data.metrics
    assert sorted(primary_of(metrics)) == sorted(EVAL_KEYS)
    for key in EVAL_KEYS:  # the untuned model and the task's trivial answer, scored the same way
        assert sorted(primary_of(metrics, "baseline.untuned/")) == sorted(EVAL_KEYS)
        trivial = {"vqa": "majority_answer", "grounding": "centred_box", "caption": "nearest_caption"}[TASK_OF[key]]
        assert key in primary_of(metrics, f"baseline.{trivial}/")
    assert {f"rsvqa_lr_test/{m}" for m in ("aa", "oa")} <= set(metrics)
    assert {f"ucm_captions_test/{m}" for m in ("bleu_1", "bleu_4", "meteor", "rouge_l", "cider")} <= set(metrics)
    assert metrics["primary_score"] == pytest.approx(sum(primary_of(metrics).values()) / len(EVAL_KEYS))
    # every score (ours, each baseline's, each paired difference) with its bootstrap interval
    scores = [k for k in metrics if "/" in k and not k.endswith(("_ci_low", "_ci_high"))]
    assert all(metrics[f"{k}_ci_low"] <= metrics[k] + 1e-9 and metrics[k] <= metrics[f"{k}_ci_high"] + 1e-9
               for k in scores), [k for k in scores if f"{k}_ci_low" not in metrics]
    for key in EVAL_KEYS:
        m = primary_metric(key)
        trivial = {"vqa": "majority_answer", "grounding": "centred_box", "caption": "nearest_caption"}[TASK_OF[key]]
        assert metrics[f"{m}_delta_vs_{trivial}"] == pytest.approx(metrics[m] - metrics[f"baseline.{trivial}/{m}"])
        assert f"{m}_delta_vs_untuned" in metrics
    kept = load_item_stats(result.run_id, settings)  # what later comparisons read, without a re-run
    assert set(kept) == set(EVAL_KEYS)
    assert kept["dior_rsvg_test"]["model"].scores["acc_at_0.5"] == metrics["dior_rsvg_test/acc_at_0.5"]
    assert {"model", "baseline.untuned", "baseline.centred_box"} == set(kept["dior_rsvg_test"])
    assert "interval_seconds" in metrics and "[" in result.render()
    approved = ", ".join(approved_tasks(metrics)) or "none"
    assert f"approved tasks (better than the trivial baseline on every split): {approved}" in result.render()

    artifacts = {f.path for f in client.list_artifacts(result.run_id, "predictions")}
    assert artifacts == {f"predictions/{k}.json" for k in EVAL_KEYS}
    report = {f.path for f in client.list_artifacts(result.run_id, "report")}
    assert {"report/report.html", "report/benchmarks.png", "report/grounding_dior_rsvg_test.png",
            "report/vqa_confusion_rsvqa_lr_test.png"} <= report
    assert f"<b>Approved tasks: {approved}</b>" in Path(client.download_artifacts(result.run_id,
                                                                                 "report/report.html")).read_text()
    # the logged table is what was scored: rescoring it gives the logged metric
    table = json.loads(Path(client.download_artifacts(result.run_id, "predictions/dior_rsvg_test.json")).read_text())
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert len(rows) == 3
    assert score("dior_rsvg_test", rows, [r["prediction"] for r in rows])["acc_at_0.5"] == \
        metrics["dior_rsvg_test/acc_at_0.5"]


def test_a_recipe_is_checked_on_the_validation_splits_in_a_run_of_its_own(model, settings, tiny_instructions):
    """`--on validation`: the same scoring on validation/*.json, no test split read, logged where
    no registry candidate is looked for."""
    result = evaluate(model, "all", cfg=EvalConfig(limit=2, batch_size=2, baselines=("majority_answer", "centred_box",
                                                                                       "nearest_caption")),
                      instructions=tiny_instructions, model_ref="tiny-test-model", settings=settings, progress=False,
                      on="validation")
    client = MlflowClient(settings.tracking_uri)
    run = client.get_run(result.run_id)
    tags = run.data.tags
    assert tags["skyeye.kind"] == "evaluation-on-validation" and tags["skyeye.test_splits_read"] == "none"
    assert client.get_experiment(run.info.experiment_id).name == "skyeye-evaluation-on-validation"
    assert sorted(primary_of(run.data.metrics)) == sorted(VALIDATION_KEYS) and "rsvg_val" not in VALIDATION_KEYS
    assert primary_metric("dior_rsvg_val") + "_delta_vs_centred_box" in run.data.metrics
    with pytest.raises(ValueError, match="unknown validation benchmark or split 'rsvg_test'"):
        select("rsvg_test", "validation")


def test_trivial_baselines(tiny_instructions):
    rows = [{"question_type": "count", "answer": "2"}, {"question_type": "count", "answer": "2"},
            {"question_type": "count", "answer": "3"}, {"question_type": "presence", "answer": "no"}]
    assert majority_answers(rows) == ["2", "2", "2", "no"]

    train = load_items(tiny_instructions / "stage1.json")
    centred = centred_boxes([{"image_size": [200, 100]}], train, "dior_rsvg")
    x1, y1, x2, y2 = first_box_pixels(centred[0], 200, 100)
    assert abs((x1 + x2) / 2 - 100) <= 2 and abs((y1 + y2) / 2 - 50) <= 1  # centred in the image

    # an evaluation row showing a training image gets that image's training caption
    item = next(it for it in train if it.source == "ucm_captions" and it.task == "caption")
    row = {"image": item.media}
    assert nearest_captions([row], tiny_instructions, train, tiny_instructions, "ucm_captions") == [item.turns[0][1]]


def test_bad_input_is_refused_with_its_name(model, settings, tiny_instructions, tmp_path):
    with pytest.raises(ValueError, match="nope"):
        select("ucm_captions,nope")
    assert select("rsvg") == ["rsvg_val", "rsvg_test"]
    # an evaluation file that holds another benchmark
    bad = tmp_path / "instructions"
    shutil.copytree(tiny_instructions, bad)
    shutil.copy(bad / "eval/rsvg_val.json", bad / "eval/dior_rsvg_test.json")
    with pytest.raises(DataFormatError, match="dior_rsvg_test.json.*expected 'dior_rsvg' 'test'"):
        load_eval_file(bad, "dior_rsvg_test")
    rows = json.loads((bad / "eval/rsvqa_lr_test.json").read_text())
    del rows["samples"][1]["question_type"]
    (bad / "eval/rsvqa_lr_test.json").write_text(json.dumps(rows))
    with pytest.raises(DataFormatError, match=r"rsvqa_lr_test.json.*samples\[1\].*question_type"):
        evaluate(model, "rsvqa_lr", instructions=bad, settings=settings, progress=False)


def test_a_failed_evaluation_is_marked_failed(model, settings, tiny_instructions):
    class Broken:  # the model, dying half way through
        def __getattr__(self, name):
            return getattr(model, name)

        def eval(self):
            return self

        def ask(self, *args, **kwargs):
            raise RuntimeError("out of memory")
    client = MlflowClient(settings.tracking_uri)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate(Broken(), "ucm_captions", cfg=EvalConfig(limit=2), instructions=tiny_instructions,
                 settings=settings, progress=False)
    exp = client.get_experiment_by_name("skyeye-evaluation")
    newest = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert newest.info.status == "FAILED"


def test_cli_names_an_unknown_benchmark_and_a_model_that_does_not_load(tmp_path, tiny_instructions, settings,
                                                                         monkeypatch):
    from skyeye.cli import app
    from skyeye.config import get_settings
    monkeypatch.setenv("SKYEYE_MLFLOW_TRACKING_URI", settings.tracking_uri)
    get_settings.cache_clear()
    try:
        unknown = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path), "--benchmarks", "ucm_captions,dota"])
        missing = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "missing"), "--benchmarks", "rsvg",
                                           "--data", str(tiny_instructions)])
    finally:
        get_settings.cache_clear()
    assert unknown.exit_code == 2 and "dota" in unknown.output
    assert missing.exit_code == 2 and "does not load" in missing.output and "missing" in missing.output
