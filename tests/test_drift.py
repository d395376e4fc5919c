"""Drift, measured (skyeye/monitoring/drift.py, reference.py, plots.py): the reference built from
a tiny instruction set under a dim-64 model's frozen encoder, windows written to Parquet as the
server logs them and read back by day. An unshifted window (another seed's corpus) is not
drift; re-coloured (inverted) images are, of the image content only; a changed task mix with
broken boxes and cut answers is; too few rows give no verdict; an image asked about twice
counts once. And the deployments: a daily monitor, retrain triggered by its event."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from inference_rows import invert, rows, unshifted, write_log

from skyeye.model.config import LoRAConfig, ModelConfig, VisionConfig
from skyeye.model.skyeyegpt import build_model
from skyeye.monitoring.config import MonitorConfig
from skyeye.monitoring.drift import compare, energy_test, psi, task_identifier, window_of
from skyeye.monitoring.log_schema import read_log
from skyeye.monitoring.reference import build_reference

CFG = ModelConfig(vision=VisionConfig(image_size=64), lora=LoRAConfig(r=8, alpha=16), max_new_tokens=4)
MONITOR = MonitorConfig(min_rows=40, reference_images=40, permutations=200)  # 40 of the 52 training images
START = datetime(2026, 12, 5, 23, 0, tzinfo=UTC)  # the window crosses midnight: two day partitions


@pytest.fixture(scope="module")
def model(tiny_backbones):
    import torch
    torch.manual_seed(0)
    return build_model(CFG, tiny_backbones["vision"], tiny_backbones["llm"], tiny_backbones["tokenizer"]).eval()


@pytest.fixture(scope="module")
def reference(model, tiny_instructions):
    root = tiny_instructions.parent  # holds instructions/ and synth/, as data/ does
    return build_reference(lambda rel: (root / rel.removeprefix("data/")).read_bytes(), model, MONITOR)


def _window(tmp_path, model, requests, **kw):
    write_log(tmp_path / "log", rows(model, requests, START, **kw))
    log = read_log(str(tmp_path / "log"), START, START + timedelta(hours=24))
    return window_of(log)


def test_the_reference_samples_the_training_questions_and_images(reference):
    assert len(reference.signatures) == len(reference.image_sides) == MONITOR.reference_images
    assert {"caption", "vqa", "refer"} <= set(reference.tasks)
    assert reference.prompt_chars.min() > 0 and reference.image_sides.min() > 0
    assert np.isfinite(reference.signatures).all() and reference.signatures.std(axis=0).min() > 0


def test_an_unshifted_window_is_not_drift(tmp_path, model, reference, fresh_instructions):
    window, answers = _window(tmp_path, model, unshifted(fresh_instructions, 120))
    assert (tmp_path / "log/date=2026-12-05").is_dir() and (tmp_path / "log/date=2026-12-06").is_dir()
    report = compare(reference, window, answers, MONITOR)
    assert report.enough and report.drifted == [], report.table()
    assert {s.name for s in report.signals} == {"task_mix", "prompt_length", "image_size", "image_content",
                                                "unparsable_boxes", "length_cut"}


def test_recoloured_images_are_drift_of_the_image_content_only(tmp_path, model, reference, fresh_instructions):
    window, answers = _window(tmp_path, model, unshifted(fresh_instructions, 120), recoloured=invert)
    report = compare(reference, window, answers, MONITOR)
    assert report.drifted == ["image_content"], report.table()
    content = next(s for s in report.signals if s.name == "image_content")
    assert content.p_value == pytest.approx(1 / (MONITOR.permutations + 1))
    assert content.statistic > report.null.max()


def test_repeated_images_count_once(tmp_path, model, fresh_instructions):
    requests = unshifted(fresh_instructions, 30)
    window, _ = _window(tmp_path, model, requests + requests)
    assert len(window.tasks) == 60 and len(window.signatures) == len({r["image"] for r in requests})


def test_task_mix_broken_boxes_and_cut_answers_are_drift(tmp_path, model, reference, fresh_instructions):
    requests = [r for r in unshifted(fresh_instructions, 400) if task_identifier(r["question"]) == "refer"][:60]
    window, answers = _window(tmp_path, model, requests, bad_boxes=0.5, cut=0.3)
    report = compare(reference, window, answers, MONITOR)
    assert {"task_mix", "unparsable_boxes", "length_cut"} <= set(report.drifted), report.table()
    shares = {s.name: s.statistic for s in report.signals}
    assert shares["unparsable_boxes"] == pytest.approx(0.5, abs=0.02)
    assert shares["length_cut"] == pytest.approx(0.3, abs=0.02)


def test_too_few_rows_is_not_enough_traffic(tmp_path, model, reference, fresh_instructions):
    window, answers = _window(tmp_path, model, unshifted(fresh_instructions, 10), recoloured=invert)
    report = compare(reference, window, answers, MONITOR)
    assert not report.enough and report.signals == [] and report.drifted == []
    assert report.table() == "not enough traffic: 10 requests in the window, 40 needed"


def test_an_empty_log_is_not_enough_traffic(tmp_path, reference):
    window, answers = window_of(read_log(str(tmp_path / "nothing here")))
    assert len(window.tasks) == 0 and answers.answers == 0
    assert compare(reference, window, answers, MONITOR).table().startswith("not enough traffic: 0 requests")


def test_shadow_rows_and_rows_outside_the_window_are_left_out(tmp_path, model, fresh_instructions):
    requests = unshifted(fresh_instructions, 6)
    write_log(tmp_path / "log", rows(model, requests[:4], START) + rows(model, requests[4:], START, role="shadow")
              + rows(model, requests[:3], START - timedelta(days=2)))
    window, _ = window_of(read_log(str(tmp_path / "log"), START, START + timedelta(hours=1)))
    assert len(window.tasks) == 4 and window.signatures.shape == (4, 16)


def test_the_tests_themselves():
    assert psi(np.array([10, 20, 30]), np.array([10, 20, 30])) == 0.0
    assert psi(np.array([100, 200, 300]), np.array([10, 20, 30])) < 0.01
    assert psi(np.array([50, 50]), np.array([90, 10])) > 0.2
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 16)), rng.normal(size=(80, 16))
    stat, p, null = energy_test(x, y, 199, 0)
    assert p > 0.05 and len(null) == 199
    _, p_shift, _ = energy_test(x, y + 0.8, 199, 0)
    assert p_shift == pytest.approx(1 / 200)


def test_plots_one_per_signal_and_an_overview(tmp_path, model, reference, fresh_instructions):
    from skyeye.monitoring.plots import draw
    window, answers = _window(tmp_path, model, unshifted(fresh_instructions, 60), recoloured=invert)
    files = draw(compare(reference, window, answers, MONITOR), tmp_path / "plots")
    assert sorted(f.name for f in files) == sorted(["task_mix.png", "prompt_length.png", "image_size.png",
                                                    "image_content.png", "image_content_null.png", "answers.png",
                                                    "overview.png"])
    assert all(f.stat().st_size > 5000 for f in files)


def test_the_monitor_is_deployed_daily_and_its_event_triggers_retrain():
    from flows.monitor import DRIFT_EVENT
    from flows.schedule import ScheduleConfig, deployments
    by_name = {d.name: d for d in deployments(ScheduleConfig())}
    assert set(by_name) == {"retrain", "serve", "monitor"}
    assert [s.schedule.cron for s in by_name["monitor"].schedules] == ["0 4 * * *"]
    drift = [t for t in by_name["retrain"].triggers if t.expect == {DRIFT_EVENT}]
    assert len(drift) == 1 and by_name["retrain"].concurrency_limit == 1  # one retrain at a time, whatever starts it
    off = deployments(ScheduleConfig.model_validate({"retrain": {"on_drift": False}}))
    assert not [t for t in off[0].triggers if t.expect == {DRIFT_EVENT}]


def test_the_training_data_of_a_version_is_read_locally_or_through_dvc(tmp_path, monkeypatch):
    """The served version's data version: the local data/ when data.dvc records it, else DVC at
    the commit its lineage names (from the remote when the cache lost it); else a clear error."""
    import shutil
    import subprocess

    from flows.monitor import training_data
    from skyeye.config import get_settings
    from skyeye.datagate.versioning import ensure_dvc, version_data
    from skyeye.monitoring.reference import ReferenceError
    for name in ("DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR", "DVC_SITE_CACHE_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.delenv("SKYEYE_DVC_REMOTE_URL", raising=False)
    root = tmp_path / "repo"
    (root / "data/instructions").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    monkeypatch.setenv("SKYEYE_PROJECT_ROOT", str(root))
    get_settings.cache_clear()
    try:
        stage1 = root / "data/instructions/stage1.json"
        stage1.write_text('[{"id": "v1"}]')
        ensure_dvc(root)
        v1 = version_data(root, commit=True, message="data v1")
        stage1.write_text('[{"id": "v2"}]')
        v2 = version_data(root, commit=True, message="data v2")
        read, where = training_data(v2.md5, v2.git_rev)
        assert where.startswith("the local data/") and read("data/instructions/stage1.json") == b'[{"id": "v2"}]'
        shutil.rmtree(root / ".dvc/cache")
        read, where = training_data(v1.md5, v1.git_rev)
        assert where == f"DVC at commit {v1.git_rev[:12]}"
        assert read("data/instructions/stage1.json") == b'[{"id": "v1"}]'
        with pytest.raises(ReferenceError, match=f"data version {v1.md5}.*commit {v2.git_rev}"):
            training_data(v1.md5, v2.git_rev)  # a lineage naming the wrong commit
    finally:
        get_settings.cache_clear()
