"""Both tuning stages end to end with a dim-64 model: 2 Ray workers (DDP over gloo),
MLflow parent/child runs checked through the MLflow client, refusals before compute."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from skyeye.config import Settings
from skyeye.formats.benchmarks import BENCHMARKS, VALIDATION, primary_metric
from skyeye.model.config import LoRAConfig, ModelConfig, VisionConfig
from skyeye.model.skyeyegpt import load_model
from skyeye.model.tiny import BackbonesConfig, TinyLLMSpec, TinyVisionSpec
from skyeye.tracking.names import TAG_MODEL_DIR, TAG_TEST_SPLITS_READ, TUNING_EXPERIMENT
from skyeye.training.stage_config import StageConfig

TINY = ModelConfig(vision=VisionConfig(image_size=64), lora=LoRAConfig(r=8, alpha=16),
                   backbones=BackbonesConfig(vision=TinyVisionSpec(image_size=64, patch_size=16, hidden_size=64,
                                                                   layers=1, heads=2),
                                             llm=TinyLLMSpec(hidden_size=64, layers=2, heads=2, intermediate_size=128),
                                             vocab_size=400, vision_seconds=3, llm_seconds=3, vision_steps=None,
                                             llm_steps=None, vision_batch=8, llm_batch=8, scene_batch=4,
                                             count_batch=4))


def _stage(n: int, data: str) -> StageConfig:
    replay = {"replay": "stage1.json", "replay_share": 0.5} if n == 2 else {}
    # stage 1 with the tiny-model training aids, so their path through DDP (no_sync, eager attention) runs
    aids = {"pointing_weight": 1.0, "coordinate_sigma": 1.5, "length_groups": 2,
            "sampling": dict.fromkeys(BENCHMARKS, 0.0) | {"dior_rsvg": 0.6, "rsvqa_lr": 0.2, "ucm_captions": 0.2}
            } if n == 1 else {}
    conversation = "validation/dior_rsvg_val.json" if n == 2 else None
    return StageConfig(stage=n, data=data, max_steps=6, warmup_steps=2, batch_size=4, log_every=2, **replay, **aids,
                       checkpoint_every=4, validation={"samples": 4, "every_steps": 6, "conversation": conversation})


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_synth, tiny_instructions):
    root = tmp_path_factory.mktemp("project")
    s = Settings(project_root=root, mlflow_tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return s


@pytest.fixture(scope="module")
def backbones(settings, tiny_synth, tiny_instructions):
    from skyeye.training.jobs import prepare_backbones
    return prepare_backbones(TINY, instructions=tiny_instructions, synth=tiny_synth, settings=settings)


def test_backbones_are_cached_by_data_and_config(backbones, settings, tiny_instructions, tiny_synth):
    from skyeye.training.jobs import prepare_backbones
    again = prepare_backbones(TINY, instructions=tiny_instructions, synth=tiny_synth, settings=settings)
    assert again == backbones
    client = MlflowClient(settings.tracking_uri)
    pretrained = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    filter_string="tags.`skyeye.kind` = 'backbones'")
    assert len(pretrained) == 1 and pretrained[0].info.status == "FINISHED"  # one pretraining, not two


def test_encoder_pretraining_learns_each_clip_frames_event(backbones, tiny_synth):
    """Every sampled frame of a CapERA train clip carries that clip's ERA event, RSICD
    images their scene class; the vision encoder was pretrained on them (one class set)."""
    from skyeye.data.instructions import VIDEO_FRAMES
    from skyeye.data.readers import read_benchmark
    from skyeye.training.backbones import scene_frames
    frames, labels, classes = scene_frames(tiny_synth, 32, VIDEO_FRAMES)
    clips = [s for s in read_benchmark("capera", tiny_synth / "capera", ["train"])[0] if s.scene_class]
    rsicd = [s for s in read_benchmark("rsicd", tiny_synth / "rsicd", ["train"])[0] if s.scene_class]
    assert clips and rsicd and frames.shape == (VIDEO_FRAMES * len(clips) + len(rsicd), 3, 32, 32)
    first = [classes[int(i)] for i in labels[:VIDEO_FRAMES]]
    assert first == [f"capera:{clips[0].scene_class}"] * VIDEO_FRAMES
    assert {c for c in classes if c.startswith("rsicd:")} == {f"rsicd:{s.scene_class}" for s in rsicd}
    done = json.loads((Path(backbones["vision"]) / "skyeye_pretraining.json").read_text())
    assert done["scene_classes"] == classes and done["vision/loss_scene"] > 0


def test_caption_counts_read_the_largest_count_each_noun_gets():
    from skyeye.training.backbones import caption_counts
    counts = caption_counts(["a residential area with two grey buildings.",
                             "five buildings, one tennis court and one vehicle are in a residential area.",
                             "there are three storage tanks in an industrial area.", "an aerial image of a meadow."])
    assert counts == {"building": 5, "court": 1, "vehicle": 1, "tank": 3}
    assert caption_counts(["an aerial image of a meadow.", "a red ship is at the left of a beach."]) == {}


def test_encoder_pretraining_learns_the_counts_the_captions_state(backbones, tiny_synth):
    """The caption train images that state counts are the count targets, one column per
    noun; the encoder was pretrained on them."""
    from skyeye.data.readers import read_benchmark
    from skyeye.training.backbones import caption_counts, count_images
    images, target, nouns = count_images(tiny_synth, 32, min_images=1)
    stating = [s for name in ("ucm_captions", "sydney_captions", "rsicd")
               for s in read_benchmark(name, tiny_synth / name, ["train"])[0] if caption_counts(s.captions)]
    assert stating and images.shape == (len(stating), 3, 32, 32) and target.shape == (len(stating), len(nouns))
    first = caption_counts(stating[0].captions)
    assert {n: int(v) for n, v in zip(nouns, target[0].tolist(), strict=True) if v} == first
    done = json.loads((Path(backbones["vision"]) / "skyeye_pretraining.json").read_text())
    assert done["counted"] and done["vision/loss_count"] > 0


@pytest.mark.slow
def test_two_stages_on_two_ray_workers_tracked_in_mlflow(settings, backbones, tiny_instructions):
    from skyeye.training.jobs import parent_run, train_stage
    parent = parent_run("test-job", settings)
    s1 = train_stage(1, TINY, _stage(1, "stage1.json"), backbones, instructions=tiny_instructions, num_workers=2,
                     parent_id=parent, settings=settings)
    s2 = train_stage(2, TINY, _stage(2, "stage2.json"), backbones, instructions=tiny_instructions, init=s1.model_dir,
                     num_workers=2, parent_id=parent, settings=settings)
    client = MlflowClient(settings.tracking_uri)
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in runs) == ["stage1", "stage2"]  # one child per stage, no duplicates
    for run, result in ((client.get_run(s1.run_id), s1), (client.get_run(s2.run_id), s2)):
        assert run.info.status == "FINISHED"
        assert run.data.tags[TAG_MODEL_DIR] == result.model_dir
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == sorted(set(steps)) and steps[-1] == 6  # only rank 0 logged, once per step
        assert VALIDATION + primary_metric("dior_rsvg_val") in run.data.metrics
        assert VALIDATION + primary_metric("rsvqa_lr_val") in run.data.metrics
        assert any(k.startswith("loss/") for k in run.data.metrics)  # per-task loss
        assert run.data.params["stage.batch_size"] == "4" and run.data.params["model.lora.r"] == "8"
        assert run.inputs.dataset_inputs[0].dataset.name == "skyeye-instructions"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"model", "loss_curve.png", "resolved_config.json"} <= artifacts
    assert "loss/pointing" in client.get_run(s1.run_id).data.metrics  # the grounding attention loss ran
    assert client.get_run(s2.run_id).data.tags["skyeye.init_run"] == s1.run_id  # where stage 2 started from
    stage2_metrics = client.get_run(s2.run_id).data.metrics
    assert "validation/conversation/turn3_acc_at_0.5" in stage2_metrics
    # stage 2 replays stage-1 samples (half of each batch) next to its conversations
    assert "loss/conversation" in stage2_metrics
    assert any(k.startswith("loss/") and k != "loss/conversation" for k in stage2_metrics)
    model = load_model(s2.model_dir)  # the final checkpoint is a loadable SkyEyeGPT
    assert model.trainable_parameters()["lora"] > 0


def test_refusals_before_any_compute(settings, backbones, tiny_instructions, tmp_path):
    from skyeye.training.jobs import train_stage
    with pytest.raises(ValueError, match="replay_share > 0 needs `replay`"):
        StageConfig(stage=2, data="stage2.json", replay_share=0.3)
    # checkpoints and held-out scores happen at report steps only: step 25 would never be checkpointed
    with pytest.raises(ValueError, match=r"checkpoint_every \(25\) must be a positive multiple of log_every \(10\)"):
        StageConfig(stage=1, data="stage1.json", log_every=10, checkpoint_every=25)
    with pytest.raises(ValueError, match=r"validation.every_steps \(15\)"):
        StageConfig(stage=1, data="stage1.json", log_every=10, checkpoint_every=20, validation={"every_steps": 15})
    with pytest.raises(ValueError, match="stage 2 needs a stage-1 result"):
        train_stage(2, TINY, _stage(2, "stage2.json"), backbones, instructions=tiny_instructions, local=True,
                    settings=settings)
    with pytest.raises(ValueError, match="stage config says stage 1"):
        train_stage(2, TINY, _stage(1, "stage1.json"), backbones, instructions=tiny_instructions, local=True,
                    settings=settings)
    bad = tmp_path / "bad"
    bad.mkdir()
    rows = json.loads((tiny_instructions / "stage1.json").read_text())
    rows[0]["conversations"][0]["value"] = "<Img><ImageHere></Img> [segment] the ship"  # unknown identifier
    (bad / "stage1.json").write_text(json.dumps(rows))
    (bad / "stage2.json").write_text((tiny_instructions / "stage2.json").read_text())
    with pytest.raises(ValueError, match="fails the data gate"):
        train_stage(1, TINY, _stage(1, "stage1.json"), backbones, instructions=bad, local=True, settings=settings)
    runs = MlflowClient(settings.tracking_uri).search_runs(
        [e.experiment_id for e in MlflowClient(settings.tracking_uri).search_experiments()],
        filter_string="tags.`skyeye.kind` = 'tuning-stage'")
    assert all(r.info.status == "FINISHED" for r in runs)  # refused jobs created no stage run


def test_chat_answers_from_a_saved_stage(settings, backbones, tiny_instructions, tiny_synth):
    from typer.testing import CliRunner

    from skyeye.cli import app
    from skyeye.training.jobs import train_stage
    result = train_stage(1, TINY, _stage(1, "stage1.json"), backbones, instructions=tiny_instructions, local=True,
                         settings=settings)
    image = next((tiny_synth / "dior_rsvg/JPEGImages").glob("*.jpg"))
    out = CliRunner().invoke(app, ["chat", "--model", result.model_dir, "--image", str(image),
                                   "[refer] the white airplane at the top left"])
    assert out.exit_code == 0, out.output
    tags = MlflowClient(settings.tracking_uri).get_run(result.run_id).data.tags
    assert tags[TAG_TEST_SPLITS_READ] == "none"  # the loop ran sealed
    assert out.output.strip()  # an answer (a dim-64 model trained 6 steps says little, but says it)
    missing = CliRunner().invoke(app, ["chat", "--model", result.model_dir, "--image", "nope.jpg", "[vqa] hi"])
    assert missing.exit_code == 2 and "nope.jpg" in missing.output


def test_a_stage_reads_validation_splits_never_a_test_split(backbones, tiny_instructions, tmp_path):
    """File access while a stage trains (the loop, from building the model to the last
    checkpoint), recorded by an audit hook of the test's own: the validation files are read
    (the curves), nothing under eval/ (the sealed test splits)."""
    import sys

    from skyeye.training.loop import run_stage
    from skyeye.training.ray_train import FitConfig, fit_local
    opened: list[str] = []
    recording = [True]

    def record(event: str, args: tuple) -> None:
        if recording[0] and event == "open" and isinstance(args[0], (str, os.PathLike)):
            opened.append(os.path.abspath(os.fspath(args[0])))
    config = {"stage": _stage(2, "stage2.json").model_dump(mode="json"), "model": TINY.model_dump(mode="json"),
              "instructions": str(tiny_instructions.resolve()), "backbones": backbones, "init": None}
    sys.addaudithook(record)  # stays installed (hooks cannot be removed); `recording` turns it off
    try:
        result = fit_local(run_stage, config, FitConfig(num_workers=1, storage_path=str(tmp_path), run_name="sealed"))
    finally:
        recording[0] = False
    root = str(tiny_instructions.resolve())
    assert result.checkpoint_dir is not None and "validation/conversation/turn3_acc_at_0.5" in result.metrics
    assert any(p.startswith(os.path.join(root, "validation", "")) for p in opened)
    assert not [p for p in opened if p.startswith(os.path.join(root, "eval", ""))]


def test_a_test_split_cannot_be_opened_while_a_stage_trains(tmp_path):
    from skyeye.training.sealed import sealed_folder
    (tmp_path / "eval").mkdir()
    (tmp_path / "validation").mkdir()
    test_file, val_file = tmp_path / "eval" / "rsvg_test.json", tmp_path / "validation" / "rsvg_val.json"
    test_file.write_text("[]")
    val_file.write_text("[]")
    with sealed_folder(tmp_path / "eval"):
        assert val_file.read_text() == "[]"
        with pytest.raises(PermissionError, match="rsvg_test.json: a test split is sealed"):
            test_file.read_text()
        with pytest.raises(PermissionError):  # a relative path and os.open are caught too
            os.open(os.path.relpath(test_file), os.O_RDONLY)
    assert test_file.read_text() == "[]"  # after the stage, the evaluation reads it


@pytest.mark.parametrize("field, value", [
    ("validation: {caption: eval/ucm_captions_test.json}", "eval/ucm_captions_test.json"),
    ("validation: {grounding: eval/rsvg_val.json}", "eval/rsvg_val.json"),  # RSVG's val is a scored split
    ("validation: {conversation: validation/../eval/dior_rsvg_test.json}", "dior_rsvg_test.json"),
    ("replay: eval/rsvqa_hr_test_phili.json", "eval/rsvqa_hr_test_phili.json"),
    ("data: rsvqa_lr_test.json", "rsvqa_lr_test.json")])
def test_a_stage_config_naming_a_test_split_is_refused(tmp_path, field, value):
    """Refused when the config is read, before any compute, naming the file and the field."""
    from skyeye.training.stage_config import load_stage_config
    config = tmp_path / "stage1.yaml"
    config.write_text("stage: 1\ndata: stage1.json\n" + field + "\n")
    name = "validation." + field.split("{")[1].split(":")[0] if field.startswith("validation") else field.split(":")[0]
    with pytest.raises(ValueError) as err:
        load_stage_config(config)
    said = str(err.value)
    assert str(config) in said and name in said and value in said and "sealed" in said


def test_the_shipped_stage_configs_read_validation_splits_only():
    from skyeye.training.stage_config import load_stage_config
    root = Path(__file__).resolve().parents[1]
    for name in ("stage1", "stage2"):
        v = load_stage_config(root / "configs" / "train" / f"{name}.yaml").validation
        files = [f for f in (v.grounding, v.vqa, v.caption, v.conversation) if f]
        assert files and all(f.startswith("validation/") and f.endswith("_val.json") for f in files)


def test_stage_resumes_from_its_last_checkpoint(settings, backbones, tiny_instructions, tmp_path):
    """The real stage loop picks up optimizer state and step from a checkpoint (what Ray
    hands a restarted worker group), so a stopped stage continues instead of restarting."""
    import torch

    from skyeye.training.loop import TRAINER_STATE, run_stage
    from skyeye.training.ray_train import FitConfig, fit_local
    config = {"model": TINY.model_dump(mode="json"), "instructions": str(tiny_instructions),
              "backbones": backbones, "init": None}
    fit_cfg = FitConfig(num_workers=1, storage_path=str(tmp_path), run_name="resume", mlflow_tracking_uri=None)
    first = fit_local(run_stage, config | {"stage": _stage(1, "stage1.json").model_dump(mode="json")}, fit_cfg)
    assert torch.load(first.checkpoint_dir / TRAINER_STATE, weights_only=False)["step"] == 6
    longer = _stage(1, "stage1.json").model_copy(update={"max_steps": 10})
    second = fit_local(run_stage, config | {"stage": longer.model_dump(mode="json")}, fit_cfg)
    state = torch.load(second.checkpoint_dir / TRAINER_STATE, weights_only=False)
    assert state["step"] == 10 and second.output["step"] == 10
    assert second.output.get("resumed_from") == 6


def test_the_schedule_follows_steps_not_the_clock():
    """The learning rate at a step must not depend on how long the steps took: under
    load, a clock in the schedule makes reruns of the same recipe drift apart."""
    from skyeye.training.loop import lr_at
    cfg = StageConfig(stage=1, data="stage1.json", max_steps=1600, warmup_steps=50, time_budget_s=7200)
    for step in (50, 51, 55, 400, 1599):
        assert lr_at(step, cfg, elapsed_s=0.0) == lr_at(step, cfg, elapsed_s=120.0)
    assert lr_at(1599, cfg) < lr_at(400, cfg) < lr_at(50, cfg)  # it still anneals, by steps
    timed = cfg.model_copy(update={"anneal_by": "time"})
    assert lr_at(100, timed, elapsed_s=7000.0) < lr_at(100, timed, elapsed_s=10.0)  # the opt-in wall-clock decay


def test_a_stage_rerun_trains_the_same_weights(backbones, tiny_instructions, tmp_path, monkeypatch):
    """Two runs of the same stage config, with a time budget as the demo has, end on the
    same weights bit for bit, the second on a machine whose steps take 20 times longer (a
    clock that runs 20 times faster): what a run learns must not depend on the load."""
    import time

    import torch

    from skyeye.training.loop import run_stage
    from skyeye.training.ray_train import FitConfig, fit_local
    stage = _stage(1, "stage1.json").model_copy(update={"time_budget_s": 600.0}).model_dump(mode="json")
    config = {"model": TINY.model_dump(mode="json"), "instructions": str(tiny_instructions),
              "backbones": backbones, "init": None, "stage": stage}
    weights = []
    for name in ("first", "second"):
        if name == "second":
            monkeypatch.setattr(time, "perf_counter", _fast_clock(time.perf_counter, 20))
        out = fit_local(run_stage, config, FitConfig(num_workers=1, storage_path=str(tmp_path / name),
                                                     run_name="rerun", mlflow_tracking_uri=None))
        weights.append(load_model(out.checkpoint_dir).state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert any("lora_" in key for key in weights[0])  # the trained parts are among what is compared
    for key, t in weights[0].items():
        assert torch.equal(t, weights[1][key]), f"{key} differs between two runs of one config"


def _fast_clock(clock, factor: float):
    start = clock()
    return lambda: start + factor * (clock() - start)


def test_data_input_is_logged_without_ending_the_run(settings):
    from skyeye.tracking import runs
    from skyeye.training.jobs import log_data_input
    runs.setup(settings)
    client = MlflowClient(settings.tracking_uri)
    run = client.create_run(runs.experiment_id(TUNING_EXPERIMENT, settings))
    log_data_input(run.info.run_id, Path("."), "abc123.dir", "deadbeef")
    after = client.get_run(run.info.run_id)
    assert after.info.status == "RUNNING"  # workers are still logging into it
    dataset = after.inputs.dataset_inputs[0]
    assert dataset.dataset.digest == "abc123.dir"
    assert {t.key: t.value for t in dataset.tags}["git_rev"] == "deadbeef"


def test_sampling_ratios_must_name_every_source_the_data_holds():
    from skyeye.data.items import Item
    from skyeye.training.data import SourceSampler
    items = [Item(id=str(k), source=s, task="vqa", media=f"{s}.png", frames=1, turns=())
             for k, s in enumerate(("rsvqa_lr", "rsvqa_lr", "geochat"))]
    with pytest.raises(ValueError, match=r"do not name: \['geochat'\]"):
        SourceSampler(items, {"rsvqa_lr": 1.0}, seed=0)
    left_out = SourceSampler(items, {"rsvqa_lr": 1.0, "geochat": 0.0}, seed=0)  # 0: left out on purpose
    assert {items[i].source for i in left_out.draw(50)} == {"rsvqa_lr"}
    by_size = SourceSampler(items, {}, seed=0)  # no ratios: by size, every source drawn
    assert {items[i].source for i in by_size.draw(200)} == {"rsvqa_lr", "geochat"}
