"""One home per value: a default that several packages use is defined once, in the lowest
module they all import, and its readers take it from there. Each assertion fails when a
reader gets its own copy again and the copy drifts."""
from __future__ import annotations

import inspect
from pathlib import Path

from skyeye.config import (
    ABLATION_FILE,
    DEFAULT_MODEL_FILE,
    LOCAL_HOST,
    MLFLOW_PORT,
    PREFECT_PORT,
    REGISTERED_MODEL,
    STAGE_FILE,
    WORKERS_PER_STAGE,
    Settings,
    load_yaml_config,
)

REPO = Path(__file__).resolve().parents[1]


def _defaults(fn) -> dict:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()}


def test_the_default_model_config_is_the_configs():
    from flows.retrain import RetrainParams
    from skyeye import cli
    from skyeye.training.ablation import AblationConfig
    assert (REPO / DEFAULT_MODEL_FILE).is_file()
    assert _defaults(cli.backbones)["model"] == _defaults(cli.train)["model"] == Path(DEFAULT_MODEL_FILE)
    assert RetrainParams().model_file == DEFAULT_MODEL_FILE
    assert load_yaml_config(REPO / "configs/ablation.yaml", AblationConfig).model == DEFAULT_MODEL_FILE


def test_the_stage_and_ablation_configs_and_workers_per_stage_are_the_configs():
    from flows.ablation import ablation
    from flows.retrain import RetrainParams
    from skyeye import cli
    from skyeye.commands.ablation import ablation as ablation_command
    from skyeye.training.ablation import AblationConfig
    from skyeye.training.ray_train import FitConfig
    stages = [STAGE_FILE.format(stage=n) for n in (1, 2)]
    assert all((REPO / f).is_file() for f in stages) and (REPO / ABLATION_FILE).is_file()
    params, cfg = RetrainParams(), AblationConfig()
    assert [params.stage1_file, params.stage2_file] == [cfg.stage1, cfg.stage2] == stages
    assert _defaults(ablation.fn)["config_file"] == ABLATION_FILE
    assert _defaults(ablation_command)["config"] == Path(ABLATION_FILE)
    assert params.num_workers == cfg.num_workers == FitConfig.num_workers == WORKERS_PER_STAGE
    assert _defaults(cli.train)["num_workers"] == WORKERS_PER_STAGE


def test_the_servers_ports_and_the_registered_name_are_the_configs():
    from flows import servers
    from flows.cli import server_up
    for fn in (servers.start, server_up):
        d = _defaults(fn)
        assert (d["host"], d["prefect_port"], d["mlflow_port"]) == (LOCAL_HOST, PREFECT_PORT, MLFLOW_PORT), fn
    fields = Settings.model_fields
    assert fields["mlflow_ui_url"].default == f"http://{LOCAL_HOST}:{MLFLOW_PORT}"
    assert fields["registered_model"].default == REGISTERED_MODEL


def test_the_bootstrap_settings_are_the_intervals():
    from skyeye.evaluation.intervals import LEVEL, RESAMPLES, bootstrap, compare
    from skyeye.evaluation.runner import EvalConfig
    from skyeye.registry.promotion import load_policy
    from skyeye.training.ablation import AblationConfig
    shipped = [load_policy(REPO / "configs/promotion.yaml").production,
               load_yaml_config(REPO / "configs/ablation.yaml", AblationConfig)]
    for cfg in (EvalConfig(), *shipped):
        assert (cfg.resamples, cfg.level) == (RESAMPLES, LEVEL), type(cfg).__name__
    for fn in (bootstrap, compare):
        assert (_defaults(fn)["resamples"], _defaults(fn)["level"]) == (RESAMPLES, LEVEL), fn.__name__


def test_clips_normalisation_and_the_grid_are_the_models():
    from skyeye.data.instructions import VIDEO_FRAMES as BUILT
    from skyeye.formats.boxes import GRID
    from skyeye.formats.prompts import VIDEO_FRAMES
    from skyeye.model.config import VisionConfig, load_model_config
    from skyeye.training import backbones
    for name in ("tiny", "paper"):  # the frames a clip enters as in training is what the model reads
        assert load_model_config(REPO / f"configs/model/{name}.yaml").vision.video_frames == VIDEO_FRAMES == BUILT
    assert (backbones.MEAN, backbones.STD) == (VisionConfig().mean, VisionConfig().std)
    heads = backbones.DenseHeads(8, n_classes=2, grid=2)
    assert heads.box_bins.out_features == 4 * (GRID + 1)  # one bin per coordinate token <0>..<GRID>
