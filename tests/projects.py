"""A throwaway SkyEye project for tests that run whole flows against real servers: tiny
synthetic corpus, a dim-64 model, short stages, floors at zero and no approved task needed
(the tiny model scores about 0, below its trivial baselines, and the promotion path must run
to the end), its own git repository."""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"vision": {"image_size": 64}, "lora": {"r": 8, "alpha": 16},
              "backbones": {"vision": {"image_size": 64, "patch_size": 16, "hidden_size": 64, "layers": 1, "heads": 2},
                            "llm": {"hidden_size": 64, "layers": 2, "heads": 2, "intermediate_size": 128},
                            "vocab_size": 400, "vision_seconds": 2, "llm_seconds": 2, "vision_batch": 8,
                            "llm_batch": 8}}


def write_project(root: Path, max_steps: int = 4, checkpoint_every: int = 4, schedule: dict | None = None) -> Path:
    (root / "configs/model").mkdir(parents=True)
    (root / "configs/data.yaml").write_text(yaml.safe_dump({"scale": "tiny", "seed": 0}))
    (root / "configs/model/test.yaml").write_text(yaml.safe_dump(TINY_MODEL))
    for n, data in ((1, "stage1.json"), (2, "stage2.json")):
        (root / f"configs/stage{n}.yaml").write_text(yaml.safe_dump(
            {"stage": n, "data": data, "max_steps": max_steps, "warmup_steps": 1, "batch_size": 4, "log_every": 2,
             "checkpoint_every": checkpoint_every, "validation": {"samples": 4, "every_steps": max_steps}}))
    (root / "configs/promotion.yaml").write_text(yaml.safe_dump(
        {"staging": {"floor": 0.0, "task_floors": {"caption": 0.0, "vqa": 0.0, "grounding": 0.0},
                     "require_approved_task": False}}))
    if schedule is not None:
        (root / "configs/schedule.yaml").write_text(yaml.safe_dump(schedule))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    (root / "mlruns").mkdir()
    shutil.copy(REPO / "mlruns/.gitignore", root / "mlruns/.gitignore")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


@contextmanager
def project_environment(root: Path, monkeypatch: pytest.MonkeyPatch | None = None, *, store: bool = False,
                        chdir: bool = False) -> Iterator[Path]:
    """Work in project `root` inside the block: SKYEYE_PROJECT_ROOT set; no tracking URI, DVC
    remote, state folder or model name from the outside; with `store`, its own SQLite MLflow
    store (root/mlflow.db, else the project's default, root/mlruns); with `chdir`, root as cwd.
    Settings are read afresh on entry and exit, and MLflow's tracking URI reset on exit (a
    registry lookup exports it). `monkeypatch`: the test's own (its undo restores the
    environment); without it, one for the block (module-scoped fixtures)."""
    from skyeye.config import get_settings
    mp = monkeypatch or pytest.MonkeyPatch()
    try:
        if chdir:
            mp.chdir(root)
        mp.setenv("SKYEYE_PROJECT_ROOT", str(root))
        for var in ("MLFLOW_TRACKING_URI", "SKYEYE_MLFLOW_TRACKING_URI", "SKYEYE_DVC_REMOTE_URL", "SKYEYE_STATE_DIR",
                    "SKYEYE_REGISTERED_MODEL"):
            mp.delenv(var, raising=False)
        if store:
            mp.setenv("SKYEYE_MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        get_settings.cache_clear()
        yield root
    finally:
        import mlflow
        mlflow.set_tracking_uri(None)
        get_settings.cache_clear()
        if monkeypatch is None:
            mp.undo()


def enter_project(root: Path, monkeypatch):
    """Work in project `root` (cwd, SKYEYE_PROJECT_ROOT, its own MLflow store and DVC remote)
    until the generator resumes: a fixture's `yield from enter_project(...)`."""
    with project_environment(root, monkeypatch, chdir=True):
        yield root
